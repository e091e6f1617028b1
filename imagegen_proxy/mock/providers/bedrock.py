"""Amazon Bedrock's `InvokeModel` for Nova Canvas and Titan Image Generator
(docs/providers.md §5).

Route: `POST /model/{modelId}/invoke`, the model id `amazon.nova-canvas-v1:0` or
`amazon.titan-image-generator-v{1,2}[:0]` (its colon often sent as `%3A`; ASGI's path is
decoded). Auth: SigV4 (`Authorization: AWS4-HMAC-SHA256 Credential=...` and `x-amz-date`),
service `bedrock`, any region; with the mock's `api_key` set, the signature is checked for
real against access key id `AKIAIMAGEGENPROXYMOCK` and secret `api_key` (see `sigv4`). A
Bedrock API key, `Authorization: Bearer`, is taken too: it must be `api_key` when one is set.

Bodies: `TEXT_IMAGE` (`textToImageParams.text`, optional `negativeText`) and `INPAINTING`
(`inPaintingParams.image` with `maskImage` or `maskPrompt`): the input tinted toward the
prompt's colour, at the input's size, the mask's black pixels (Nova's "change here") filled
with that colour. `imageGenerationConfig`: width and height 320 to 4096 in multiples of 16,
between 1:4 and 4:1, at most 4,194,304 pixels; 1 to 5 images; quality standard or premium;
cfgScale 1.1 to 10; seed 0 to 858,993,459. Nova's limits are applied to Titan alike. The
other task types are refused as not implemented by the mock. Errors are `{"message"}` with
their type in `x-amzn-errortype`; a wrong access key id is UnrecognizedClientException, as
bedrock-runtime answers it.
"""

from __future__ import annotations

import base64
import functools
import hmac
import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from ...types import Receive, Scope, Send
from ...wire.errors import ClientGone, ProxyError
from ...wire.request import header, read_body
from ..decode import Bitmap, decode_png, png_dimensions
from ..replies import JSON, Headers, after_delay, in_thread, respond
from .common import MAX_BODY, Handler, Settings, Studio, decode_base64, flagged, seed_of
from .sigv4 import SignatureError, parse_authorization, verify

_PATH = re.compile(r"/model/([^/]+)/invoke")
_MODEL_ID = re.compile(r"amazon\.(?:nova-canvas-v1:0|titan-image-generator-v[12](?::0)?)")
ACCESS_KEY_ID = "AKIAIMAGEGENPROXYMOCK"  # the shape of an AWS access key id
SERVICE = "bedrock"
TASK_TYPES = (
    "TEXT_IMAGE",
    "INPAINTING",
    "OUTPAINTING",
    "IMAGE_VARIATION",
    "COLOR_GUIDED_GENERATION",
    "BACKGROUND_REMOVAL",
)
IMPLEMENTED = ("TEXT_IMAGE", "INPAINTING")
MIN_SIDE, MAX_SIDE, MAX_PIXELS = 320, 4096, 4_194_304
MAX_TEXT = 1024
MAX_SEED = 858_993_459
MAX_IMAGES = 5
DEFAULT_SIDE = 1024
BEDROCK_NAMESPACE = ":http://internal.amazon.com/coral/com.amazon.bedrock/"
THROTTLED = (
    "Too many requests, please wait before trying again. You have sent too many requests."
    "  Wait before trying again."
)
# Mask pixel -> mask alpha: only pure black (all three channels 0) marks the area to change.
_BLACK_TO_HOLE = bytes((0,)) + b"\xff" * 255


class AwsError(Exception):
    """An AWS JSON-protocol error: `{"message"}` with `x-amzn-errortype: <kind>`. Those
    Bedrock itself raises name it as Bedrock does, followed by its service's namespace
    (`ValidationException:http://internal.amazon.com/coral/com.amazon.bedrock/`): a client
    reads the part before the colon."""

    def __init__(self, status: int, kind: str, message: str, *, bedrock: bool = True) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind + BEDROCK_NAMESPACE if bedrock else kind
        self.message = message


def _malformed(pointer: str, reason: str) -> AwsError:
    return AwsError(
        400,
        "ValidationException",
        f"Malformed input request: #/{pointer}: {reason}, please reformat your input and try"
        " again.",
    )


def _invalid(message: str) -> AwsError:
    return AwsError(400, "ValidationException", message)


@dataclass(frozen=True, slots=True)
class _Invocation:
    """A validated body: the prompt, the size and number of images, the seed of the first,
    and for INPAINTING the input image and its mask (None for `maskPrompt`)."""

    prompt: str
    width: int
    height: int
    count: int
    seed: int
    image: bytes | None = None
    mask: bytes | None = None


class Bedrock:
    """`InvokeModel` for Amazon's image models."""

    def __init__(self, settings: Settings, studio: Studio, api_key: str | None) -> None:
        self._settings = settings
        self._studio = studio
        self._secret = api_key

    def route(self, path: str) -> Handler | None:
        """The handler of a model's `invoke`."""
        match = _PATH.fullmatch(path)
        if match is None:
            return None
        model_id = match.group(1)

        async def handle(scope: Scope, receive: Receive, send: Send) -> None:
            await self._serve(scope, receive, send, model_id)

        return handle

    async def _serve(self, scope: Scope, receive: Receive, send: Send, model_id: str) -> None:
        request_id = str(uuid.uuid4()).encode()
        try:
            if scope["method"] != "POST":
                message = f"{scope['method']} is not supported here."
                raise AwsError(405, "UnknownOperationException", message, bedrock=False)
            bearer = self._pre_authorize(scope)
            try:
                body = await read_body(scope, receive, MAX_BODY)
            except ProxyError as exc:
                raise AwsError(exc.status, "ValidationException", exc.message) from None
            if not bearer:
                self._verify(scope, body)
            if not _MODEL_ID.fullmatch(model_id):
                raise _invalid("The provided model identifier is invalid.")
            invocation = _parse(body)
            if flagged(invocation.prompt, "forbidden"):
                raise _invalid("This request has been blocked by our content filters.")
            if flagged(invocation.prompt, "throttle"):
                raise AwsError(429, "ThrottlingException", THROTTLED)
        except ClientGone:
            return
        except (AwsError, SignatureError) as exc:
            payload = json.dumps({"message": exc.message}).encode()
            headers: Headers = [JSON, (b"x-amzn-requestid", request_id)]
            headers.append((b"x-amzn-errortype", exc.kind.encode()))
            await respond(send, exc.status, payload, headers)
            return

        async def answer() -> None:
            images = await self._render(invocation)
            body = b'{"images":["' + b'","'.join(images) + b'"]}'
            await respond(send, 200, body, [JSON, (b"x-amzn-requestid", request_id)])

        await after_delay(receive, self._settings.delay, answer)

    def _pre_authorize(self, scope: Scope) -> bool:
        """What can be checked before the body arrives: a SigV4 header and its date (403
        MissingAuthenticationTokenException otherwise), or a Bedrock API key. True for the
        API key, which needs no more checking."""
        given = header(scope, b"authorization") or b""
        if given.startswith(b"Bearer "):
            secret = self._secret
            if secret is not None and not hmac.compare_digest(given[7:], secret.encode()):
                raise AwsError(
                    403,
                    "AccessDeniedException",
                    "Authentication failed: Please make sure your API Key is valid.",
                    bedrock=False,
                )
            return True
        if not given.startswith(b"AWS4-HMAC-SHA256 Credential=") or not header(
            scope, b"x-amz-date"
        ):
            raise AwsError(
                403,
                "MissingAuthenticationTokenException",
                "Missing Authentication Token",
                bedrock=False,
            )
        return False

    def _verify(self, scope: Scope, body: bytes) -> None:
        """The SigV4 signature, recomputed with the mock's key (nothing to check without)."""
        if self._secret is None:
            return
        authorization = (header(scope, b"authorization") or b"").decode("latin-1")
        credential = parse_authorization(authorization)
        if credential.access_key != ACCESS_KEY_ID:
            raise AwsError(
                403,
                "UnrecognizedClientException",
                "The security token included in the request is invalid.",
                bedrock=False,
            )
        amz_date = (header(scope, b"x-amz-date") or b"").decode("latin-1")
        verify(scope, body, credential, secret=self._secret, service=SERVICE, amz_date=amz_date)

    async def _render(self, invocation: _Invocation) -> list[bytes]:
        """The images as base64 PNGs: image `i` is drawn with seed `seed + i`."""
        seeds = [invocation.seed + i for i in range(invocation.count)]
        width, height, prompt = invocation.width, invocation.height, invocation.prompt
        if invocation.image is None:
            return [self._studio.b64(prompt, width, height, seed) for seed in seeds]
        mask = (
            None
            if invocation.mask is None
            else await in_thread(functools.partial(_hole, invocation.mask))
        )
        images = []
        for i, seed in enumerate(seeds):
            edited = await self._studio.edit(
                invocation.image, prompt, width, height, mask=mask, index=i
            )
            if edited is None:
                images.append(self._studio.b64(prompt, width, height, seed))
            else:
                images.append(base64.b64encode(edited))
        return images


def _hole(mask: bytes | None) -> Bitmap | None:
    """Nova's black-and-white mask as the alpha mask `edit` reads: transparent where the
    pixel is pure black (change it), opaque elsewhere (keep it)."""
    bitmap = None if mask is None else decode_png(mask)
    if bitmap is None:
        return None
    rgba = bitmap.rgba
    size = len(rgba) // 4
    red, green, blue = (int.from_bytes(rgba[c::4], "little") for c in range(3))
    alpha = (red | green | blue).to_bytes(size, "little").translate(_BLACK_TO_HOLE)
    out = bytearray(len(rgba))
    out[3::4] = alpha
    return Bitmap(bitmap.width, bitmap.height, bytes(out))


def _parse(body: bytes) -> _Invocation:
    try:
        data: Any = json.loads(body)
    except (UnicodeDecodeError, ValueError):
        raise _invalid(
            "Malformed input request, please reformat your input and try again."
        ) from None
    if not isinstance(data, dict):
        raise _malformed("", "expected type: JSONObject, found: " + type(data).__name__)
    task = data.get("taskType")
    if task is None:
        raise _malformed("", "required key [taskType] not found")
    if task not in TASK_TYPES:
        raise _malformed("taskType", f"{task} is not a valid enum value")
    if task not in IMPLEMENTED:
        raise _invalid(f"The mock implements taskType TEXT_IMAGE and INPAINTING only, not {task}.")
    config = _config(data.get("imageGenerationConfig"))
    if task == "TEXT_IMAGE":
        params = _params(data, "textToImageParams")
        prompt = _text(params, "textToImageParams", "text", required=True)
        _text(params, "textToImageParams", "negativeText")
        width, height = config["width"], config["height"]
        _check_size(width, height)
        seed = seed_of(prompt) if config["seed"] is None else config["seed"]
        return _Invocation(prompt, width, height, config["count"], seed)
    params = _params(data, "inPaintingParams")
    image = _image(params, "image", required=True)
    assert image is not None
    mask = _image(params, "maskImage")
    mask_prompt = _text(params, "inPaintingParams", "maskPrompt")
    if (mask is None) == (mask_prompt == ""):
        raise _invalid("Exactly one of maskImage and maskPrompt must be given for INPAINTING.")
    prompt = _text(params, "inPaintingParams", "text") or mask_prompt
    _text(params, "inPaintingParams", "negativeText")
    width, height = png_dimensions(image) or (DEFAULT_SIDE, DEFAULT_SIDE)
    width, height = min(width, MAX_SIDE), min(height, MAX_SIDE)
    seed = seed_of(prompt) if config["seed"] is None else config["seed"]
    return _Invocation(prompt, width, height, config["count"], seed, image=image, mask=mask)


def _params(data: dict[str, Any], name: str) -> dict[str, Any]:
    params = data.get(name)
    if params is None:
        raise _malformed("", f"required key [{name}] not found")
    if not isinstance(params, dict):
        raise _malformed(name, "expected type: JSONObject")
    return params


def _text(params: dict[str, Any], where: str, name: str, *, required: bool = False) -> str:
    """A text field, 1 to 1024 characters; "" when absent and not required."""
    value = params.get(name)
    if value is None:
        if required:
            raise _malformed(where, f"required key [{name}] not found")
        return ""
    if not isinstance(value, str):
        raise _malformed(f"{where}/{name}", "expected type: String")
    if not 1 <= len(value) <= MAX_TEXT:
        raise _malformed(
            f"{where}/{name}",
            f"expected minLength: 1 and maxLength: {MAX_TEXT}, actual: {len(value)}",
        )
    return value


def _image(params: dict[str, Any], name: str, *, required: bool = False) -> bytes | None:
    value = params.get(name)
    if value is None:
        if required:
            raise _malformed("inPaintingParams", f"required key [{name}] not found")
        return None
    decoded = decode_base64(value)
    if decoded is None or not decoded:
        raise _invalid(f"The image in inPaintingParams.{name} is not valid base64.")
    return decoded


def _config(config: Any) -> dict[str, Any]:
    """imageGenerationConfig's size, number of images and seed (None when unset), the
    other fields checked and dropped."""
    if config is None:
        config = {}
    if not isinstance(config, dict):
        raise _malformed("imageGenerationConfig", "expected type: JSONObject")
    where = "imageGenerationConfig"
    width = _number(config, where, "width", MIN_SIDE, MAX_SIDE, DEFAULT_SIDE, integer=True)
    height = _number(config, where, "height", MIN_SIDE, MAX_SIDE, DEFAULT_SIDE, integer=True)
    count = _number(config, where, "numberOfImages", 1, MAX_IMAGES, 1, integer=True)
    seed = _number(config, where, "seed", 0, MAX_SEED, -1, integer=True)
    _number(config, where, "cfgScale", 1.1, 10, 6.5, integer=False)
    quality = config.get("quality", "standard")
    if quality not in ("standard", "premium"):
        raise _malformed(f"{where}/quality", f"{quality} is not a valid enum value")
    return {
        "width": int(width),
        "height": int(height),
        "count": int(count),
        "seed": None if seed < 0 else int(seed),
    }


def _number(
    config: dict[str, Any],
    where: str,
    name: str,
    low: float,
    high: float,
    default: float,
    *,
    integer: bool,
) -> float:
    value = config.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _malformed(f"{where}/{name}", "expected type: Number")
    if integer and not float(value).is_integer():
        raise _malformed(f"{where}/{name}", "expected type: Integer, found: Number")
    if value < low:
        raise _malformed(f"{where}/{name}", f"{value} is not greater or equal to {low:g}")
    if value > high:
        raise _malformed(f"{where}/{name}", f"{value} is not less or equal to {high:g}")
    return float(value)


def _check_size(width: int, height: int) -> None:
    if width % 16 or height % 16:
        raise _invalid(f"The width and height must be multiples of 16, not {width}x{height}.")
    if not 1 / 4 <= width / height <= 4:
        raise _invalid(f"The aspect ratio must be between 1:4 and 4:1, not {width}x{height}.")
    if width * height > MAX_PIXELS:
        raise _invalid(f"The image must have at most {MAX_PIXELS} pixels, not {width}x{height}.")
