"""What the kinds that speak their own API (Gemini, FLUX, Stability, Bedrock) share: the
provider's model for a request, the checks of what OpenAI's parameters can become, small
JSON bodies read with a bound, and the error table every provider's statuses go through.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Collection, Mapping
from typing import Any, Protocol
from urllib.parse import quote

from ...config import ProviderUpstream
from ...wire.errors import ProxyError
from ...wire.jsonstream import Event
from ...wire.request import ImageRequest
from ...wire.routing import ImageOperation
from ...wire.upload import Spooled, Upload
from ...wire.usage import Usage
from ..call import Answer, Call, SendUpstream, TextHeaders, retry_after
from ..translated import Base64Pieces, Piece, Pieces, ProviderError, json_pieces

# A provider's error body, a polling answer, a submission's receipt: small. Past this, it
# is not what was expected.
MAX_SMALL_BODY = 256 * 1024


class ProviderKind:
    """A kind that speaks its own API; subclasses build its calls and read its answers."""

    is_openai_api = False
    name = "provider"  # for people, in messages
    system: str  # gen_ai.provider.name, set by each kind
    operations: tuple[ImageOperation, ...] = ("generation",)

    def __init__(self, member: ProviderUpstream) -> None:
        self.headers: TextHeaders = []
        self.base_url = member.base_url
        self.default_model = member.model
        self.model_map = member.model_map

    def credentials(self, key: str | None) -> TextHeaders:
        return []

    def serves(self, operation: ImageOperation) -> bool:
        return operation in self.operations

    def model_for(self, request: ImageRequest) -> str:
        """The provider's model for `request`: `model_map[model]`, else the model as named
        (checked: it goes into the URL), else the configured `model`."""
        from ...config import is_valid_provider_model

        asked = request.model
        if asked is None:
            if self.default_model is None:
                raise ProxyError(
                    400,
                    f"Missing required parameter: 'model' (the {self.name} model to use).",
                    param="model",
                    code="missing_required_parameter",
                )
            return self.default_model
        model = self.model_map.get(asked, asked)
        if not is_valid_provider_model(model):
            raise ProxyError(
                400,
                f"Invalid value for 'model': {asked!r} is not a {self.name} model name.",
                param="model",
                code="invalid_value",
            )
        return model

    def quoted(self, model: str) -> str:
        """`model` as a URL path segment (its characters were checked; quoting is belt and
        braces)."""
        return quote(model, safe=":")


def unsupported(param: str, message: str) -> ProxyError:
    """A parameter this provider cannot honour as asked: a 400 naming it."""
    return ProxyError(400, message, param=param, code="unsupported_value")


def check_common(
    request: ImageRequest,
    provider: str,
    *,
    formats: Collection[str] = (),
    max_n: int = 10,
    compression: bool = False,
    transparent: bool = False,
) -> None:
    """Refuse what no mapping can keep: an `output_format` the provider cannot make, `n`
    past its maximum, a transparent background, an `output_compression` it cannot set, or a
    `response_format` of `url` (images come back as base64)."""
    body = request.body
    output_format = body.output_format
    if output_format is not None and output_format not in formats:
        made = f"only {', '.join(formats)}" if formats else "no format chosen by the caller"
        raise unsupported(
            "output_format",
            f"{provider} cannot make output_format={output_format!r} ({made}); "
            "omit it to get the provider's own format.",
        )
    if request.images > max_n:
        raise unsupported("n", f"{provider} makes at most {max_n} images per request.")
    if getattr(body, "output_compression", None) is not None and not compression:
        raise unsupported("output_compression", f"{provider} has no output_compression.")
    background = getattr(body, "background", None)
    if background == "transparent" and not transparent:
        raise unsupported("background", f"{provider} cannot make a transparent background.")
    if getattr(body, "response_format", None) == "url":
        raise unsupported(
            "response_format",
            f"Images from {provider} come back as base64 only: omit response_format or "
            "set it to b64_json.",
        )


def ratio(size: str | None, ratios: Mapping[str, tuple[int, int]]) -> str | None:
    """The aspect ratio of `ratios` that `size` ("WxH") has exactly; None for no size or
    "auto"; a 400 naming `size` when it has none of them."""
    if size is None or size == "auto":
        return None
    width, height = dimensions(size)
    for name, (w, h) in ratios.items():
        if width * h == height * w:
            return name
    listed = ", ".join(ratios)
    raise unsupported("size", f"size {size!r} has no aspect ratio this provider makes ({listed}).")


def dimensions(size: str) -> tuple[int, int]:
    """(width, height) of a "WxH" size; a 400 naming `size` otherwise."""
    width, _, height = size.partition("x")
    if not (width.isdigit() and height.isdigit()) or int(width) == 0 or int(height) == 0:
        raise unsupported("size", f"Invalid size {size!r}: expected WIDTHxHEIGHT or auto.")
    return int(width), int(height)


async def read_small(answer: Answer) -> bytes:
    """A small body, whole; past `MAX_SMALL_BODY` it is cut there."""
    data = bytearray()
    async for chunk in answer.chunks():
        data += chunk
        if len(data) > MAX_SMALL_BODY:
            break
    return bytes(data[:MAX_SMALL_BODY])


def loads(data: bytes) -> Any:
    """JSON, or None when it is not."""
    try:
        return json.loads(data)
    except ValueError:
        return None


def failed(
    provider: str,
    status: int,
    message: str | None,
    answer: Answer | None = None,
    *,
    policy: bool = False,
    billed: bool = False,
) -> ProviderError:
    """A provider's error status as the client is told it (one table for every kind):
    a refusal of the request stays a 400 with the provider's message; a moderation refusal
    (`policy`) is `content_policy_violation`; a rejected credential or account is the
    gateway's problem (502, naming no secret); 402 (no credits) is OpenAI's
    `insufficient_quota`; 429 keeps its `retry-after`; 5xx stay 5xx, so the pool may fail
    over."""
    said = f": {message}" if message else ""
    wait = None if answer is None else retry_after(answer.header("retry-after"))
    if policy:
        return ProviderError(
            400,
            f"{provider} refused the request{said}",
            code="content_policy_violation",
            billed=billed,
        )
    if status in (400, 404, 413, 422):
        return ProviderError(
            400, f"{provider} refused the request{said}", code="invalid_request", billed=billed
        )
    if status in (401, 403):
        return ProviderError(
            502,
            f"{provider} refused the gateway's credentials (status {status}); "
            "tell the gateway's operators.",
            type="server_error",
            code="upstream_auth_failed",
            billed=billed,
        )
    if status == 402:
        return ProviderError(
            429,
            f"The gateway's {provider} account is out of credits.",
            type="insufficient_quota",
            code="insufficient_quota",
            billed=billed,
        )
    if status == 429:
        return ProviderError(
            429,
            f"{provider} is rate limiting the gateway{said}",
            type="rate_limit_error",
            code="rate_limit_exceeded",
            retry_after=wait,
            billed=billed,
        )
    upstream = status if status in (500, 502, 503, 504) else 502
    return ProviderError(
        upstream,
        f"{provider} failed (status {status}){said}",
        type="server_error",
        code="upstream_error",
        billed=billed,
    )


# Input image types the providers take inside their JSON (base64).
INPUT_TYPES = frozenset({"image/png", "image/jpeg", "image/webp"})


async def edit_images(
    upload: Upload, provider: str, *, max_images: int, stored: bool = False
) -> list[tuple[str, Spooled]]:
    """A multipart edit's input images, spooled to disk (a provider that takes them base64
    inside its JSON, perhaps in several calls, reads them back from there), each with its
    media type. Refused with a 400 naming the param: a mask (these providers have none), an
    image of another type, more than `max_images`, none, and a transparent background or
    `response_format=url` in the form's fields (unless `stored`: the gateway's store makes
    the URL)."""
    files = await upload.spool_rest()
    fields = upload.fields
    if fields.get("background") == "transparent":
        raise ProviderError(
            400, f"{provider} cannot make a transparent background.", param="background"
        )
    if fields.get("response_format") == "url" and not stored:
        raise ProviderError(
            400, f"Images from {provider} come back as base64 only.", param="response_format"
        )
    found: list[tuple[str, Spooled]] = []
    for part, spooled in files:
        if part.name == "mask":
            raise ProviderError(
                400,
                f"{provider} edits take no mask: describe the change in the prompt.",
                param="mask",
            )
        media = (part.content_type or "").split(";", 1)[0].strip().lower()
        if media not in INPUT_TYPES:
            raise ProviderError(
                400,
                f"{provider} takes PNG, JPEG or WebP input images, "
                f"not {media or 'an untyped file'}.",
                param="image",
                code="invalid_image_format",
            )
        found.append((media, spooled))
    if not found:
        raise ProviderError(400, "An edit needs an image.", param="image")
    if len(found) > max_images:
        raise ProviderError(
            400, f"{provider} takes at most {max_images} input images.", param="image"
        )
    return found


async def base64_of(upload: Upload, spooled: Spooled) -> AsyncIterator[bytes]:
    """A spooled input image's base64, in pieces, as it is read back from the spool."""
    encoder = Base64Pieces()
    async for chunk in upload.spooled(spooled):
        for piece in encoder.feed(chunk):
            yield piece
    yield encoder.end()


class AnswerReader(Protocol):
    """What a kind reads from one JSON answer: its image pieces (`read`), how many images
    came, why none did (`refusal`) and the tokens it reports (`usage`, None: none)."""

    @property
    def images(self) -> int: ...

    def read(self, events: list[Event]) -> list[Piece]: ...

    def refusal(self) -> ProviderError: ...

    def usage(self) -> Usage | None: ...


async def json_images(
    send: SendUpstream,
    call: Call,
    provider: str,
    reader: AnswerReader,
    error: Callable[[Answer, bytes], ProviderError],
) -> Pieces:
    """One call answering JSON with its images inside: their pieces as they arrive, then
    its usage; a non-2xx is `error(answer, body)`, an answer without an image the reader's
    refusal."""
    answer = await send(call)
    try:
        if not 200 <= answer.status < 300:
            raise error(answer, await read_small(answer))
        async for piece in json_pieces(answer, provider, reader.read):
            yield piece
        if reader.images == 0:
            raise reader.refusal()
        usage = reader.usage()
        if usage is not None:
            yield usage
    finally:
        await answer.aclose()
