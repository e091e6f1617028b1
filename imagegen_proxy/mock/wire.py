"""Request validation and the bytes of the answers: JSON bodies, SSE events, error envelopes."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ..errors import ProxyError
from .png import parse_size

MAX_IMAGES = 10
MAX_PARTIAL_IMAGES = 3
# A rough but deterministic per-image figure; callers only need a stable, plausible number.
OUTPUT_TOKENS_PER_IMAGE = 272


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

    @property
    def size(self) -> str:
        return f"{self.width}x{self.height}"

    @property
    def input_tokens(self) -> int:
        return max(len(self.prompt.split()), 1)


def error_body(error: ProxyError) -> bytes:
    """The OpenAI error envelope, all four keys always present."""
    return json.dumps(error.envelope()).encode()


def parse_generation(body: bytes) -> Generation:
    """Validate a generations request body; raise ProxyError (400) when it is unusable."""
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
    prompt = data.get("prompt")
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
    size = data.get("size")
    width, height = parse_size(size if isinstance(size, str) else None)
    quality = data.get("quality")
    return Generation(
        prompt=prompt,
        n=_int_field(data, "n", 1, 1, MAX_IMAGES),
        width=width,
        height=height,
        # The real service reports the quality it picked; "medium" stands in for "auto".
        quality=quality if isinstance(quality, str) and quality not in ("", "auto") else "medium",
        stream=_bool_field(data, "stream"),
        partial_images=_int_field(data, "partial_images", 0, 0, MAX_PARTIAL_IMAGES),
        as_url=data.get("response_format") == "url",
    )


def _int_field(data: dict[str, Any], name: str, default: int, low: int, high: int) -> int:
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


def usage_json(gen: Generation, images: int) -> bytes:
    """Compact usage object for `images` generated images."""
    inp = gen.input_tokens
    out = OUTPUT_TOKENS_PER_IMAGE * images
    return (
        b'{"total_tokens":%d,"input_tokens":%d,"output_tokens":%d,'
        b'"input_tokens_details":{"text_tokens":%d,"image_tokens":0}}' % (inp + out, inp, out, inp)
    )


def images_json(gen: Generation, created: int, b64_images: list[bytes]) -> bytes:
    """The non-streaming answer; "usage" is deliberately the last key of the object."""
    # Concatenation instead of json.dumps: the base64 payloads are JSON-safe as they are and
    # can be megabytes, so re-escaping them would be pure waste.
    prompt = json.dumps(gen.prompt).encode()
    field = b'"url":"data:image/png;base64,' if gen.as_url else b'"b64_json":"'
    items = b",".join(
        b"{" + field + b64 + b'","revised_prompt":' + prompt + b"}" for b64 in b64_images
    )
    return b"".join(
        (
            b'{"created":%d,"background":"opaque","output_format":"png","quality":' % created,
            json.dumps(gen.quality).encode(),
            b',"size":"%s","data":[' % gen.size.encode(),
            items,
            b'],"usage":',
            usage_json(gen, len(b64_images)),
            b"}",
        )
    )


def sse_event(gen: Generation, created: int, b64: bytes, partial_index: int | None) -> bytes:
    """One SSE event: a partial image when `partial_index` is set, else the completed image."""
    quality = json.dumps(gen.quality).encode()
    tail = b',"created_at":%d,"size":"%s","quality":%s' % (created, gen.size.encode(), quality)
    tail += b',"background":"opaque","output_format":"png"'
    if partial_index is None:
        kind = b"image_generation.completed"
        # Each completed event accounts for its own image only.
        tail += b',"usage":' + usage_json(gen, 1)
    else:
        kind = b"image_generation.partial_image"
        tail = b',"partial_image_index":%d' % partial_index + tail
    return b"".join(
        (b"event: ", kind, b'\ndata: {"type":"', kind, b'","b64_json":"', b64, b'"', tail, b"}\n\n")
    )
