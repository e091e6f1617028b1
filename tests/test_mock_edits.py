"""The mock upstream's image edits and variations: PNG decoding, and the multipart API as the
official SDK (and clients that are not the SDK) use it."""

from __future__ import annotations

import base64
import json
import os
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from support import raw_request, read_response, serve

from imagegen_proxy.mock import Bitmap, MockUpstream, decode_png, encode_rgba, render_png
from imagegen_proxy.mock import app as app_module
from imagegen_proxy.mock import decode as decode_module
from imagegen_proxy.mock.decode import png_dimensions
from imagegen_proxy.mock.edit import COLOURS, tint_colour, tint_weight
from imagegen_proxy.mock.wire import image_tokens

EDITS = "/v1/images/edits"
VARIATIONS = "/v1/images/variations"
RED, BLUE = COLOURS["red"], COLOURS["blue"]
SIGNATURE = b"\x89PNG\r\n\x1a\n"

Pixel = tuple[int, int, int, int]


# --- helpers: PNGs built and read independently of the mock's decoder ----------------------


def solid(width: int, height: int, pixel: Pixel) -> bytes:
    return bytes(pixel) * (width * height)


def halves(width: int, height: int, left: Pixel, right: Pixel) -> bytes:
    """RGBA pixels: the left half of every row `left`, the right half `right`."""
    row = bytes(left) * (width // 2) + bytes(right) * (width - width // 2)
    return row * height


def answer_pixels(data: bytes) -> tuple[int, int, bytes]:
    """(width, height, RGBA) of an edit's answer: an RGBA PNG with filter 0 on every row."""
    assert data[:8] == SIGNATURE
    chunks: dict[bytes, bytes] = {}
    pos = 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, payload = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        assert data[pos + 8 + length : pos + 12 + length] == struct.pack(
            ">I", zlib.crc32(kind + payload)
        )
        chunks[kind] = chunks.get(kind, b"") + payload
        pos += 12 + length
    width, height, depth, colour, *rest = struct.unpack(">IIBBBBB", chunks[b"IHDR"])
    assert (depth, colour, *rest) == (8, 6, 0, 0, 0)
    raw = zlib.decompress(chunks[b"IDAT"])
    stride = 4 * width + 1
    assert len(raw) == height * stride
    assert set(raw[::stride]) == {0}
    return width, height, b"".join(raw[y * stride + 1 : (y + 1) * stride] for y in range(height))


def pixel_at(rgba: bytes, width: int, x: int, y: int) -> Pixel:
    at = 4 * (y * width + x)
    r, g, b, a = rgba[at : at + 4]
    return r, g, b, a


def tinted(pixel: Pixel, tint: tuple[int, int, int], weight: int = 128) -> Pixel:
    """The documented edit: each colour channel `weight`/256 of the way to the tint."""
    r, g, b = (
        (value * (256 - weight) + target * weight) >> 8
        for value, target in zip(pixel[:3], tint, strict=True)
    )
    return r, g, b, pixel[3]


def b64_pixels(item: Any) -> tuple[int, int, bytes]:
    return answer_pixels(base64.b64decode(item.b64_json))


def multipart(
    parts: list[tuple[str, bytes, str | None]], boundary: str = "mock-test-boundary"
) -> tuple[dict[str, str], bytes]:
    """Headers and body of a form: (name, value, filename or None) for each part, in order."""
    body = b""
    for name, value, filename in parts:
        disposition = f'form-data; name="{name}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        body += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode()
        body += value + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    return {"content-type": f"multipart/form-data; boundary={boundary}"}, body


def png_file(kind: bytes, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))
        + kind
        + payload
        + struct.pack(">I", zlib.crc32(kind + payload))
    )


def filtered_png(
    width: int,
    height: int,
    samples: bytes,
    *,
    colour: int = 6,
    depth: int = 8,
    filters: tuple[int, ...] = (0,),
    extra: bytes = b"",
    interlace: int = 0,
) -> bytes:
    """A PNG of `samples` (rows packed as the PNG stores them), row y filtered with
    filters[y % len(filters)]: every filter type, as other encoders use them."""
    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[colour]
    row_bytes = (width * channels * depth + 7) // 8
    bpp = max(channels * depth // 8, 1)
    previous = bytes(row_bytes)
    raw = b""
    for y in range(height):
        row = samples[y * row_bytes : (y + 1) * row_bytes]
        kind = filters[y % len(filters)]
        out = bytearray([kind])
        for i, value in enumerate(row):
            a = row[i - bpp] if i >= bpp else 0
            b = previous[i]
            c = previous[i - bpp] if i >= bpp else 0
            out.append((value - _predict(kind, a, b, c)) & 255)
        raw += out
        previous = row
    return assemble(
        struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, interlace), raw, extra
    )


def assemble(header: bytes, raw: bytes, extra: bytes = b"") -> bytes:
    """A PNG of an IHDR payload and the image data as it is before compression."""
    idat = png_file(b"IDAT", zlib.compress(raw))
    return SIGNATURE + png_file(b"IHDR", header) + extra + idat + png_file(b"IEND", b"")


def _predict(kind: int, a: int, b: int, c: int) -> int:
    if kind == 4:
        p = a + b - c
        pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
        return a if pa <= pb and pa <= pc else b if pb <= pc else c
    return (0, a, b, (a + b) // 2)[kind]


# --- decoding --------------------------------------------------------------------------------


@pytest.mark.parametrize("colour", [0, 2, 4, 6])
def test_decode_undoes_every_row_filter(colour: int) -> None:
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[colour]
    width, height = 13, 10
    samples = os.urandom(width * height * channels)
    data = filtered_png(width, height, samples, colour=colour, filters=(0, 1, 2, 3, 4))
    bitmap = decode_png(data)
    assert bitmap is not None
    pixels = [samples[i : i + channels] for i in range(0, len(samples), channels)]
    expected = {
        0: lambda p: bytes((p[0], p[0], p[0], 255)),
        2: lambda p: p + b"\xff",
        4: lambda p: bytes((p[0], p[0], p[0], p[1])),
        6: lambda p: p,
    }[colour]
    assert bitmap == Bitmap(width, height, b"".join(map(expected, pixels)))


def test_decode_palette_with_transparency_and_low_bit_depths() -> None:
    palette = png_file(b"PLTE", bytes([255, 0, 0, 0, 255, 0, 0, 0, 255, 9, 9, 9]))
    trns = png_file(b"tRNS", b"\x00\x80")
    # Two bits a pixel: indices 0, 1, 2, 3 in one byte; then 3, 2, 1, 0 on the next row.
    data = filtered_png(
        4, 2, bytes([0b00011011, 0b11100100]), colour=3, depth=2, extra=palette + trns
    )
    bitmap = decode_png(data)
    assert bitmap is not None
    first = [(255, 0, 0, 0), (0, 255, 0, 128), (0, 0, 255, 255), (9, 9, 9, 255)]
    assert [pixel_at(bitmap.rgba, 4, x, 0) for x in range(4)] == first
    assert [pixel_at(bitmap.rgba, 4, x, 1) for x in range(4)] == first[::-1]


def test_decode_one_bit_greyscale_and_sixteen_bit_rgb() -> None:
    grey = decode_png(filtered_png(10, 1, bytes([0b10100101, 0b11000000]), colour=0, depth=1))
    assert grey is not None
    assert grey.rgba[::4] == bytes([255, 0, 255, 0, 0, 255, 0, 255, 255, 255])
    deep = decode_png(filtered_png(1, 1, bytes.fromhex("123456789abc"), colour=2, depth=16))
    assert deep == Bitmap(1, 1, bytes([0x12, 0x56, 0x9A, 255]))


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xff\xd8\xff\xe0\x00\x10JFIF\x00",  # a JPEG's first bytes
        b"RIFF\x00\x00\x00\x00WEBPVP8 ",
        SIGNATURE + b"garbage",
        filtered_png(4, 4, solid(4, 4, (1, 2, 3, 4)), interlace=1),
        filtered_png(2, 1, bytes([0, 0]), colour=3),  # palette image without a palette
        filtered_png(2, 2, solid(2, 2, (1, 2, 3, 4)))[:-20],  # cut short
        assemble(struct.pack(">IIBBBBB", 2, 1, 8, 6, 0, 0, 0), b"\x05" + bytes(8)),  # filter 5
    ],
)
def test_decode_refuses_what_it_cannot_read(data: bytes) -> None:
    assert decode_png(data) is None


def test_slow_filters_past_their_budget_are_not_decoded(monkeypatch: pytest.MonkeyPatch) -> None:
    data = filtered_png(8, 8, os.urandom(256), filters=(4,))
    assert decode_png(data) is not None
    monkeypatch.setattr(decode_module, "MAX_SLOW_BYTES", 100)
    assert decode_png(data) is None


def test_resize_is_nearest_neighbour() -> None:
    quad = Bitmap(2, 2, bytes(range(16)))
    big = quad.resized(4, 4)
    assert [big.rgba[4 * i] for i in range(16)] == [0, 0, 4, 4] * 2 + [8, 8, 12, 12] * 2
    assert big.resized(2, 2) == quad
    assert quad.resized(1, 1).rgba == bytes(range(12, 16))


def test_image_tokens_scale_with_the_image() -> None:
    assert image_tokens(encode_rgba(64, 64, solid(64, 64, (0, 0, 0, 0)))) == 65 + 129
    assert image_tokens(b"not a png") == 65 + 129 * 4  # counted as 1024x1024
    header = SIGNATURE + png_file(b"IHDR", struct.pack(">IIBBBBB", 1536, 1024, 8, 6, 0, 0, 0))
    assert png_dimensions(header) == (1536, 1024)
    assert image_tokens(header) == 65 + 129 * 6
    huge = SIGNATURE + png_file(b"IHDR", struct.pack(">IIBBBBB", 4096, 4096, 8, 6, 0, 0, 0))
    assert image_tokens(huge) == 65 + 129 * 4  # fitted into 2048, then shorter side 1024


def test_tint_colour_from_a_colour_word_else_the_prompt_hash() -> None:
    assert tint_colour("a RED barn under a blue sky") == RED
    assert tint_colour("a reddish barn") == tint_colour("a reddish barn")
    assert tint_colour("a reddish barn") not in COLOURS.values()
    assert tint_weight(0) == 128
    assert tint_weight(1) > tint_weight(0) > tint_weight(0, 0.5)


# --- over a real server ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    with serve(MockUpstream()) as base:
        yield base


@pytest.fixture(scope="module")
def client(url: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=10) as sdk:
        yield sdk


BLACK, ORANGE = (0, 0, 0, 255), (200, 100, 50, 255)
SOURCE = encode_rgba(32, 16, halves(32, 16, BLACK, ORANGE))


def test_edit_one_image_tints_it(client: openai.OpenAI) -> None:
    result = client.images.edit(
        model="gpt-image-1", image=("in.png", SOURCE, "image/png"), prompt="make it red"
    )
    assert result.data is not None
    assert len(result.data) == 1
    assert result.size == "32x16"  # the input's size by default
    assert result.data[0].revised_prompt == "make it red"
    width, height, rgba = b64_pixels(result.data[0])
    assert (width, height) == (32, 16)
    assert pixel_at(rgba, width, 0, 0) == tinted(BLACK, RED) == (127, 0, 0, 255)
    assert pixel_at(rgba, width, 31, 15) == tinted(ORANGE, RED)
    assert result.usage is not None
    details = result.usage.input_tokens_details
    assert (details.text_tokens, details.image_tokens) == (3, 65 + 129)
    assert result.usage.input_tokens == 3 + 65 + 129
    assert result.usage.total_tokens == result.usage.input_tokens + result.usage.output_tokens


def test_edit_a_list_of_images_counts_them_all_and_edits_the_first(
    client: openai.OpenAI,
) -> None:
    large = encode_rgba(1024, 1024, solid(1024, 1024, (255, 255, 255, 255)))
    result = client.images.edit(image=[SOURCE, large], prompt="blue", n=2)
    assert result.usage is not None
    assert result.usage.input_tokens_details.image_tokens == (65 + 129) + (65 + 129 * 4)
    assert result.data is not None
    first, second = (b64_pixels(item) for item in result.data)
    assert pixel_at(first[2], 32, 0, 0) == tinted(BLACK, BLUE)
    # Each next image of the request leans further toward the tint.
    assert pixel_at(second[2], 32, 0, 0) == tinted(BLACK, BLUE, tint_weight(1))


def test_edit_fills_the_masks_transparent_area(client: openai.OpenAI) -> None:
    image = encode_rgba(8, 8, solid(8, 8, (10, 20, 30, 255)))
    # Transparent (edit here) on the left, opaque (keep) on the right; a smaller mask
    # is stretched over the image.
    mask = encode_rgba(4, 4, halves(4, 4, (0, 0, 0, 0), (0, 0, 0, 255)))
    result = client.images.edit(image=image, mask=("mask.png", mask), prompt="a green field")
    assert result.data is not None
    width, _, rgba = b64_pixels(result.data[0])
    green = COLOURS["green"]
    for y in range(8):
        assert [pixel_at(rgba, width, x, y) for x in range(4)] == [(*green, 255)] * 4
        expected = tinted((10, 20, 30, 255), green)
        assert [pixel_at(rgba, width, x, y) for x in range(4, 8)] == [expected] * 4


def test_edit_keeps_the_inputs_alpha_and_answers_at_the_requested_size(
    client: openai.OpenAI,
) -> None:
    image = encode_rgba(2, 1, bytes([0, 0, 0, 0, 255, 255, 255, 128]))
    result = client.images.edit(image=image, prompt="black", size="64x32")
    assert result.data is not None
    width, height, rgba = b64_pixels(result.data[0])
    assert (width, height) == (64, 32)
    assert pixel_at(rgba, width, 31, 31) == (0, 0, 0, 0)
    assert pixel_at(rgba, width, 32, 0) == (127, 127, 127, 128)


def test_streamed_edit_sends_partials_then_completed_with_image_tokens(
    client: openai.OpenAI,
) -> None:
    stream = client.images.edit(image=SOURCE, prompt="make it red", stream=True, partial_images=2)
    events = list(stream)
    assert [(event.type, getattr(event, "partial_image_index", None)) for event in events] == [
        ("image_edit.partial_image", 0),
        ("image_edit.partial_image", 1),
        ("image_edit.completed", None),
    ]
    completed = events[-1]
    assert completed.type == "image_edit.completed"
    assert completed.usage.input_tokens_details.image_tokens == 65 + 129
    pictures = [answer_pixels(base64.b64decode(event.b64_json))[2] for event in events]
    # Partial images lean less toward the tint than the final one.
    reds = [pixel_at(rgba, 32, 0, 0)[0] for rgba in pictures]
    assert reds == sorted(reds)
    assert reds[-1] == 127


def test_stream_wire_names_the_events_and_their_type(url: str) -> None:
    files = {"image": ("in.png", SOURCE, "image/png")}
    data = {"prompt": "p", "stream": "true", "partial_images": "1", "n": "2"}
    response = httpx.post(url + EDITS, files=files, data=data)
    assert response.headers["content-type"] == "text/event-stream"
    kinds = []
    for block in response.text[:-2].split("\n\n"):
        event_line, data_line = block.split("\n")
        kind = event_line.removeprefix("event: ")
        assert json.loads(data_line.removeprefix("data: "))["type"] == kind
        kinds.append(kind)
    partial, completed = "image_edit.partial_image", "image_edit.completed"
    assert kinds == [partial, completed, partial, completed]


@pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")
def test_variations_answer_n_images_without_usage(client: openai.OpenAI, url: str) -> None:
    result = client.images.create_variation(image=("in.png", SOURCE), n=3, size="256x256")
    assert result.data is not None
    assert result.usage is None
    pictures = [b64_pixels(item) for item in result.data]
    assert [(width, height) for width, height, _ in pictures] == [(256, 256)] * 3
    assert len({rgba for _, _, rgba in pictures}) == 3  # a colour of its own each
    raw = httpx.post(url + VARIATIONS, files={"image": SOURCE}, data={"stream": "true"})
    assert list(raw.json()) == ["created", "data"]
    assert list(raw.json()["data"][0]) == ["b64_json"]


@pytest.mark.parametrize(
    "image", [b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + os.urandom(64), b"garbage"]
)
def test_undecodable_input_edits_the_generated_picture(client: openai.OpenAI, image: bytes) -> None:
    result = client.images.edit(image=image, prompt="a fox", size="64x48")
    same = client.images.edit(image=render_png("a fox", width=64, height=48), prompt="a fox")
    assert result.data is not None
    assert same.data is not None
    assert result.data[0].b64_json == same.data[0].b64_json
    default = client.images.edit(image=image, prompt="a fox")
    assert default.size == "1024x1024"


def test_response_format_url_gives_data_url(url: str) -> None:
    data = {"prompt": "p", "response_format": "url"}
    item = httpx.post(url + EDITS, files={"image": SOURCE}, data=data).json()["data"][0]
    assert item["url"].startswith("data:image/png;base64,")


def test_azure_client_edits(url: str) -> None:
    azure = openai.AzureOpenAI(
        azure_endpoint=url, api_key="x", api_version="2025-04-01-preview", max_retries=0
    )
    with azure:
        result = azure.images.edit(model="dep1", image=SOURCE, prompt="p")
    assert result.data is not None
    assert result.size == "32x16"


def test_text_fields_after_the_files_and_files_without_filename(url: str) -> None:
    headers, body = multipart(
        [("image", SOURCE, None), ("prompt", b"make it red", None), ("n", b"2", None)]
    )
    response = httpx.post(url + "/openai/v1/images/edits", content=body, headers=headers)
    assert response.status_code == 200
    assert len(response.json()["data"]) == 2
    assert response.headers["x-request-id"].startswith("req_mock_")
    assert response.headers["openai-processing-ms"].isdigit()
    keys = list(response.json())
    assert keys == ["created", "background", "output_format", "quality", "size", "data", "usage"]


# --- refusals --------------------------------------------------------------------------------

IMAGE_PART = ("image", SOURCE, "in.png")


@pytest.mark.parametrize(
    ("parts", "param", "code"),
    [
        ([IMAGE_PART], "prompt", "missing_required_parameter"),
        ([IMAGE_PART, ("prompt", b"", None)], "prompt", "invalid_value"),
        ([("prompt", b"p", None)], "image", "missing_required_parameter"),
        ([("image", SOURCE, None), ("prompt", b"\xff\xfe", None)], "prompt", "invalid_value"),
        ([IMAGE_PART, ("prompt", b"p", None), ("n", b"0", None)], "n", "integer_below_min_value"),
        ([IMAGE_PART, ("prompt", b"p", None), ("n", b"11", None)], "n", "integer_above_max_value"),
        ([IMAGE_PART, ("prompt", b"p", None), ("n", b"two", None)], "n", "invalid_type"),
        (
            [IMAGE_PART, ("prompt", b"p", None), ("stream", b"maybe", None)],
            "stream",
            "invalid_type",
        ),
        (
            [IMAGE_PART, ("prompt", b"p", None), ("partial_images", b"4", None)],
            "partial_images",
            "integer_above_max_value",
        ),
        ([IMAGE_PART, ("prompt", b"p", None), *[IMAGE_PART] * 16], "image", "invalid_value"),
    ],
)
def test_invalid_forms_get_400_envelope(
    url: str, parts: list[tuple[str, bytes, str | None]], param: str, code: str
) -> None:
    headers, body = multipart(parts)
    response = httpx.post(url + EDITS, content=body, headers=headers)
    assert response.status_code == 400
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["param"], error["code"]) == (
        "invalid_request_error",
        param,
        code,
    )


def test_variation_without_image_or_with_bad_n_gets_400(url: str) -> None:
    assert httpx.post(url + VARIATIONS, files={"mask": SOURCE}).json()["error"]["param"] == "image"
    response = httpx.post(url + VARIATIONS, files={"image": SOURCE}, data={"n": "11"})
    assert response.json()["error"]["param"] == "n"


_, GOOD_BODY = multipart([IMAGE_PART, ("prompt", b"p", None)])


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("multipart/form-data", GOOD_BODY),  # no boundary
        ("multipart/form-data; boundary=", GOOD_BODY),
        ("multipart/form-data; boundary=" + "x" * 71, GOOD_BODY),
        ("multipart/form-data; boundary=mock-test-boundary", GOOD_BODY[:-30]),  # truncated
        ("multipart/form-data; boundary=mock-test-boundary", b""),
        ("multipart/form-data; boundary=mock-test-boundary", b"not multipart at all"),
        ("multipart/form-data; boundary=other", GOOD_BODY),
        (
            "multipart/form-data; boundary=mock-test-boundary",
            b"--mock-test-boundary\r\nContent-Type: text/plain\r\n\r\nno name\r\n"
            b"--mock-test-boundary--\r\n",
        ),
    ],
)
def test_malformed_multipart_gets_400(url: str, content_type: str, body: bytes) -> None:
    response = httpx.post(url + EDITS, content=body, headers={"content-type": content_type})
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_not_multipart_gets_415(url: str) -> None:
    # JSON is an edit's other form (test_mock_formats.py); plain text is neither.
    response = httpx.post(url + EDITS, content=b"prompt=p", headers={"content-type": "text/plain"})
    assert response.status_code == 415
    assert response.json()["error"]["code"] == "unsupported_media_type"


def test_declared_body_over_the_limit_gets_413_before_it_is_sent(url: str) -> None:
    headers = {
        "content-type": "multipart/form-data; boundary=b",
        "content-length": str(app_module.MAX_FORM_BODY + 1),
    }
    with raw_request(url, headers, path=EDITS) as sock:
        response = read_response(sock)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"


def test_streamed_body_over_the_limit_gets_413(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(app_module, "MAX_FORM_BODY", 4096)
    headers, body = multipart([IMAGE_PART, ("prompt", b"p" * 8192, None)])
    chunks = [body[i : i + 1024] for i in range(0, len(body), 1024)]  # chunked, no length
    response = httpx.post(url + EDITS, content=iter(chunks), headers=headers)
    assert response.status_code == 413


@pytest.mark.parametrize("path", [EDITS, VARIATIONS])
def test_get_is_405_with_allow(url: str, path: str) -> None:
    response = httpx.get(url + path)
    assert response.status_code == 405
    assert response.headers["allow"] == "POST"


def test_api_key_is_required_when_set() -> None:
    with serve(MockUpstream(api_key="sk-mock")) as base:
        response = httpx.post(base + EDITS, files={"image": SOURCE}, data={"prompt": "p"})
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
        headers = {"authorization": "Bearer sk-mock"}
        files = {"image": SOURCE}
        assert httpx.post(base + VARIATIONS, files=files, headers=headers).status_code == 200


# --- speed, delays and disconnects -----------------------------------------------------------


def test_a_large_edit_is_quick(client: openai.OpenAI) -> None:
    image = encode_rgba(1024, 1024, bytes(range(256)) * 16384)
    mask = encode_rgba(1024, 1024, halves(1024, 1024, (0, 0, 0, 0), (0, 0, 0, 255)))
    started = time.monotonic()
    result = client.images.edit(image=image, mask=mask, prompt="p")
    assert time.monotonic() - started < 5  # tens of milliseconds on a laptop
    assert result.size == "1024x1024"


def test_stream_events_are_spread_over_the_delay() -> None:
    with serve(MockUpstream(delay=0.3)) as base:
        sdk = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=5)
        with sdk:
            stream = sdk.images.edit(image=SOURCE, prompt="p", stream=True, partial_images=2)
            arrivals = [time.monotonic() for _ in stream]
    assert len(arrivals) == 3
    assert arrivals[-1] - arrivals[0] >= 0.1


def test_client_disconnect_during_delay_ends_request_quietly() -> None:
    finished = threading.Event()
    errors: list[BaseException] = []
    mock = MockUpstream(delay=30)

    async def recorder(scope: Any, receive: Any, send: Any) -> None:
        try:
            await mock(scope, receive, send)
        except BaseException as exc:
            errors.append(exc)
            raise
        finally:
            if scope["type"] == "http":
                finished.set()

    with serve(recorder) as base:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(base + EDITS, files={"image": SOURCE}, data={"prompt": "p"}, timeout=0.3)
        assert finished.wait(5), "the request kept sleeping after the client left"
    assert errors == []
