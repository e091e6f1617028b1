"""Stability AI's Stable Image v2beta generate endpoints, synchronous and multipart
(docs/providers.md §4).

Routes: `POST /v2beta/stable-image/generate/{ultra,core,sd3}` with `Authorization: Bearer`.
The form's `prompt` is required; `aspect_ratio` picks one of the about-1-megapixel sizes
below; `image` (a PNG the mock reads) with `strength` is image-to-image: the input tinted
toward the prompt's colour, at its own size (at most 2048 a side). `accept: application/json`
answers base64 JSON; `image/*` (also unset or `*/*`) the bytes, with the `finish-reason` and
`seed` headers.

The mock writes PNG only. `output_format` png (the default) is answered; jpeg and webp,
which Stability writes, are refused with a 400 saying the mock cannot encode them, rather
than labelled as what they are not.
"""

from __future__ import annotations

import base64
import hmac
import json
import os
import re

from ...types import Receive, Scope, Send
from ...wire.errors import ClientGone, ProxyError
from ...wire.request import header
from ..decode import png_dimensions
from ..form import Form, read_form
from ..replies import JSON, Headers, after_delay, respond
from .common import MAX_BODY, Handler, Settings, Studio, fit, flagged, seed_of

_PATH = re.compile(r"/v2beta/stable-image/generate/(ultra|core|sd3)")
SIZES = {
    "16:9": (1344, 768),
    "1:1": (1024, 1024),
    "21:9": (1536, 640),
    "2:3": (832, 1216),
    "3:2": (1216, 832),
    "4:5": (896, 1120),
    "5:4": (1120, 896),
    "9:16": (768, 1344),
    "9:21": (640, 1536),
}
OUTPUT_FORMATS = ("jpeg", "png", "webp")
SD3_MODELS = (
    "sd3.5-large",
    "sd3.5-large-turbo",
    "sd3.5-medium",
    "sd3-large",
    "sd3-large-turbo",
    "sd3-medium",
)
MODES = ("text-to-image", "image-to-image")
MAX_PROMPT = 10_000
MAX_SEED = 4_294_967_294
MAX_IMAGE_SIDE = 2048
MODERATION_MESSAGE = (
    "Your request was flagged by our content moderation system, as a result your request was"
    " denied and you were not charged."
)
_SEED = re.compile(r"\s*\d{1,10}\s*")
_NUMBER = re.compile(r"\s*(\d+(\.\d*)?|\.\d+)\s*")


class StabilityError(Exception):
    """An answer in Stability's error shape: `{"id", "name", "errors": [...]}`."""

    def __init__(self, status: int, name: str, errors: list[str]) -> None:
        super().__init__("; ".join(errors))
        self.status = status
        self.name = name
        self.errors = errors

    def body(self) -> bytes:
        payload = {"id": os.urandom(16).hex(), "name": self.name, "errors": self.errors}
        return json.dumps(payload).encode()


class Stability:
    """Stable Image Ultra, Core and SD3 generation."""

    def __init__(self, settings: Settings, studio: Studio, api_key: str | None) -> None:
        self._settings = settings
        self._studio = studio
        self._bearer = None if api_key is None else b"Bearer " + api_key.encode()

    def route(self, path: str) -> Handler | None:
        """The handler of one of the generate endpoints."""
        match = _PATH.fullmatch(path)
        if match is None:
            return None
        service = match.group(1)

        async def handle(scope: Scope, receive: Receive, send: Send) -> None:
            await self._serve(scope, receive, send, service)

        return handle

    async def _serve(self, scope: Scope, receive: Receive, send: Send, service: str) -> None:
        request_id = os.urandom(16).hex().encode()
        try:
            if scope["method"] != "POST":
                raise StabilityError(405, "method_not_allowed", ["method: must be POST"])
            self._authorize(scope)
            as_json = _wants_json(header(scope, b"accept"))
            try:
                form = await read_form(scope, receive, MAX_BODY)
            except ProxyError as exc:
                if exc.status == 415:
                    raise StabilityError(
                        400, "bad_request", ["content-type: must be multipart/form-data"]
                    ) from None
                name = "payload_too_large" if exc.status == 413 else "bad_request"
                raise StabilityError(exc.status, name, [exc.message]) from None
            prompt, seed, width, height, image = _parse(service, form)
            if flagged(prompt, "forbidden"):
                raise StabilityError(403, "content_moderation", [MODERATION_MESSAGE])
        except ClientGone:
            return
        except StabilityError as exc:
            headers: Headers = [JSON, (b"x-request-id", request_id)]
            if exc.status == 405:
                headers.append((b"allow", b"POST"))
            await respond(send, exc.status, exc.body(), headers)
            return
        finish = b"CONTENT_FILTERED" if flagged(prompt, "unsafe") else b"SUCCESS"

        async def answer() -> None:
            png = await self._studio.edit_or_render(image, prompt, width, height, seed)
            headers: Headers = [(b"x-request-id", request_id)]
            if as_json:
                body = b'{"image":"%s","finish_reason":"%s","seed":%d}' % (
                    base64.b64encode(png),
                    finish,
                    seed,
                )
                headers.append((b"content-type", b"application/json; type=image/png"))
            else:
                body = png
                headers.append((b"content-type", b"image/png"))
                headers += [(b"finish-reason", finish), (b"seed", b"%d" % seed)]
            await respond(send, 200, body, headers)

        await after_delay(receive, self._settings.delay, answer)

    def _authorize(self, scope: Scope) -> None:
        if self._bearer is None:
            return
        given = header(scope, b"authorization")
        if given is None:
            raise StabilityError(401, "unauthorized", ["authorization: missing the Bearer key"])
        if not hmac.compare_digest(given, self._bearer):
            raise StabilityError(401, "unauthorized", ["authorization: the API key is not valid"])


def _wants_json(accept: bytes | None) -> bool:
    """JSON for `application/json`; the image for `image/*`, `*/*` or no accept header."""
    if accept is None:
        return False
    media = accept.decode("latin-1").lower()
    if "application/json" in media:
        return True
    if "image/" in media or "*/*" in media:
        return False
    raise StabilityError(400, "bad_request", ["accept: must be image/* or application/json"])


def _parse(service: str, form: Form) -> tuple[str, int, int, int, bytes | None]:
    """The prompt, seed, output size and input image of a generate form; StabilityError
    (400) listing every field that is wrong."""
    fields = form.fields
    errors: list[str] = []
    prompt = fields.get("prompt")
    if prompt is None or not prompt:
        errors.append("prompt: is required and must be 1 to 10000 characters")
    elif len(prompt) > MAX_PROMPT:
        errors.append(f"prompt: must be at most {MAX_PROMPT} characters")
    negative = fields.get("negative_prompt")
    if negative is not None and len(negative) > MAX_PROMPT:
        errors.append(f"negative_prompt: must be at most {MAX_PROMPT} characters")
    ratio = fields.get("aspect_ratio", "1:1")
    if ratio not in SIZES:
        errors.append(f"aspect_ratio: must be one of {', '.join(SIZES)}")
    output_format = fields.get("output_format", "png")
    if output_format not in OUTPUT_FORMATS:
        errors.append(f"output_format: must be one of {', '.join(OUTPUT_FORMATS)}")
    elif output_format != "png":
        errors.append(f"output_format: this mock writes png only and cannot encode {output_format}")
    seed_text = fields.get("seed")
    seed = 0
    if seed_text is not None:
        if _SEED.fullmatch(seed_text) and int(seed_text) <= MAX_SEED:
            seed = int(seed_text)
        else:
            errors.append(f"seed: must be an integer from 0 to {MAX_SEED}")
    images = form.files.get("image", [])
    image = images[0] if images else None
    strength_text = fields.get("strength")
    if strength_text is not None and not (
        _NUMBER.fullmatch(strength_text) and float(strength_text) <= 1
    ):
        errors.append("strength: must be a number from 0 to 1")
    if service == "sd3":
        model = fields.get("model", "sd3.5-large")
        if model not in SD3_MODELS:
            errors.append(f"model: must be one of {', '.join(SD3_MODELS)}")
        mode = fields.get("mode", "text-to-image")
        if mode not in MODES:
            errors.append(f"mode: must be one of {', '.join(MODES)}")
        elif mode == "image-to-image" and image is None:
            errors.append("image: is required in image-to-image mode")
        elif mode == "text-to-image":
            image = None  # sd3 draws from the prompt alone unless asked otherwise
    if image is not None and strength_text is None:
        errors.append("strength: is required when an image is given")
    if errors:
        raise StabilityError(400, "bad_request", errors)
    assert prompt is not None
    width, height = SIZES[ratio]
    if image is not None:
        dimensions = png_dimensions(image)
        if dimensions is not None:
            width, height = fit(*dimensions, MAX_IMAGE_SIDE, multiple=1)
    return prompt, seed or seed_of(prompt), width, height, image
