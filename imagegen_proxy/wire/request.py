"""One normalized request, whichever path form it came in: reading, parsing, validating."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)
from pydantic_core import ErrorDetails

from ..types import Receive, Scope
from .errors import ClientGone, ProxyError, gif_refusal, too_large
from .json_upload import MAX_IMAGE_URL, JsonUpload
from .routing import Form, ImageOperation, Route


def _integral(value: Any) -> Any:
    # JSON (and JSON Schema) count 6.0 as an integer; strict mode alone would refuse it.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


Integer = Annotated[int, BeforeValidator(_integral)]


class ImageGenerationBody(BaseModel):
    """The JSON body of `images.generate`.

    Structure and types are checked; values are not: new sizes, qualities, models and
    fields appear every few months, so unknown values and unknown fields pass through.
    """

    model_config = ConfigDict(extra="allow", strict=True, frozen=True)

    prompt: str = Field(min_length=1)
    model: str | None = None
    n: Integer | None = Field(None, ge=1, le=10)
    size: str | None = None
    quality: str | None = None
    style: str | None = None
    response_format: str | None = None
    background: str | None = None
    moderation: str | None = None
    output_format: str | None = None
    output_compression: Integer | None = Field(None, ge=0, le=100)
    stream: bool | None = None
    partial_images: Integer | None = Field(None, ge=0, le=3)
    user: str | None = None
    # gpt-image-2.6: how much the model plans ("low", "medium", "high"), and animated GIFs
    # (`output_format = "gif"`) of 2 to 16 frames, each shown `frame_duration_ms`.
    complexity: str | None = None
    frame_count: Integer | None = Field(None, ge=2, le=16)
    frame_duration_ms: Integer | None = Field(None, ge=1)

    def to_json(self) -> bytes:
        """The body as it goes upstream: exactly the fields the client set (explicit nulls too)."""
        return self.model_dump_json(exclude_unset=True).encode()


class ImageRef(BaseModel):
    """One image of a JSON edit (OpenAI's `ImageRefParam`): exactly one of `image_url` (an
    https URL or a base64 data URL) and `file_id` (a file of the Files API), nothing else."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    image_url: str | None = Field(None, min_length=1)
    file_id: str | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _one_of(self) -> ImageRef:
        if any(getattr(self, name) is None for name in self.model_fields_set):
            raise ValueError("'image_url' and 'file_id' are strings, not null")
        if (self.image_url is None) == (self.file_id is None):
            raise ValueError("give exactly one of 'image_url' and 'file_id'")
        return self


class ImageEditBody(ImageGenerationBody):
    """The JSON body of an edit (OpenAI's `EditImageBodyJsonParam`): a generation's fields,
    with its images by reference or inline (1 to 16) instead of multipart files, and the
    mask likewise."""

    images: list[ImageRef] = Field(min_length=1, max_length=16)
    mask: ImageRef | None = None


class ImageFormBody(BaseModel):
    """The text fields of a multipart edit or variation, checked as the API reads them:
    form values are strings ("2", "true"), converted where a type is expected. Unknown
    fields and values pass, as for JSON bodies."""

    model_config = ConfigDict(extra="allow", frozen=True)

    prompt: str | None = Field(None, min_length=1)  # required for edits, absent on variations
    model: str | None = None
    n: int | None = Field(None, ge=1, le=10)
    size: str | None = None
    quality: str | None = None
    stream: bool | None = None
    partial_images: int | None = Field(None, ge=0, le=3)
    output_compression: int | None = Field(None, ge=0, le=100)
    output_format: str | None = None
    frame_count: int | None = Field(None, ge=2, le=16)
    frame_duration_ms: int | None = Field(None, ge=1)


class ImageRequest(BaseModel):
    """What the rest of the pipeline sees: the operation, the path form, the Azure parts,
    and the body (JSON for generations, the text fields of the upload for the others).

    `input_images` is the most input images the request can carry (edits and variations):
    what their input is priced by before the upstream reports it.
    """

    model_config = ConfigDict(frozen=True)

    operation: ImageOperation = "generation"
    form: Form
    deployment: str | None = None
    api_version: str | None = None
    body: ImageGenerationBody | ImageFormBody
    input_images: int = 0
    # Its images go to the `[storage]` store: the upstream is asked for base64 whatever
    # the client's `response_format`, which the proxy answers itself.
    stored: bool = False

    def for_storage(self) -> ImageRequest:
        """This request with its images going to the store: the upstream asked for base64
        (`b64_json` where the model has a choice, DALL·E's; nothing for the others, which
        answer base64 only and may refuse the field)."""
        body = self.body
        if isinstance(body, ImageGenerationBody) and "response_format" in body.model_fields_set:
            fields = body.model_dump(exclude_unset=True, exclude={"response_format"})
            wanted = upstream_response_format(self.model)
            if wanted is not None:
                fields["response_format"] = wanted
            body = type(body).model_validate(fields)
        return self.model_copy(update={"body": body, "stored": True})

    @property
    def model(self) -> str | None:
        """The model asked for: the deployment, for the Azure form (it names the model)."""
        return self.deployment if self.deployment is not None else self.body.model

    @property
    def stream(self) -> bool:
        return self.body.stream is True

    @property
    def images(self) -> int:
        """How many images the request asks for (`n`, default 1)."""
        return self.body.n or 1

    @property
    def prompt(self) -> str:
        return self.body.prompt or ""

    @property
    def size(self) -> str | None:
        return self.body.size

    @property
    def quality(self) -> str | None:
        return self.body.quality

    @property
    def partial_images(self) -> int:
        """Partial images asked for: streamed only."""
        return (self.body.partial_images or 0) if self.stream else 0


def upstream_response_format(model: str | None) -> str | None:
    """What a stored request asks the upstream for: `b64_json` from DALL·E models (whose
    default is a URL of OpenAI's), nothing from the others (base64 is all they answer)."""
    return "b64_json" if model is not None and model.startswith("dall-e") else None


def header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return value  # type: ignore[no-any-return]
    return None


def is_json(content_type: bytes) -> bool:
    """Whether a Content-Type is JSON's (`application/json`, or a `+json` type)."""
    media = content_type.split(b";", 1)[0].strip().lower()
    return media == b"application/json" or media.endswith(b"+json")


def check_content_type(scope: Scope) -> None:
    if not is_json(header(scope, b"content-type") or b""):
        raise ProxyError(
            415,
            "Content-Type must be application/json.",
            code="unsupported_media_type",
        )


async def read_body(
    scope: Scope, receive: Receive, limit: int, within: float | None = None
) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed `limit`, and with
    408 if it has not all arrived `within` seconds."""
    declared = header(scope, b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large(limit)
    if within is None:
        return await _receive_body(receive, limit)
    # One timer rather than an `asyncio.timeout` scope, at a third of its cost per request.
    late = _Late()
    timer = asyncio.get_running_loop().call_later(within, late)
    try:
        return await _receive_body(receive, limit)
    except asyncio.CancelledError:
        if not late.fired or late.task.uncancel() > 0:
            raise  # not the timer's, or cancelled by someone else as well
    finally:
        timer.cancel()
    raise ProxyError(
        408,
        f"The request body did not arrive within {within:g} seconds.",
        code="request_timeout",
    )


class _Late:
    """A timer's callback that cancels the task that made it, and says it did."""

    __slots__ = ("fired", "task")

    def __init__(self) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.task, self.fired = task, False

    def __call__(self) -> None:
        self.fired = True
        self.task.cancel()


async def _receive_body(receive: Receive, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def parse_form(route: Route, fields: dict[str, str], input_images: int) -> ImageRequest:
    """The request an upload's text fields describe (`fields`, as `Upload.head` read them)."""
    try:
        body = ImageFormBody.model_validate(fields)
    except ValidationError as exc:
        raise _invalid(exc.errors(include_url=False, include_input=False)[0]) from None
    if route.operation == "edit" and body.prompt is None:
        raise _invalid({"type": "missing", "loc": ("prompt",), "msg": "", "input": None})
    assert route.operation in ("edit", "variation")
    check_animation(body)
    return ImageRequest(
        operation=route.operation,
        form=route.form,
        deployment=route.deployment,
        api_version=route.api_version,
        body=body,
        input_images=input_images,
    )


def parse_request(route: Route, raw: bytes) -> ImageRequest:
    try:
        body = ImageGenerationBody.model_validate_json(raw)
    except ValidationError as exc:
        raise _invalid(exc.errors(include_url=False, include_input=False)[0]) from None
    check_animation(body)
    return ImageRequest(
        form=route.form,
        deployment=route.deployment,
        api_version=route.api_version,
        body=body,
    )


def parse_json_edit(route: Route, skeleton: bytes, upload: JsonUpload) -> ImageRequest:
    """The request a JSON edit describes (`skeleton`, as `JsonUpload.read` left it): checked
    as a generation's body is, and its long strings only where images go."""
    try:
        body = ImageEditBody.model_validate_json(skeleton)
    except ValidationError as exc:
        raise _invalid(exc.errors(include_url=False, include_input=False)[0]) from None
    for path, spooled in upload.placeholders(body.model_dump(exclude_unset=True)):
        param = ".".join(str(part) for part in path)
        if path[-1:] != ("image_url",) or path[0] not in ("images", "mask"):
            raise ProxyError(
                400,
                f"Invalid value for '{param}': too long (only images may be longer than 256 KB).",
                param=param,
                code="string_above_max_length",
            )
        if spooled.characters > MAX_IMAGE_URL:
            raise ProxyError(
                400,
                f"Invalid value for '{param}': longer than {MAX_IMAGE_URL} characters.",
                param=param,
                code="string_above_max_length",
            )
    if body.model is not None and body.model.startswith("dall-e"):
        raise ProxyError(
            400,
            f"JSON edits are for GPT image models, not {body.model}: send its edits as "
            "multipart/form-data.",
            param="model",
            code="invalid_value",
        )
    check_animation(body, mask=body.mask is not None)
    return ImageRequest(
        operation="edit",
        form=route.form,
        deployment=route.deployment,
        api_version=route.api_version,
        body=body,
        input_images=len(body.images),
    )


def check_animation(body: ImageGenerationBody | ImageFormBody, *, mask: bool = False) -> None:
    """Refuse what an animated GIF (`output_format = "gif"`) cannot be made with: it is
    not streamed (no `stream`, no `partial_images`), is not an edit under a mask, and is
    not compressed. The upstream would refuse them too, after the request has waited in
    line and been counted; the proxy says so first."""
    if (body.output_format or "").lower() != "gif":
        return
    refused = [
        ("stream", body.stream is True, "GIFs are not streamed"),
        ("partial_images", bool(body.partial_images), "GIFs have no partial images"),
        ("mask", mask, "GIFs are not made with a mask"),
        ("output_compression", body.output_compression is not None, "GIFs are not compressed"),
    ]
    for param, sent, why in refused:
        if sent:
            raise gif_refusal(param, why)


_CODES = {
    "missing": "missing_required_parameter",
    "greater_than_equal": "integer_below_min_value",
    "less_than_equal": "integer_above_max_value",
    "string_too_short": "empty_string",
    # A form field's text that is not the number or boolean expected.
    "int_parsing": "invalid_type",
    "int_from_float": "invalid_type",
    "bool_parsing": "invalid_type",
}


def _invalid(error: ErrorDetails) -> ProxyError:
    kind, loc = error["type"], error["loc"]
    if kind == "json_invalid":
        return ProxyError(
            400,
            "We could not parse the JSON body of your request: expected a JSON object.",
            code="invalid_json",
        )
    if not loc:
        return ProxyError(400, "The request body must be a JSON object.", code="invalid_json")
    param = ".".join(str(part) for part in loc)
    if kind == "missing":
        message = f"Missing required parameter: '{param}'."
    else:
        message = f"Invalid value for '{param}': {error['msg']}."
    code = _CODES.get(kind, "invalid_type" if kind.endswith("_type") else "invalid_value")
    return ProxyError(400, message, param=param, code=code)
