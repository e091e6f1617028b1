"""Request validation: JSON bodies, and the forms of edits and variations (the bytes of the
answers are in `answers`)."""

from __future__ import annotations

import base64
import json
import math
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from ..wire.errors import ProxyError
from .decode import png_dimensions
from .form import Form
from .png import DEFAULT_SIZE, MAX_SIDE, parse_size

MAX_IMAGES = 10
MAX_PARTIAL_IMAGES = 3
MAX_INPUT_IMAGES = 16  # as many as OpenAI's GPT image models take in one edit
# A rough but deterministic per-image figure; callers only need a stable, plausible number.
OUTPUT_TOKENS_PER_IMAGE = 272
# Animated GIFs (gpt-image-2.6): 2 to 16 frames, by default 9 shown 200 ms each (OpenAI's
# Codex image tool). No bound on a frame's time is published: a GIF holds at most 655.35 s,
# and a longer one is shown that long.
DEFAULT_FRAMES, MAX_FRAMES = 9, 16
DEFAULT_FRAME_MS, MAX_FRAME_MS = 200, math.inf
_MEDIA_TYPES = {"png": b"image/png", "gif": b"image/gif", "svg": b"image/svg+xml"}
# A JSON edit's image given by file id or URL, which the mock cannot read: what it counts.
REFERENCED_IMAGE_TOKENS = 581


@dataclass(frozen=True, slots=True)
class Generation:
    """The validated parameters of one image-generation request."""

    prompt: str
    n: int
    width: int
    height: int
    quality: str
    stream: bool
    partial_images: int
    as_url: bool
    # Edits only: what the input images count for in usage, and the SSE events' names.
    image_tokens: int = 0
    events: bytes = b"image_generation"
    # "png" (also for jpeg and webp, which the mock does not write), "gif" or "svg"; a GIF's
    # frames, and how long each is shown.
    output_format: str = "png"
    frames: int = DEFAULT_FRAMES
    frame_ms: int = DEFAULT_FRAME_MS

    @property
    def media_type(self) -> bytes:
        return _MEDIA_TYPES[self.output_format]

    @property
    def still(self) -> bool:
        """Whether the image comes whole, never in partial images (GIF and SVG)."""
        return self.output_format != "png"

    @property
    def size(self) -> str:
        return f"{self.width}x{self.height}"

    @property
    def input_tokens(self) -> int:
        """The prompt's text tokens, roughly: one a word."""
        return max(len(self.prompt.split()), 1)


@dataclass(frozen=True, slots=True)
class Edit:
    """A validated edit or variation: the answer's parameters, the image to edit (the first
    one sent) and the mask. A variation has no prompt (""), and never streams."""

    gen: Generation
    image: bytes
    mask: bytes | None


def parse_generation(body: bytes) -> Generation:
    """Validate a generations request body; raise ProxyError (400) when it is unusable."""
    data = _json_object(body)
    prompt = _prompt(data.get("prompt"))
    size = data.get("size")
    width, height = parse_size(size if isinstance(size, str) else None)
    return _generation(data, prompt, width, height)


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        data: Any = json.loads(body)
    except (UnicodeDecodeError, ValueError):
        raise ProxyError(
            400,
            "We could not parse the JSON body of your request. The request body must be valid"
            " JSON.",
            code="invalid_json",
        ) from None
    if not isinstance(data, dict):
        raise ProxyError(400, "The request body must be a JSON object.", code="invalid_type")
    return data


def _generation(
    data: dict[str, Any], prompt: str, width: int, height: int, **extra: Any
) -> Generation:
    """The parameters a generation and an edit share, checked alike."""
    output_format = data.get("output_format")
    if output_format is not None and not isinstance(output_format, str):
        raise ProxyError(
            400,
            "Invalid type for 'output_format': expected a string.",
            param="output_format",
            code="invalid_type",
        )
    return Generation(
        prompt=prompt,
        n=_int_field(data, "n", 1, 1, MAX_IMAGES),
        width=width,
        height=height,
        quality=_quality(data.get("quality")),
        stream=_bool_field(data, "stream"),
        partial_images=_int_field(data, "partial_images", 0, 0, MAX_PARTIAL_IMAGES),
        as_url=data.get("response_format") == "url",
        output_format=output_format if output_format in ("gif", "svg") else "png",
        frames=_int_field(data, "frame_count", DEFAULT_FRAMES, 2, MAX_FRAMES),
        frame_ms=_int_field(data, "frame_duration_ms", DEFAULT_FRAME_MS, 1, MAX_FRAME_MS),
        **extra,
    )


def parse_edit(form: Form) -> Edit:
    """Validate an edits form (the text fields are strings: "2", "true"); ProxyError (400)
    when it is unusable. `size` defaults to the first image's (each side at most 4096);
    1024x1024 when that image is no PNG."""
    data = _typed(form.fields)
    prompt = _prompt(data.get("prompt"))
    images = _images(form)
    if len(images) > MAX_INPUT_IMAGES:
        raise ProxyError(
            400,
            f"Invalid 'image': expected at most {MAX_INPUT_IMAGES} images, got {len(images)}.",
            param="image",
            code="invalid_value",
        )
    size = data.get("size")
    if size is None or size == "auto":
        width, height = png_dimensions(images[0]) or DEFAULT_SIZE
        width, height = min(width, MAX_SIDE), min(height, MAX_SIDE)
    else:
        width, height = parse_size(size)
    gen = _generation(
        data,
        prompt,
        width,
        height,
        image_tokens=sum(image_tokens(image) for image in images),
        events=b"image_edit",
    )
    masks = form.files.get("mask")
    return Edit(gen, images[0], masks[0] if masks else None)


def parse_json_edit(body: bytes) -> Edit:
    """Validate an edit's JSON body (`images`: 1 to 16 of `{"image_url"}` or `{"file_id"}`,
    and `mask` likewise); ProxyError (400) when it is unusable. The first image and the
    mask are read when they are base64 data URLs; an image by file id or URL, which the mock
    cannot fetch, is the generated picture of the prompt."""
    data = _json_object(body)
    prompt = _prompt(data.get("prompt"))
    refs = data.get("images")
    if refs is None:
        raise ProxyError(
            400,
            "Missing required parameter: 'images'.",
            param="images",
            code="missing_required_parameter",
        )
    if not isinstance(refs, list) or not 1 <= len(refs) <= MAX_INPUT_IMAGES:
        raise ProxyError(
            400,
            f"Invalid 'images': expected an array of 1 to {MAX_INPUT_IMAGES} images.",
            param="images",
            code="invalid_value",
        )
    images = [_image_ref(ref, f"images[{i}]") for i, ref in enumerate(refs)]
    mask = None if data.get("mask") is None else _image_ref(data["mask"], "mask")
    size = data.get("size")
    if size is None or size == "auto":
        width, height = png_dimensions(images[0]) or DEFAULT_SIZE
        width, height = min(width, MAX_SIDE), min(height, MAX_SIDE)
    else:
        width, height = parse_size(size if isinstance(size, str) else None)
    tokens = sum(image_tokens(i) if i else REFERENCED_IMAGE_TOKENS for i in images)
    gen = _generation(data, prompt, width, height, image_tokens=tokens, events=b"image_edit")
    return Edit(gen, images[0], mask)


def _image_ref(ref: Any, param: str) -> bytes:
    """An image reference's bytes: a base64 data URL's, else none (b"")."""
    if not isinstance(ref, dict) or len(ref) != 1 or not set(ref) <= {"image_url", "file_id"}:
        raise ProxyError(
            400,
            f"Invalid '{param}': expected an object with exactly one of 'image_url' and 'file_id'.",
            param=param,
            code="invalid_value",
        )
    [(name, value)] = ref.items()
    if not isinstance(value, str) or not value:
        raise ProxyError(
            400,
            f"Invalid type for '{param}.{name}': expected a non-empty string.",
            param=f"{param}.{name}",
            code="invalid_type",
        )
    head, comma, payload = value.partition(",")
    if name == "file_id" or not (head.startswith("data:") and head.endswith(";base64") and comma):
        return b""
    try:
        return base64.b64decode(payload, validate=True)
    except ValueError:
        raise ProxyError(
            400,
            f"Invalid '{param}.image_url': the data URL is not valid base64.",
            param=f"{param}.image_url",
            code="invalid_value",
        ) from None


def parse_variation(form: Form) -> Edit:
    """Validate a variations form: DALL·E 2's, `image`, `n`, `size` (default 1024x1024) and
    `response_format`; anything else, `stream` included, is ignored."""
    data = _typed(form.fields)
    images = _images(form)
    size = data.get("size")
    width, height = parse_size(size if isinstance(size, str) else None)
    gen = Generation(
        prompt="",
        n=_int_field(data, "n", 1, 1, MAX_IMAGES),
        width=width,
        height=height,
        quality="standard",
        stream=False,
        partial_images=0,
        as_url=data.get("response_format") == "url",
    )
    return Edit(gen, images[0], None)


def image_tokens(image: bytes) -> int:
    """What one input image counts for: 65 + 129 per 512-pixel tile, once the image is
    scaled down to fit 2048x2048 and then down again until its shorter side is at most 1024
    (a 1024x1024 image is 4 tiles, 581 tokens). An image that is no PNG counts as 1024x1024."""
    width, height = png_dimensions(image) or DEFAULT_SIZE
    # Exact fractions: a float scale could tip a side just over a tile boundary.
    scale = min(Fraction(1), Fraction(2048, max(width, height)))
    scale *= min(Fraction(1), 1024 / (min(width, height) * scale))
    return 65 + 129 * math.ceil(width * scale / 512) * math.ceil(height * scale / 512)


def _prompt(prompt: Any) -> str:
    if prompt is None:
        raise ProxyError(
            400,
            "Missing required parameter: 'prompt'.",
            param="prompt",
            code="missing_required_parameter",
        )
    if not isinstance(prompt, str) or not prompt:
        raise ProxyError(
            400,
            "Invalid 'prompt': expected a non-empty string.",
            param="prompt",
            code="invalid_value",
        )
    return prompt


def _quality(quality: Any) -> str:
    # The real service reports the quality it picked; "medium" stands in for "auto".
    return quality if isinstance(quality, str) and quality not in ("", "auto") else "medium"


def _images(form: Form) -> list[bytes]:
    """The images sent: one as `image`, several as `image[]` (the official SDK's names)."""
    images = form.files.get("image", []) + form.files.get("image[]", [])
    if not images:
        raise ProxyError(
            400,
            "Missing required parameter: 'image'.",
            param="image",
            code="missing_required_parameter",
        )
    return images


_INTEGER = re.compile(r"\s*[+-]?\d{1,4000}\s*")  # int() reads at most 4,300 digits
_FORM_INTEGERS = ("n", "partial_images", "frame_count", "frame_duration_ms")
_FORM_BOOLEANS = {"true": True, "false": False}


def _typed(fields: dict[str, str]) -> dict[str, Any]:
    """Form fields with the integers and booleans the JSON API has as such converted ("2"
    is 2, "true" is True); other spellings stay strings, which validation then refuses."""
    data: dict[str, Any] = dict(fields)
    for name in _FORM_INTEGERS:
        value = fields.get(name)
        if value is not None and _INTEGER.fullmatch(value):
            data[name] = int(value)
    stream = fields.get("stream")
    if stream is not None:
        data["stream"] = _FORM_BOOLEANS.get(stream.strip().lower(), stream)
    return data


def _int_field(data: dict[str, Any], name: str, default: int, low: int, high: float) -> int:
    value = data.get(name)
    if value is None:
        return default
    # bool is an int subclass, but `"n": true` is a client bug worth reporting.
    if not isinstance(value, int) or isinstance(value, bool):
        raise ProxyError(
            400, f"Invalid type for '{name}': expected an integer.", param=name, code="invalid_type"
        )
    if value < low:
        raise ProxyError(
            400,
            f"Invalid '{name}': integer below minimum value. Expected a value >= {low}, but got"
            f" {value} instead.",
            param=name,
            code="integer_below_min_value",
        )
    if value > high:
        raise ProxyError(
            400,
            f"Invalid '{name}': integer above maximum value. Expected a value <= {high}, but got"
            f" {value} instead.",
            param=name,
            code="integer_above_max_value",
        )
    return value


def _bool_field(data: dict[str, Any], name: str) -> bool:
    value = data.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ProxyError(
            400, f"Invalid type for '{name}': expected a boolean.", param=name, code="invalid_type"
        )
    return value
