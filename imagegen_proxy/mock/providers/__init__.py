"""The mock's other upstream wires: each provider's own API, spoken as docs/providers.md
records it, so that every upstream kind of the gateway runs offline against real PNGs.

`gemini` (Google's `generateContent`, the Gemini API's and Vertex's), `bfl` (Black Forest
Labs' FLUX: submit, poll, download), `stability` (Stable Image v2beta) and `bedrock` (Amazon
Bedrock's `InvokeModel`, SigV4 signed). Each honours the mock's `delay`, abandoned when the
client leaves, and `pad_to`, and refuses, filters or throttles prompts with the words
"forbidden", "unsafe" and "throttle" in each provider's own shape.
"""

from __future__ import annotations

from .bedrock import Bedrock
from .bfl import BlackForestLabs
from .common import Handler, Settings, Studio
from .gemini import Gemini
from .stability import Stability

__all__ = ["Handler", "Providers", "Settings"]


class Providers:
    """Routes a request's path to the provider wire that answers it."""

    def __init__(self, settings: Settings, api_key: str | None) -> None:
        studio = Studio(settings)
        self._wires = (
            Gemini(settings, studio, api_key),
            BlackForestLabs(settings, studio, api_key),
            Stability(settings, studio, api_key),
            Bedrock(settings, studio, api_key),
        )

    def handler(self, path: str) -> Handler | None:
        """The handler for `path` (below the mock's mount point), or None if no provider's
        API has it."""
        for wire in self._wires:
            handler = wire.route(path)
            if handler is not None:
                return handler
        return None
