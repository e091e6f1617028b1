"""Stability AI's Stable Image API, v2beta (`kind = "stability"`): one synchronous
`multipart/form-data` call per image to `/v2beta/stable-image/generate/{service}`, the
service picked by the provider model (`ultra`, `core`, or `sd3` with a `model` field).

The call asks for `accept: image/*`, so the answer is the image's raw bytes, with its
`finish-reason` in a header: known before the first byte, so an image Stability made but
filtered (`CONTENT_FILTERED`, possibly blurred) is refused cleanly and never returned. A
JSON answer (`{"image": "<base64>", "finish_reason", "seed"}`) is read too, its image
streamed as its string arrives. `n` images are `n` calls side by side. Only generation for
now: the edit endpoints take an uploaded image, which this kind does not send yet. The
mapping of OpenAI's parameters is the table in docs/providers.md.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

from ...config import StabilityMember
from ...wire.errors import ProxyError
from ...wire.jsonstream import Event
from ...wire.request import ImageRequest
from ..call import Answer, Call, SendUpstream, TextHeaders
from ..translated import (
    Base64Pieces,
    ImageDone,
    ImageStrings,
    Piece,
    Pieces,
    ProviderError,
    content_policy,
    json_pieces,
    translate,
)
from .base import Job, Located
from .provider import ProviderKind, check_common, failed, loads, ratio, read_small, unsupported

NAME = "Stability"
RATIOS = {
    "16:9": (16, 9),
    "1:1": (1, 1),
    "21:9": (21, 9),
    "2:3": (2, 3),
    "3:2": (3, 2),
    "4:5": (4, 5),
    "5:4": (5, 4),
    "9:16": (9, 16),
    "9:21": (9, 21),
}
# The service each model name is served by; an SD3 model goes to `sd3` by name.
SERVICES = {
    "ultra": "ultra",
    "stable-image-ultra": "ultra",
    "core": "core",
    "stable-image-core": "core",
}
SD3_MODELS = (
    "sd3.5-large",
    "sd3.5-large-turbo",
    "sd3.5-medium",
    "sd3.5-flash",
    "sd3-large",
    "sd3-large-turbo",
    "sd3-medium",
)
_SD3_PREFIXES = ("sd3-", "sd3.5-")  # a newer SD3 model: Stability judges the name itself
FORMATS = ("png", "jpeg", "webp")
SD3_FORMATS = ("png", "jpeg")
MAX_PROMPT = 10_000  # characters, Stability's bound
FILTERED = "CONTENT_FILTERED"
_MAX_TEXT = 256  # of the JSON answer's `finish_reason` kept
_MAX_MESSAGE = 2000  # of an error's messages passed on


def service(model: str) -> str:
    """The generate service that makes `model`'s images; a 400 naming `model` for a name
    no service has."""
    found = SERVICES.get(model)
    if found is not None:
        return found
    if model.startswith(_SD3_PREFIXES):
        return "sd3"
    known = ", ".join([*SERVICES, *SD3_MODELS])
    raise ProxyError(
        400,
        f"Invalid value for 'model': {model!r} is not a Stability image model ({known}).",
        param="model",
        code="invalid_value",
    )


def fields(request: ImageRequest, model: str) -> list[tuple[str, str]]:
    """The form fields of `request`'s generation with `model`."""
    out = [("prompt", request.prompt)]
    aspect = ratio(request.size, RATIOS)
    if aspect is not None:
        out.append(("aspect_ratio", aspect))
    output_format = request.body.output_format
    if output_format is not None:
        out.append(("output_format", output_format))
    if service(model) == "sd3":
        out.append(("model", model))
    return out


def multipart(form: Sequence[tuple[str, str]]) -> tuple[bytes, str]:
    """`form`'s text fields as a `multipart/form-data` body, and its content type (a random
    boundary, drawn again in the unlikely case that a value contains it)."""
    values = [(_quoted(name), value.encode()) for name, value in form]
    while True:
        boundary = b"imagegen-" + secrets.token_hex(16).encode()
        if not any(boundary in value for _, value in values):
            break
    body = bytearray()
    for name, value in values:
        body += b'--%s\r\ncontent-disposition: form-data; name="%s"\r\n\r\n' % (boundary, name)
        body += value + b"\r\n"
    body += b"--%s--\r\n" % boundary
    return bytes(body), "multipart/form-data; boundary=" + boundary.decode()


def _quoted(name: str) -> bytes:
    """A field name inside `name="..."`, escaped as the HTML standard does it."""
    escaped = name.replace('"', "%22").replace("\r", "%0D").replace("\n", "%0A")
    return escaped.encode()


class Stability(ProviderKind):
    """Stability AI's Stable Image generate services."""

    name = NAME
    system = "stability_ai"

    def __init__(self, member: StabilityMember) -> None:
        super().__init__(member)
        self._generate = f"{member.base_url}/v2beta/stable-image/generate/"

    def credentials(self, key: str | None) -> TextHeaders:
        return [] if key is None else [("authorization", f"Bearer {key}")]

    def check(self, request: ImageRequest) -> None:
        model = self.model_for(request)
        formats = SD3_FORMATS if service(model) == "sd3" else FORMATS
        check_common(request, NAME, formats=formats)
        ratio(request.size, RATIOS)
        if request.quality not in (None, "auto"):
            raise unsupported(
                "quality",
                f"{NAME} has no quality setting: the model sets it (ultra, core, sd3.5-large, "
                "...). Omit quality or set it to auto.",
            )
        if len(request.prompt) > MAX_PROMPT:
            raise unsupported("prompt", f"{NAME} takes prompts of at most {MAX_PROMPT} characters.")

    def locate(self, request: ImageRequest, pooled: bool) -> Located:
        model = self.model_for(request)
        return Located(self._generate + service(model), model)

    async def exchange(self, job: Job, send: SendUpstream) -> Answer:
        body, content_type = multipart(fields(job.request, job.model))
        headers = [*job.headers, ("content-type", content_type), ("accept", "image/*")]
        call = Call(self._generate + service(job.model), headers, body, job.timeouts)

        def shot() -> Pieces:
            return _image(send, call)

        return await translate(job.request, shot, job.request.images)


async def _image(send: SendUpstream, call: Call) -> Pieces:
    """One generate call: its image's base64 pieces as they arrive, then its end."""
    answer = await send(call)
    try:
        if not 200 <= answer.status < 300:
            raise stability_error(answer, await read_small(answer))
        if answer.header("finish-reason") == FILTERED:
            raise _filtered()
        content_type = (answer.header("content-type") or "").lower()
        if content_type.startswith("application/json"):
            async for piece in _json_image(answer):
                yield piece
            return
        if not content_type.startswith("image/"):
            raise ProviderError(
                502,
                f"{NAME} answered {content_type or 'no content type'} instead of an image.",
                type="server_error",
                code="upstream_error",
            )
        encoder = Base64Pieces()
        async for chunk in answer.chunks():
            for piece in encoder.feed(chunk):
                yield piece
        if piece := encoder.end():
            yield piece
        yield ImageDone()
    finally:
        await answer.aclose()


async def _json_image(answer: Answer) -> Pieces:
    """A JSON answer's `image` as its pieces arrive. A `finish_reason` of CONTENT_FILTERED
    that comes after the image has begun can only fail the answer there."""
    finish = bytearray()
    image = ImageStrings("image", NAME, most=1)

    def read(events: list[Event]) -> list[Piece]:
        out: list[Piece] = []
        for prefix, kind, value in events:
            if image.take(prefix, kind, value, out) or prefix != "finish_reason":
                continue
            if kind == "string":
                assert isinstance(value, bytes)
                finish.extend(value[: _MAX_TEXT - len(finish)])
            elif kind == "string_end" and finish == FILTERED.encode():
                raise _filtered()
        return out

    async for piece in json_pieces(answer, NAME, read):
        yield piece
    if image.images == 0:
        raise ProviderError(
            502, f"{NAME} answered without an image.", type="server_error", code="upstream_error"
        )


def _filtered() -> ProviderError:
    # Stability charges for an image it made, filtered or not: counted as spent, which errs
    # on the side of the budget.
    return content_policy(
        f"{NAME} made an image that its content filter flagged ({FILTERED}); it is not returned.",
        billed=True,
    )


def stability_error(answer: Answer, body: bytes) -> ProviderError:
    """Stability's error (`{"id", "name", "errors": [...]}`) as the client is told."""
    found = loads(body)
    message: str | None = None
    name = None
    if isinstance(found, dict):
        name = found.get("name")
        errors = found.get("errors")
        if isinstance(errors, list) and errors:
            message = "; ".join(str(error) for error in errors)[:_MAX_MESSAGE]
        elif isinstance(name, str):
            message = name
    policy = answer.status == 403 and name == "content_moderation"
    return failed(NAME, answer.status, message, answer, policy=policy)
