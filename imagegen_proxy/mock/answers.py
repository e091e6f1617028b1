"""The bytes of the mock's answers: JSON bodies, SSE events, error envelopes."""

from __future__ import annotations

import json

from ..wire.errors import ProxyError
from .wire import OUTPUT_TOKENS_PER_IMAGE, Generation


def error_body(error: ProxyError) -> bytes:
    """The OpenAI error envelope, all four keys always present."""
    return json.dumps(error.envelope()).encode()


def usage_json(gen: Generation, images: int) -> bytes:
    """Compact usage object for `images` generated images."""
    text, image = gen.input_tokens, gen.image_tokens
    inp = text + image
    out = OUTPUT_TOKENS_PER_IMAGE * images
    return (
        b'{"total_tokens":%d,"input_tokens":%d,"output_tokens":%d,'
        b'"input_tokens_details":{"text_tokens":%d,"image_tokens":%d}}'
        % (inp + out, inp, out, text, image)
    )


def images_json(gen: Generation, created: int, b64_images: list[bytes]) -> bytes:
    """The non-streaming answer; "usage" is deliberately the last key of the object."""
    # Concatenation instead of json.dumps: the base64 payloads are JSON-safe as they are and
    # can be megabytes, so re-escaping them would be pure waste.
    prompt = json.dumps(gen.prompt).encode()
    field = _image_field(gen.as_url, gen.media_type)
    items = b",".join(
        b"{" + field + b64 + b'","revised_prompt":' + prompt + b"}" for b64 in b64_images
    )
    return b"".join(
        (
            b'{"created":%d,"background":"opaque","output_format":"%s","quality":'
            % (created, gen.output_format.encode()),
            json.dumps(gen.quality).encode(),
            b',"size":"%s","data":[' % gen.size.encode(),
            items,
            b'],"usage":',
            usage_json(gen, len(b64_images)),
            b"}",
        )
    )


def variations_json(gen: Generation, created: int, b64_images: list[bytes]) -> bytes:
    """DALL·E 2's answer to a variation: the images, nothing else (no usage)."""
    field = _image_field(gen.as_url)
    items = b",".join(b"{" + field + b64 + b'"}' for b64 in b64_images)
    return b'{"created":%d,"data":[' % created + items + b"]}"


def _image_field(as_url: bool, media_type: bytes = b"image/png") -> bytes:
    return b'"url":"data:' + media_type + b";base64," if as_url else b'"b64_json":"'


def sse_event(gen: Generation, created: int, b64: bytes, partial_index: int | None) -> bytes:
    """One SSE event: a partial image when `partial_index` is set, else the completed image."""
    quality = json.dumps(gen.quality).encode()
    tail = b',"created_at":%d,"size":"%s","quality":%s' % (created, gen.size.encode(), quality)
    tail += b',"background":"opaque","output_format":"%s"' % gen.output_format.encode()
    if partial_index is None:
        kind = gen.events + b".completed"
        # Each completed event accounts for its own image only.
        tail += b',"usage":' + usage_json(gen, 1)
    else:
        kind = gen.events + b".partial_image"
        tail = b',"partial_image_index":%d' % partial_index + tail
    return b"".join(
        (b"event: ", kind, b'\ndata: {"type":"', kind, b'","b64_json":"', b64, b'"', tail, b"}\n\n")
    )
