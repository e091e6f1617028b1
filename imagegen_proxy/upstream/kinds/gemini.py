"""Google's Gemini image models (`kind = "gemini"`): `generateContent` on the Gemini API
(`x-goog-api-key`) or on Vertex AI (a service account's OAuth token).

The answer is JSON with the image as base64 inside a string
(`candidates[].content.parts[].inlineData.data`): it is read as a stream of JSON events,
and the string's pieces go on as they arrive. Gemini makes one image per call, so `n`
images are `n` calls side by side. A blocked prompt or image arrives as an HTTP 200 with
no image: it is answered as OpenAI's `content_policy_violation`. The mapping of OpenAI's
parameters is the table in docs/providers.md.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC
from typing import Any

import anyio
import anyio.to_thread

from ...config import GeminiMember
from ...wire.errors import ProxyError
from ...wire.jsonstream import Event
from ...wire.request import ImageEditBody, ImageRequest
from ...wire.upload import Spooled, Upload
from ...wire.usage import Usage
from ..call import Answer, Call, SendUpstream, TextHeaders
from ..translated import (
    ImageStrings,
    Piece,
    Pieces,
    ProviderError,
    content_policy,
    refused,
    translate,
)
from .base import Job, Located
from .provider import (
    ProviderKind,
    base64_of,
    check_common,
    dimensions,
    edit_images,
    failed,
    json_images,
    loads,
    ratio,
    unsupported,
)

NAME = "Gemini"
MAX_INPUTS = 14  # reference images a Gemini 3 image model takes (third parties)
RATIOS = {
    "1:1": (1, 1),
    "2:3": (2, 3),
    "3:2": (3, 2),
    "3:4": (3, 4),
    "4:3": (4, 3),
    "4:5": (4, 5),
    "5:4": (5, 4),
    "9:16": (9, 16),
    "16:9": (16, 9),
    "21:9": (21, 9),
}
# The output tier (`imageConfig.imageSize`) by the pixels asked for, and by quality.
_TIERS = ((1_600_000, "1K"), (6_500_000, "2K"))
_QUALITY_TIER = {"low": "1K", "medium": "1K", "high": "2K"}
_ORDER = ("1K", "2K", "4K")
# Finish and block reasons that mean "refused for safety or policy", not "failed".
_POLICY = frozenset(
    {
        "SAFETY",
        "PROHIBITED_CONTENT",
        "BLOCKLIST",
        "SPII",
        "RECITATION",
        "IMAGE_SAFETY",
        "IMAGE_PROHIBITED_CONTENT",
        "IMAGE_RECITATION",
        "MODEL_ARMOR",
        "JAILBREAK",
    }
)
_PART = "candidates.item.content.parts.item."
_DATA = _PART + "inlineData.data"
_MAX_TEXT = 4096  # of a small string the reader keeps (a reason, a mime type)
_VERTEX_SCOPE = "https://www.googleapis.com/auth/cloud-platform"


def image_size(request: ImageRequest) -> str | None:
    """The `imageSize` tier for `request` (None: Gemini's default, 1K)."""
    tier = "1K"
    if request.size not in (None, "auto"):
        width, height = dimensions(request.size)
        tier = next((name for most, name in _TIERS if width * height <= most), "4K")
    quality = _QUALITY_TIER.get(request.quality or "", "1K")
    tier = max(tier, quality, key=_ORDER.index)
    return None if tier == "1K" else tier


class Gemini(ProviderKind):
    """The Gemini API, or Vertex AI with `vertex_project`."""

    name = NAME
    system = "gcp.gemini"
    operations = ("generation", "edit")

    def __init__(self, member: GeminiMember) -> None:
        super().__init__(member)
        self.vertex = member.vertex_project is not None
        self.system = "gcp.vertex_ai" if self.vertex else "gcp.gemini"
        if self.vertex:
            base = member.base_url
            if base == GeminiMember.model_fields["base_url"].default:
                location = member.vertex_location
                host = "aiplatform" if location == "global" else f"{location}-aiplatform"
                base = f"https://{host}.googleapis.com"
            self._models = (
                f"{base}/v1/projects/{member.vertex_project}/locations/"
                f"{member.vertex_location}/publishers/google/models/"
            )
            self._tokens: _VertexTokens | None = _VertexTokens(member.credentials_file)
        else:
            self._models = f"{member.base_url}/v1beta/models/"
            self._tokens = None

    def credentials(self, key: str | None) -> TextHeaders:
        if self.vertex or key is None:
            return []  # Vertex: a token made at request time
        return [("x-goog-api-key", key)]

    def check(self, request: ImageRequest) -> None:
        check_common(request, NAME)
        ratio(request.size, RATIOS)
        if isinstance(request.body, ImageEditBody):
            raise unsupported(
                "images",
                f"{NAME} edits take the images as files (multipart), not by URL or file id.",
            )

    def locate(self, request: ImageRequest, pooled: bool) -> Located:
        model = self.model_for(request)
        return Located(f"{self._models}{self.quoted(model)}:generateContent", model)

    def config(self, request: ImageRequest) -> dict[str, Any]:
        """`generationConfig`: an image out, its aspect ratio and size tier."""
        config: dict[str, Any] = {"responseModalities": ["IMAGE"]}
        image: dict[str, str] = {}
        aspect = ratio(request.size, RATIOS)
        if aspect is not None:
            image["aspectRatio"] = aspect
        tier = image_size(request)
        if tier is not None:
            image["imageSize"] = tier
        if image:
            config["imageConfig"] = image
        return config

    def body(self, request: ImageRequest) -> bytes:
        contents = [{"role": "user", "parts": [{"text": request.prompt}]}]
        return json.dumps({"contents": contents, "generationConfig": self.config(request)}).encode()

    async def exchange(self, job: Job, send: SendUpstream) -> Answer:
        request = job.request
        files: list[tuple[str, Spooled]] = []
        if isinstance(job.upload, Upload):
            try:
                files = await edit_images(
                    job.upload, NAME, max_images=MAX_INPUTS, stored=request.stored
                )
            except ProviderError as error:
                return refused(error)
        headers = [*job.headers, ("content-type", "application/json")]
        if self._tokens is not None:
            headers.append(("authorization", "Bearer " + await self._tokens.token()))
        url = self.locate(request, True).url
        upload = job.upload

        def shot() -> Pieces:
            if not files:
                return _images(send, Call(url, headers, self.body(request), job.timeouts))
            assert isinstance(upload, Upload)
            content = _edit_body(request, self.config(request), upload, files)
            return _images(send, Call(url, headers, content, job.timeouts))

        return await translate(request, shot, request.images)


async def _edit_body(
    request: ImageRequest, config: dict[str, Any], upload: Upload, files: list[tuple[str, Spooled]]
) -> AsyncIterator[bytes]:
    """An edit's `generateContent` body, its images base64 inside it as they are read
    back from the spool."""
    prompt = json.dumps({"text": request.prompt}).encode()
    yield b'{"contents":[{"role":"user","parts":[' + prompt
    for media, spooled in files:
        yield b',{"inlineData":{"mimeType":"' + media.encode() + b'","data":"'
        async for piece in base64_of(upload, spooled):
            yield piece
        yield b'"}}'
    yield b']}],"generationConfig":' + json.dumps(config).encode() + b"}"


def _images(send: SendUpstream, call: Call) -> Pieces:
    """One `generateContent` call: its image's base64 pieces as they arrive, then its usage."""
    return json_images(send, call, NAME, _Reader(), google_error)


class _Reader:
    """What one answer's JSON events say: image pieces go on; the rest is kept, small."""

    def __init__(self) -> None:
        self.image = ImageStrings(_DATA, NAME, most=1)
        self.strings: dict[str, bytearray] = {}
        self.numbers: dict[str, int] = {}
        self.details: list[tuple[str, str, int]] = []  # (which, modality, tokens)

    @property
    def images(self) -> int:
        return self.image.images

    def read(self, events: list[Event]) -> list[Piece]:
        out: list[Piece] = []
        for prefix, kind, value in events:
            if self.image.take(prefix, kind, value, out):
                continue
            if kind == "string":
                kept = self.strings.setdefault(prefix, bytearray())
                if len(kept) < _MAX_TEXT:
                    assert isinstance(value, bytes)
                    kept += value[: _MAX_TEXT - len(kept)]
            elif kind == "number" and isinstance(value, int):
                self._number(prefix, value)
        return out

    def _number(self, prefix: str, value: int) -> None:
        if prefix.endswith("TokensDetails.item.tokenCount"):
            which = prefix.split(".", 2)[1]
            modality = self.strings.pop(f"usageMetadata.{which}.item.modality", b"")
            self.details.append((which, bytes(modality).decode(errors="replace"), value))
        else:
            self.numbers[prefix] = value

    def text(self, prefix: str) -> str | None:
        value = self.strings.get(prefix)
        return None if value is None else value.decode(errors="replace")

    def usage(self) -> Usage:
        numbers = self.numbers
        prompt = numbers.get("usageMetadata.promptTokenCount", 0)
        made = numbers.get("usageMetadata.candidatesTokenCount", 0)
        thoughts = numbers.get("usageMetadata.thoughtsTokenCount", 0)
        image_in = sum(
            tokens
            for which, modality, tokens in self.details
            if which == "promptTokensDetails" and modality == "IMAGE"
        )
        text_out = sum(
            tokens
            for which, modality, tokens in self.details
            if which == "candidatesTokensDetails" and modality == "TEXT"
        )
        return Usage(
            tokens=prompt + made + thoughts,
            input_tokens=prompt,
            output_tokens=made + thoughts,
            input_text_tokens=prompt - image_in,
            input_image_tokens=image_in,
            output_text_tokens=text_out + thoughts,
        )

    def refusal(self) -> ProviderError:
        blocked = self.text("promptFeedback.blockReason")
        finish = self.text("candidates.item.finishReason")
        reason = blocked or finish
        if reason in _POLICY:
            said = self.text("promptFeedback.blockReasonMessage") or self.text(
                "candidates.item.finishMessage"
            )
            detail = f" ({said})" if said else ""
            return content_policy(f"{NAME} blocked the request: {reason}{detail}.")
        text = self.text(_PART + "text")
        detail = f": {text[:200]}" if text else ""
        return ProviderError(
            502,
            f"{NAME} answered without an image (finishReason {reason or 'none'}){detail}",
            type="server_error",
            code="upstream_error",
        )


def google_error(answer: Answer, body: bytes) -> ProviderError:
    """Google's error (`{"error": {"code", "message", "status"}}`) as the client is told."""
    found = loads(body)
    error = found.get("error") if isinstance(found, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    status = answer.status
    if (
        isinstance(error, dict)
        and status == 400
        and (error.get("status") == "FAILED_PRECONDITION" or b"API_KEY_INVALID" in body)
    ):
        # Billing, region, or a key Google does not know (which it answers 400): the
        # gateway's account, not the client's request.
        status = 403
    return failed(NAME, status, message if isinstance(message, str) else None, answer)


class _VertexTokens:
    """A service account's (or Application Default Credentials') OAuth access token for
    Vertex AI, refreshed in a worker thread five minutes before it expires; never logged."""

    def __init__(self, credentials_file: str | None) -> None:
        self._file = credentials_file
        self._credentials: Any = None
        self._lock = anyio.Lock()

    async def token(self) -> str:
        async with self._lock:
            credentials = self._credentials
            if credentials is None or _expiring(credentials):
                self._credentials = await anyio.to_thread.run_sync(self._refreshed)
            return str(self._credentials.token)

    def _refreshed(self) -> Any:
        try:
            import google.auth
            import google.auth.transport.requests
            from google.oauth2 import service_account
        except ImportError as exc:
            raise ProxyError(
                502,
                "Vertex AI needs google-auth: pip install 'imagegen-proxy[vertex]'.",
                type="server_error",
                code="upstream_auth_failed",
            ) from exc
        try:
            if self._file is not None:
                credentials = service_account.Credentials.from_service_account_file(  # type: ignore[no-untyped-call]
                    self._file, scopes=[_VERTEX_SCOPE]
                )
            else:
                credentials, _ = google.auth.default(scopes=[_VERTEX_SCOPE])
            credentials.refresh(google.auth.transport.requests.Request())
        except Exception as exc:
            raise ProxyError(
                502,
                f"The gateway could not get a Vertex AI token ({type(exc).__name__}).",
                type="server_error",
                code="upstream_auth_failed",
            ) from None
        return credentials


def _expiring(credentials: Any) -> bool:
    expiry = credentials.expiry  # naive UTC, as google-auth keeps it
    if expiry is None:
        return False
    from datetime import datetime

    left = expiry.replace(tzinfo=UTC) - datetime.now(UTC)
    return bool(left.total_seconds() < 300)
