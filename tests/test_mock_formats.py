"""The mock's animated GIFs and SVGs (read back by a GIF decoder written here and by an XML
parser), and its edits with a JSON body, through the official SDK over real sockets."""

from __future__ import annotations

import base64
import struct
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import openai
import pytest
from openai.types import ImagesResponse
from support import serve
from test_mock_edits import answer_pixels

from imagegen_proxy.mock import MockUpstream, encode_rgba, render_png
from imagegen_proxy.mock.formats import render_gif, render_svg
from imagegen_proxy.mock.wire import image_tokens


@dataclass
class Gif:
    width: int
    height: int
    palette: bytes
    loops: int | None = None
    delays: list[int] = field(default_factory=list)  # hundredths of a second
    frames: list[bytes] = field(default_factory=list)  # palette indices, row after row


def lzw_decode(data: bytes, minimum: int) -> bytes:
    """GIF's variable-width LZW, as any decoder reads it."""
    clear, end = 1 << minimum, (1 << minimum) + 1
    width, bits, held, out = minimum + 1, 0, 0, bytearray()
    table: list[bytes] = []
    previous: bytes | None = None
    for byte in data:
        held |= byte << bits
        bits += 8
        while bits >= width:
            code, held, bits = held & ((1 << width) - 1), held >> width, bits - width
            if code == clear:
                table = [bytes((i,)) for i in range(clear)] + [b"", b""]
                width, previous = minimum + 1, None
                continue
            if code == end:
                return bytes(out)
            if code < len(table):
                entry = table[code]
                if previous is not None:
                    table.append(previous + entry[:1])
            else:
                assert previous is not None and code == len(table), "a code out of the table"
                entry = previous + previous[:1]
                table.append(entry)
            out += entry
            previous = entry
            if len(table) == 1 << width and width < 12:
                width += 1
    raise AssertionError("no end code")


def read_gif(data: bytes) -> Gif:
    assert data[:6] == b"GIF89a"
    width, height, packed, _, _ = struct.unpack("<HHBBB", data[6:13])
    assert packed & 0x80, "a global palette"
    colours = 2 << (packed & 7)
    gif = Gif(width, height, data[13 : 13 + 3 * colours])
    at = 13 + 3 * colours
    while True:
        kind = data[at]
        if kind == 0x3B:
            assert at == len(data) - 1
            return gif
        if kind == 0x21:
            label, size = data[at + 1], data[at + 2]
            block = data[at + 3 : at + 3 + size]
            at += 3 + size
            sub = b""
            while data[at]:
                sub += data[at + 1 : at + 1 + data[at]]
                at += 1 + data[at]
            at += 1
            if label == 0xF9:
                gif.delays.append(struct.unpack("<H", block[1:3])[0])
            elif label == 0xFF and block == b"NETSCAPE2.0":
                gif.loops = struct.unpack("<H", sub[1:3])[0]
            continue
        assert kind == 0x2C, f"unexpected block {kind:#x}"
        left, top, w, h, flags = struct.unpack("<HHHHB", data[at + 1 : at + 10])
        assert (left, top, w, h, flags) == (0, 0, width, height, 0)
        minimum = data[at + 10]
        at += 11
        stream = b""
        while data[at]:
            stream += data[at + 1 : at + 1 + data[at]]
            at += 1 + data[at]
        at += 1
        pixels = lzw_decode(stream, minimum)
        assert len(pixels) == width * height
        assert max(pixels) < colours
        gif.frames.append(pixels)


def test_a_gif_has_its_frames_delays_and_loop() -> None:
    gif = read_gif(render_gif("a cat", width=300, height=200, frames=4, frame_ms=120))
    assert (gif.width, gif.height, len(gif.palette)) == (300, 200, 384)
    assert gif.loops == 0  # forever
    assert gif.delays == [12] * 4
    assert len(gif.frames) == 4
    assert len(set(gif.frames)) == 4, "the picture moves from frame to frame"
    # The same prompt, the same GIF; another prompt, another.
    assert render_gif("a cat", width=300, height=200, frames=4, frame_ms=120) == render_gif(
        "a cat", width=300, height=200, frames=4, frame_ms=120
    )
    other = read_gif(render_gif("a dog", width=300, height=200, frames=4, frame_ms=120))
    assert other.palette != gif.palette


def test_a_large_gif_encodes_quickly() -> None:
    # A generous bound: the encoder slices bytes, it never packs bits in Python; an encoder
    # that did would take seconds for these 9.4 million pixels even on an idle machine.
    started = time.perf_counter()
    data = render_gif("big", width=1024, height=1024, frames=9, frame_ms=200)
    assert time.perf_counter() - started < 5
    gif = read_gif(data)
    assert len(gif.frames) == 9 and gif.delays == [20] * 9


def test_an_svg_is_a_document_of_its_size() -> None:
    root = ET.fromstring(render_svg("a cat", width=640, height=480))
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    assert (root.get("width"), root.get("height"), root.get("viewBox")) == (
        "640",
        "480",
        "0 0 640 480",
    )
    shapes = [child.tag.split("}")[1] for child in root]
    assert shapes == ["defs", "rect", "polygon", "circle"]


@pytest.fixture
def mock() -> Iterator[str]:
    with serve(MockUpstream()) as url:
        yield url


def sdk(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0)


def test_the_mock_answers_a_gif_with_its_frames(mock: str) -> None:
    body = {
        "model": "gpt-image-2.6-sunburst",
        "prompt": "a cat",
        "size": "256x256",
        "output_format": "gif",
        "frame_count": 3,
        "frame_duration_ms": 500,
    }
    answer = sdk(mock).post("/images/generations", body=body, cast_to=ImagesResponse)
    assert answer.output_format == "gif"
    assert answer.data and answer.data[0].b64_json
    gif = read_gif(base64.b64decode(answer.data[0].b64_json))
    assert (gif.width, len(gif.frames), gif.delays) == (256, 3, [50, 50, 50])
    default = sdk(mock).post(
        "/images/generations",
        body={"prompt": "p", "size": "64x64", "output_format": "gif"},
        cast_to=ImagesResponse,
    )
    assert default.data and default.data[0].b64_json
    assert read_gif(base64.b64decode(default.data[0].b64_json)).delays == [20] * 9


def test_the_mock_answers_an_svg_and_streams_it_whole(mock: str) -> None:
    body = {"prompt": "p", "size": "128x96", "output_format": "svg"}
    answer = sdk(mock).post("/images/generations", body=body, cast_to=ImagesResponse)
    assert answer.data and answer.data[0].b64_json
    assert ET.fromstring(base64.b64decode(answer.data[0].b64_json)).get("width") == "128"
    url = sdk(mock).post(
        "/images/generations", body={**body, "response_format": "url"}, cast_to=ImagesResponse
    )
    assert url.data and (url.data[0].url or "").startswith("data:image/svg+xml;base64,")
    events = list(
        sdk(mock).images.generate(
            prompt="p",
            size="128x96",  # type: ignore[arg-type]
            output_format="svg",  # type: ignore[arg-type]
            stream=True,
            partial_images=2,
        )
    )
    assert [event.type for event in events] == ["image_generation.completed"]


@pytest.mark.parametrize(
    ("extra", "param"),
    [({"frame_count": 1}, "frame_count"), ({"frame_duration_ms": 0}, "frame_duration_ms")],
)
def test_the_mock_refuses_frames_out_of_range(mock: str, extra: dict[str, Any], param: str) -> None:
    body = {"prompt": "p", "output_format": "gif", **extra}
    answer = httpx.post(mock + "/v1/images/generations", json=body)
    assert answer.status_code == 400
    assert answer.json()["error"]["param"] == param


RED = encode_rgba(64, 32, b"\xff\x00\x00\xff" * 64 * 32)


def test_the_mock_edits_a_json_body_as_it_edits_a_form(mock: str) -> None:
    data_url = "data:image/png;base64," + base64.b64encode(RED).decode()
    body = {"model": "gpt-image-2", "prompt": "blue", "images": [{"image_url": data_url}]}
    answer = sdk(mock).post("/images/edits", body=body, cast_to=ImagesResponse)
    form = sdk(mock).images.edit(image=("a.png", RED, "image/png"), prompt="blue")
    assert answer.size == "64x32"  # the input's size
    assert answer.data and form.data
    assert answer_pixels(base64.b64decode(answer.data[0].b64_json or "")) == answer_pixels(
        base64.b64decode(form.data[0].b64_json or "")
    )
    assert answer.usage and answer.usage.input_tokens_details.image_tokens == image_tokens(RED)


def test_a_json_edit_by_file_id_edits_the_prompts_picture(mock: str) -> None:
    body = {"prompt": "p", "images": [{"file_id": "file-1"}, {"image_url": "https://x/y.png"}]}
    answer = sdk(mock).post("/images/edits", body=body, cast_to=ImagesResponse)
    assert answer.size == "1024x1024" and answer.data
    assert answer.usage and answer.usage.input_tokens_details.image_tokens == 2 * 581
    events = list(
        sdk(mock).post(
            "/images/edits",
            body={**body, "stream": True, "partial_images": 1},
            cast_to=object,
            stream=True,
            stream_cls=openai.Stream[openai.types.ImageEditStreamEvent],
        )
    )
    assert [e.type for e in events] == ["image_edit.partial_image", "image_edit.completed"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "p"}, "images"),
        ({"prompt": "p", "images": []}, "images"),
        ({"prompt": "p", "images": [{"file_id": "a", "image_url": "b"}]}, "images[0]"),
        ({"prompt": "p", "images": [{"file_id": 3}]}, "images[0].file_id"),
        ({"prompt": "p", "images": [{"image_url": "data:image/png;base64,!!"}]}, None),
        ({"images": [{"file_id": "a"}]}, "prompt"),
    ],
)
def test_the_mock_refuses_a_bad_json_edit(mock: str, body: dict[str, Any], param: str) -> None:
    answer = httpx.post(mock + "/v1/images/edits", json=body)
    assert answer.status_code == 400
    if param is not None:
        assert answer.json()["error"]["param"] == param


def test_a_png_is_still_a_png(mock: str) -> None:
    answer = sdk(mock).images.generate(prompt="p", size="64x64")  # type: ignore[arg-type]
    assert answer.output_format == "png" and answer.data
    assert base64.b64decode(answer.data[0].b64_json or "") == render_png("p", width=64, height=64)
