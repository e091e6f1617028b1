"""The embedded mock upstream: an OpenAI-compatible image-generation service.

The bundled proxy serves it when no real upstream is configured; benchmarks run it as the
upstream (`python -m imagegen_proxy.mock`).
"""

from .app import MockUpstream
from .png import parse_size, render_png

__all__ = ["MockUpstream", "parse_size", "render_png"]
