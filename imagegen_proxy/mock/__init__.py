"""The embedded mock upstream: an OpenAI-compatible image-generation service (generations,
edits, variations), which also speaks Gemini's, Black Forest Labs', Stability's and Amazon
Bedrock's own image APIs (`providers`).

The bundled proxy serves it when no real upstream is configured; benchmarks run it as the
upstream (`python -m imagegen_proxy.mock`).
"""

from .app import MockUpstream
from .decode import Bitmap, decode_png
from .png import encode_rgba, parse_size, render_png

__all__ = ["Bitmap", "MockUpstream", "decode_png", "encode_rgba", "parse_size", "render_png"]
