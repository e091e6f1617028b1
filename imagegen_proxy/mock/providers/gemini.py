"""Google's Gemini image models over `generateContent`, as the Gemini API and Vertex AI serve
them (docs/providers.md §1).

Routes: `POST /{v1,v1beta,v1alpha}/models/{model}:generateContent` (the Gemini API; the key in
`x-goog-api-key` or the `key` query parameter) and `POST /{v1,v1beta1}/projects/{p}/locations/
{l}/publishers/google/models/{model}:generateContent` (Vertex; `Authorization: Bearer`). Other
methods of a model (`:countTokens`, `:streamGenerateContent`) are 404.

Sizes: `imageSize` 1K is about 1024x1024 pixels in the requested ratio, each side a multiple of
16 (3:2 is 1248x832); 2K doubles the sides, 4K quadruples them, and the mock then renders at
most 2048 a side (4K 1:1 is 2048x2048, 2K 16:9 is 2048x1152) to stay cheap. Image tokens
follow the per-image prices of gemini-3.1-flash-image at $60 a million (512: 750, 1K: 1120,
2K: 1680, 4K: 2520); gemini-2.5-flash-image counts 1290 an image. Google writes JPEG by
default; the mock writes PNG and says so in `mimeType`.
"""

from __future__ import annotations

import base64
import hmac
import json
import os
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

from ...types import Receive, Scope, Send
from ...wire.errors import ClientGone, ProxyError
from ...wire.request import header, read_body
from ..replies import after_delay, respond
from .common import (
    MAX_BODY,
    Handler,
    Settings,
    Studio,
    decode_base64,
    fit,
    flagged,
    parse_ratio,
    ratio_size,
)

_GEMINI_PATH = re.compile(r"/(?:v1|v1alpha|v1beta)/models/([^/:]+):([A-Za-z]+)")
_VERTEX_PATH = re.compile(
    r"/(?:v1|v1beta1)/projects/[^/]+/locations/[^/]+/publishers/google/models/([^/:]+):([A-Za-z]+)"
)
# The SDK's list and Vertex's 4:5 and 5:4; gemini-3.1-flash-image also takes the extremes.
ASPECT_RATIOS = ("1:1", "2:3", "3:2", "3:4", "4:3", "4:5", "5:4", "9:16", "16:9", "21:9")
EXTREME_RATIOS = ("1:4", "4:1", "1:8", "8:1")
SIDES = {"512": 512, "1K": 1024, "2K": 2048, "4K": 4096}
IMAGE_TOKENS = {"512": 750, "1K": 1120, "2K": 1680, "4K": 2520}
FLASH_25_IMAGE_TOKENS = 1290
MAX_RENDER_SIDE = 2048
MODALITIES = ("TEXT", "IMAGE", "AUDIO")
IMAGE_TEXT = "Here is your image."

_CONTENT_TYPE = (b"content-type", b"application/json; charset=UTF-8")


class GoogleError(Exception):
    """An answer in Google's error shape: `{"error": {"code", "message", "status"}}`."""

    def __init__(
        self, code: int, status: str, message: str, details: list[dict[str, Any]] | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.status = status
        self.message = message
        self.details = details

    def body(self) -> bytes:
        error: dict[str, Any] = {"code": self.code, "message": self.message, "status": self.status}
        if self.details is not None:
            error["details"] = self.details
        return json.dumps({"error": error}).encode()


def _invalid(message: str) -> GoogleError:
    return GoogleError(400, "INVALID_ARGUMENT", message)


@dataclass(frozen=True, slots=True)
class _Request:
    """A validated `generateContent` request: the prompt (the user's text parts joined),
    the input images, whether an image and a text are wanted, and the image's size."""

    model: str
    prompt: str
    images: list[bytes]
    image: bool
    text: bool
    width: int
    height: int
    image_size: str


class Gemini:
    """The Gemini API's and Vertex AI's `generateContent` for image models."""

    def __init__(self, settings: Settings, studio: Studio, api_key: str | None) -> None:
        self._settings = settings
        self._studio = studio
        self._key = None if api_key is None else api_key.encode()
        self._bearer = None if api_key is None else b"Bearer " + api_key.encode()

    def route(self, path: str) -> Handler | None:
        """The handler of `path` if it is a model's method on either API."""
        vertex = False
        match = _GEMINI_PATH.fullmatch(path)
        if match is None:
            vertex = True
            match = _VERTEX_PATH.fullmatch(path)
        if match is None:
            return None
        model, method = match.group(1), match.group(2)

        async def handle(scope: Scope, receive: Receive, send: Send) -> None:
            await self._serve(scope, receive, send, model, method, vertex)

        return handle

    async def _serve(
        self, scope: Scope, receive: Receive, send: Send, model: str, method: str, vertex: bool
    ) -> None:
        try:
            self._authorize(scope, vertex)
            if method != "generateContent" or scope["method"] != "POST":
                # Google's REST front answers an unknown method, or a verb a method does not
                # take, as a path it does not know.
                raise GoogleError(
                    404, "NOT_FOUND", f"Method not found: {scope['method']} {method}."
                )
            try:
                body = await read_body(scope, receive, MAX_BODY)
            except ProxyError as exc:
                raise _invalid(exc.message) from None
            request = _parse(model, body)
        except ClientGone:
            return
        except GoogleError as exc:
            await respond(send, exc.code, exc.body(), [_CONTENT_TYPE])
            return
        if flagged(request.prompt, "forbidden"):
            # A prompt Google blocks: 200, no candidates, the reason in promptFeedback.
            payload = {
                "promptFeedback": {"blockReason": "PROHIBITED_CONTENT"},
                "usageMetadata": _usage(_prompt_tokens(request), 0, None),
                "modelVersion": model,
                "responseId": _response_id(),
            }
            await respond(send, 200, json.dumps(payload).encode(), [_CONTENT_TYPE])
            return

        async def answer() -> None:
            await respond(send, 200, await self._answer(request), [_CONTENT_TYPE])

        await after_delay(receive, self._settings.delay, answer)

    def _authorize(self, scope: Scope, vertex: bool) -> None:
        """Vertex wants its bearer token (401 otherwise); the Gemini API its key, in the
        header or the `key` query parameter: none is 403, a wrong one 400 API_KEY_INVALID,
        as Google answers them."""
        if vertex:
            if self._bearer is None:
                return
            given = header(scope, b"authorization")
            if given is None or not hmac.compare_digest(given, self._bearer):
                raise GoogleError(
                    401,
                    "UNAUTHENTICATED",
                    "Request had invalid authentication credentials. Expected OAuth 2 access"
                    " token, login cookie or other valid authentication credential.",
                )
            return
        if self._key is None:
            return
        key = header(scope, b"x-goog-api-key")
        if key is None:
            query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
            key = query["key"][0].encode() if query.get("key") else None
        if key is None:
            raise GoogleError(
                403,
                "PERMISSION_DENIED",
                "Method doesn't allow unregistered callers (callers without established"
                " identity). Please use API Key or other form of API consumer identity to call"
                " this API.",
            )
        if not hmac.compare_digest(key, self._key):
            raise GoogleError(
                400,
                "INVALID_ARGUMENT",
                "API key not valid. Please pass a valid API key.",
                [
                    {
                        "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                        "reason": "API_KEY_INVALID",
                        "domain": "googleapis.com",
                        "metadata": {"service": "generativelanguage.googleapis.com"},
                    },
                    {
                        "@type": "type.googleapis.com/google.rpc.LocalizedMessage",
                        "locale": "en-US",
                        "message": "API key not valid. Please pass a valid API key.",
                    },
                ],
            )

    async def _answer(self, request: _Request) -> bytes:
        prompt_tokens = _prompt_tokens(request)
        head = b'{"candidates":[{'
        tail = b',"index":0}],"usageMetadata":'
        if not request.image:
            # Text only, as asked: a description of the picture it would have drawn.
            text = f"An image of: {request.prompt}"
            text_tokens = len(text.encode("utf-8", "surrogatepass")) // 4 + 1
            parts = json.dumps([{"text": text}]).encode()
            candidate = b'"content":{"role":"model","parts":' + parts + b'},"finishReason":"STOP"'
            usage = _usage(prompt_tokens, text_tokens, "TEXT")
        elif flagged(request.prompt, "unsafe"):
            # The image was made, then withheld: no content, IMAGE_SAFETY.
            candidate = b'"finishReason":"IMAGE_SAFETY"'
            usage = _usage(prompt_tokens, 0, None)
        else:
            first = request.images[0] if request.images else None
            png = await self._studio.edit_or_render(
                first, request.prompt, request.width, request.height
            )
            parts = b'[{"text":"%s"},' % IMAGE_TEXT.encode() if request.text else b"["
            parts += b'{"inlineData":{"mimeType":"image/png","data":"'
            parts += base64.b64encode(png) + b'"}}]'
            candidate = b'"content":{"role":"model","parts":' + parts + b'},"finishReason":"STOP"'
            usage = _usage(prompt_tokens, _image_tokens(request), "IMAGE")
        ending = {"modelVersion": request.model, "responseId": _response_id()}
        return b"".join(
            (
                head,
                candidate,
                tail,
                json.dumps(usage).encode(),
                b",",
                json.dumps(ending)[1:].encode(),
            )
        )


def _usage(prompt: int, candidates: int, modality: str | None) -> dict[str, Any]:
    usage: dict[str, Any] = {"promptTokenCount": prompt}
    if modality is not None:
        usage["candidatesTokenCount"] = candidates
    usage["totalTokenCount"] = prompt + candidates
    if modality is not None:
        usage["candidatesTokensDetails"] = [{"modality": modality, "tokenCount": candidates}]
    return usage


def _prompt_tokens(request: _Request) -> int:
    """About a token per four bytes of prompt, at least one."""
    return len(request.prompt.encode("utf-8", "surrogatepass")) // 4 + 1


def _image_tokens(request: _Request) -> int:
    if "gemini-2.5-flash-image" in request.model:
        return FLASH_25_IMAGE_TOKENS
    return IMAGE_TOKENS[request.image_size]


def _response_id() -> str:
    return base64.urlsafe_b64encode(os.urandom(16)).decode().rstrip("=")


def _get(data: dict[str, Any], camel: str, snake: str) -> Any:
    """A field by its JSON name or its proto name: Google's JSON reads both."""
    value = data.get(camel)
    return data.get(snake) if value is None else value


def _parse(model: str, body: bytes) -> _Request:
    try:
        data: Any = json.loads(body)
    except (UnicodeDecodeError, ValueError):
        raise _invalid("Invalid JSON payload received. Unexpected token.") from None
    if not isinstance(data, dict):
        raise _invalid("Invalid JSON payload received. Expected an object.")
    prompt, images = _contents(data.get("contents"))
    config = _object(_get(data, "generationConfig", "generation_config"), "generation_config")
    modalities = _modalities(_get(config, "responseModalities", "response_modalities"))
    image_config = _object(_get(config, "imageConfig", "image_config"), "image_config")
    wants_image = "IMAGE" in modalities
    if wants_image and "image" not in model:
        raise _invalid("Model does not support the requested response modalities: image")
    ratio_name = _get(image_config, "aspectRatio", "aspect_ratio")
    ratio_name = "1:1" if ratio_name is None else ratio_name
    ratios = ASPECT_RATIOS + (EXTREME_RATIOS if "3.1-flash-image" in model else ())
    ratio = parse_ratio(ratio_name)
    if ratio_name not in ratios or ratio is None:
        raise _invalid(
            f"Unsupported aspect ratio {json.dumps(ratio_name)} for {model}; supported:"
            f" {', '.join(ratios)}."
        )
    size = _get(image_config, "imageSize", "image_size")
    size = "1K" if size is None else size
    sizes = ["1K", "2K", "4K"] + (["512"] if "3.1-flash-image" in model else [])
    if size not in sizes:
        raise _invalid(
            f"Unsupported image size {json.dumps(size)} for {model}; supported: {', '.join(sizes)}."
        )
    side = SIDES[size]
    width, height = fit(*ratio_size(ratio, side * side), MAX_RENDER_SIDE)
    return _Request(
        model=model,
        prompt=prompt,
        images=images,
        image=wants_image,
        text="TEXT" in modalities,
        width=width,
        height=height,
        image_size=size,
    )


def _modalities(value: Any) -> tuple[str, ...]:
    """The modalities asked for; unset (or empty), text and image, as image models answer."""
    if not value:
        return ("TEXT", "IMAGE")
    if not isinstance(value, list):
        raise _invalid(
            "Invalid JSON payload received. Invalid value at"
            " 'generation_config.response_modalities': not a list."
        )
    for i, modality in enumerate(value):
        if modality not in MODALITIES:
            raise _invalid(
                f"Invalid value at 'generation_config.response_modalities[{i}]'"
                " (type.googleapis.com/google.ai.generativelanguage.v1beta.GenerationConfig"
                f".Modality), {json.dumps(modality)}"
            )
    return tuple(value)


def _object(value: Any, name: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _invalid(f"Invalid JSON payload received. Invalid value at '{name}': not an object.")
    return value


def _contents(contents: Any) -> tuple[str, list[bytes]]:
    """The user's text parts joined by new lines, and their images decoded (turns the model
    spoke are context, not prompt)."""
    if not contents:
        raise _invalid("* GenerateContentRequest.contents: contents is not specified\n")
    if not isinstance(contents, list):
        raise _invalid("Invalid JSON payload received. Invalid value at 'contents': not a list.")
    texts: list[str] = []
    images: list[bytes] = []
    for i, content in enumerate(contents):
        if not isinstance(content, dict):
            raise _invalid(f"Invalid JSON payload received. Invalid value at 'contents[{i}]'.")
        parts = content.get("parts")
        if not isinstance(parts, list) or not parts:
            raise _invalid(
                f"* GenerateContentRequest.contents[{i}].parts: contents.parts must not be empty.\n"
            )
        user = content.get("role", "user") != "model"
        for j, part in enumerate(parts):
            where = f"contents[{i}].parts[{j}]"
            if not isinstance(part, dict):
                raise _invalid(f"Invalid JSON payload received. Invalid value at '{where}'.")
            text = part.get("text")
            inline = _get(part, "inlineData", "inline_data")
            if text is not None:
                if not isinstance(text, str):
                    raise _invalid(f"Invalid value at '{where}.text' (TYPE_STRING), {text}")
                if user:
                    texts.append(text)
            elif inline is not None:
                image = _inline(inline, where)
                if user:
                    images.append(image)
            elif _get(part, "fileData", "file_data") is None:
                raise _invalid(
                    f"* GenerateContentRequest.{where}.data: required oneof field 'data' must"
                    " have one initialized field\n"
                )
    return "\n".join(texts), images


def _inline(inline: Any, where: str) -> bytes:
    if not isinstance(inline, dict):
        raise _invalid(f"Invalid JSON payload received. Invalid value at '{where}.inline_data'.")
    mime = _get(inline, "mimeType", "mime_type")
    if not isinstance(mime, str) or not mime:
        raise _invalid(f"* GenerateContentRequest.{where}.inline_data.mime_type: required\n")
    data = inline.get("data")
    decoded = decode_base64(data)
    if decoded is None:
        shown = data if isinstance(data, str) and len(data) <= 64 else "..."
        raise _invalid(
            f"Invalid value at '{where}.inline_data.data' (TYPE_BYTES), Base64 decoding failed"
            f' for "{shown}"'
        )
    return decoded
