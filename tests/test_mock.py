"""The embedded mock upstream: PNG rendering, and the HTTP API as the official SDK sees it."""

from __future__ import annotations

import base64
import json
import re
import struct
import threading
import time
import zlib
from collections.abc import Iterator, MutableMapping
from typing import Any

import anyio
import httpx
import openai
import pytest
from openai.types import ImagesResponse
from support import serve

from imagegen_proxy.mock import MockUpstream, parse_size, render_png
from imagegen_proxy.mock import png as png_module
from imagegen_proxy.mock.cache import BytesLRU

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
GENERATIONS = "/v1/images/generations"


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """Split a PNG into (type, payload) chunks, checking the signature and every CRC."""
    assert data[:8] == PNG_SIGNATURE
    chunks = []
    pos = 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        payload = data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + payload), f"bad CRC in {kind!r}"
        chunks.append((kind, payload))
        pos += 12 + length
    assert pos == len(data)
    assert chunks[0][0] == b"IHDR"
    assert chunks[-1] == (b"IEND", b"")
    return chunks


def check_png(data: bytes) -> tuple[int, int]:
    """Validate an 8-bit palette PNG down to its pixel data; return (width, height)."""
    chunks = png_chunks(data)
    width, height, depth, colour, compression, filtering, interlace = struct.unpack(
        ">IIBBBBB", chunks[0][1]
    )
    assert (depth, colour, compression, filtering, interlace) == (8, 3, 0, 0, 0)
    palette = [payload for kind, payload in chunks if kind == b"PLTE"]
    assert len(palette) == 1
    assert len(palette[0]) % 3 == 0
    assert len(palette[0]) <= 768
    raw = zlib.decompress(b"".join(payload for kind, payload in chunks if kind == b"IDAT"))
    assert len(raw) == height * (width + 1)
    assert max(raw[0 :: width + 1]) <= 4  # filter type bytes
    assert max(raw) < len(palette[0]) // 3
    return width, height


def png_size(data: bytes) -> tuple[int, int]:
    width, height = struct.unpack(">II", data[16:24])
    return width, height


# --- PNG rendering ---------------------------------------------------------------------------


def test_render_png_is_a_valid_palette_png_of_the_requested_size() -> None:
    assert check_png(render_png("a red fox", width=320, height=200)) == (320, 200)


def test_render_png_handles_extreme_sizes() -> None:
    assert check_png(render_png("tiny", width=1, height=1)) == (1, 1)
    assert check_png(render_png("strip", width=1000, height=3, detail=0.2)) == (1000, 3)


def test_render_png_is_deterministic(monkeypatch: pytest.MonkeyPatch) -> None:
    # With caching off, equal bytes prove the rendering itself is deterministic.
    monkeypatch.setattr(png_module, "_cache", BytesLRU(max_bytes=0))
    first = render_png("a red fox", width=128, height=128)
    assert render_png("a red fox", width=128, height=128) == first


def test_render_png_differs_by_prompt_and_index() -> None:
    fox = render_png("a red fox", width=128, height=128)
    assert render_png("a blue whale", width=128, height=128) != fox
    assert render_png("a red fox", width=128, height=128, index=1) != fox


def test_render_png_accepts_lone_surrogates() -> None:
    assert check_png(render_png("odd \ud800 prompt", width=8, height=8)) == (8, 8)


def test_partial_detail_is_a_valid_png_differing_from_final() -> None:
    final = render_png("a red fox", width=256, height=256)
    coarse = render_png("a red fox", width=256, height=256, detail=0.25)
    assert check_png(coarse) == (256, 256)
    assert coarse != final


def test_pad_to_reaches_the_size_and_stays_valid() -> None:
    padded = render_png("a red fox", width=256, height=256, pad_to=200_000)
    assert len(padded) >= 200_000
    assert check_png(padded) == (256, 256)
    assert b"prVt" in padded


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ("256x256", (256, 256)),
        ("1536x1024", (1536, 1024)),
        ("1x4096", (1, 4096)),
        (None, (1024, 1024)),
        ("auto", (1024, 1024)),
        ("0x10", (1024, 1024)),
        ("4097x10", (1024, 1024)),
        ("10x", (1024, 1024)),
        ("big", (1024, 1024)),
    ],
)
def test_parse_size(size: str | None, expected: tuple[int, int]) -> None:
    assert parse_size(size) == expected


# --- ASGI without a server -------------------------------------------------------------------


def test_lifespan_startup_and_shutdown_complete() -> None:
    incoming = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent: list[str] = []

    async def receive() -> dict[str, Any]:
        return incoming.pop(0)

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message["type"])

    async def run() -> None:
        await MockUpstream()({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send)

    anyio.run(run)
    assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]


# --- over a real server ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    with serve(MockUpstream()) as base:
        yield base


@pytest.fixture(scope="module")
def client(url: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=10) as sdk:
        yield sdk


def test_sdk_generate_returns_decodable_pngs_and_usage(client: openai.OpenAI) -> None:
    result = client.images.generate(model="gpt-image-1", prompt="a red fox", n=2, size="256x256")
    assert result.data is not None
    assert len(result.data) == 2
    images = [base64.b64decode(item.b64_json or "") for item in result.data]
    assert [check_png(image) for image in images] == [(256, 256), (256, 256)]
    assert images[0] != images[1]
    assert result.usage is not None
    assert result.usage.input_tokens == 3
    assert result.usage.total_tokens == result.usage.input_tokens + result.usage.output_tokens


def test_sdk_stream_yields_partials_then_completed_and_ends(client: openai.OpenAI) -> None:
    stream = client.images.generate(
        model="gpt-image-1", prompt="a red fox", size="64x64", stream=True, partial_images=2
    )
    events = [(event.type, getattr(event, "partial_image_index", None)) for event in stream]
    assert events == [
        ("image_generation.partial_image", 0),
        ("image_generation.partial_image", 1),
        ("image_generation.completed", None),
    ]


def test_async_sdk_generate(url: str) -> None:
    async def generate() -> ImagesResponse:
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0) as sdk:
            return await sdk.images.generate(model="gpt-image-1", prompt="a cat", size="64x48")

    result = anyio.run(generate)
    assert result.data is not None
    assert png_size(base64.b64decode(result.data[0].b64_json or "")) == (64, 48)


def test_azure_client_generates(url: str) -> None:
    azure = openai.AzureOpenAI(
        azure_endpoint=url, api_key="x", api_version="2025-04-01-preview", max_retries=0
    )
    with azure:
        result = azure.images.generate(model="dep1", prompt="p")
    assert result.data is not None
    assert png_size(base64.b64decode(result.data[0].b64_json or "")) == (1024, 1024)


def test_missing_prompt_raises_bad_request(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.post("/images/generations", cast_to=ImagesResponse, body={"model": "gpt-image-1"})
    assert caught.value.param == "prompt"


def test_empty_prompt_raises_bad_request(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError):
        client.images.generate(model="gpt-image-1", prompt="")


def test_any_non_empty_prompt_is_accepted(client: openai.OpenAI) -> None:
    # The same rule as the proxy's (and the OpenAPI document's): only "" is refused.
    for prompt in ("   ", "\u001e", "\n"):
        assert client.images.generate(prompt=prompt, size="16x16").data


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "p", "n": 0}, "n"),
        ({"prompt": "p", "n": 11}, "n"),
        ({"prompt": "p", "n": "2"}, "n"),
        ({"prompt": "p", "partial_images": 4}, "partial_images"),
        ({"prompt": 5}, "prompt"),
        (["prompt"], None),
    ],
)
def test_invalid_parameters_get_400_envelope(url: str, body: Any, param: str | None) -> None:
    response = httpx.post(url + GENERATIONS, json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param


def test_unparsable_json_gets_400(url: str) -> None:
    response = httpx.post(url + GENERATIONS, content=b"{nope")
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_json"


def test_body_over_one_mib_gets_413(url: str) -> None:
    response = httpx.post(url + GENERATIONS, json={"prompt": "x" * (1024 * 1024 + 1)})
    assert response.status_code == 413
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_unknown_fields_are_ignored(url: str) -> None:
    body = {"prompt": "p", "size": "8x8", "future_knob": {"a": 1}, "moderation": "low"}
    assert httpx.post(url + GENERATIONS, json=body).status_code == 200


@pytest.mark.parametrize(
    "path",
    [
        "/images/generations",
        "/openai/v1/images/generations",
        "/openai/deployments/dep/images/generations?api-version=2025-04-01-preview",
        "/_mock/v1/images/generations",
    ],
)
def test_generations_answered_under_any_prefix(url: str, path: str) -> None:
    response = httpx.post(url + path, json={"prompt": "p", "size": "8x8"})
    assert response.status_code == 200
    assert len(response.json()["data"]) == 1


def test_response_is_openai_shaped_with_usage_last(url: str) -> None:
    response = httpx.post(url + GENERATIONS, json={"prompt": "two words", "size": "16x8"})
    assert response.headers["content-type"] == "application/json"
    assert re.fullmatch(r"req_mock_[0-9a-f]{24}", response.headers["x-request-id"])
    assert response.headers["openai-processing-ms"].isdigit()
    body = json.loads(response.content, object_pairs_hook=list)
    keys = [key for key, _ in body]
    assert keys == [
        "created", "background", "output_format", "quality", "size", "data", "usage"
    ]  # fmt: skip
    answer = response.json()
    assert answer["size"] == "16x8"
    assert answer["quality"] == "medium"
    assert answer["data"][0]["revised_prompt"] == "two words"
    assert answer["usage"]["input_tokens_details"] == {"text_tokens": 2, "image_tokens": 0}


def test_response_format_url_gives_data_url(url: str) -> None:
    body = {"prompt": "p", "size": "8x8", "response_format": "url"}
    item = httpx.post(url + GENERATIONS, json=body).json()["data"][0]
    assert "b64_json" not in item
    prefix = "data:image/png;base64,"
    assert item["url"].startswith(prefix)
    assert check_png(base64.b64decode(item["url"][len(prefix) :])) == (8, 8)


def test_stream_wire_framing(url: str) -> None:
    body = {"prompt": "p", "size": "8x8", "stream": True, "partial_images": 1, "n": 2}
    response = httpx.post(url + GENERATIONS, json=body)
    assert response.headers["content-type"] == "text/event-stream"
    assert response.headers["cache-control"] == "no-cache"
    text = response.text
    assert text.endswith("\n\n")
    blocks = text[:-2].split("\n\n")
    kinds = []
    for block in blocks:
        event_line, data_line = block.split("\n")
        kind = event_line.removeprefix("event: ")
        data = json.loads(data_line.removeprefix("data: "))
        assert data["type"] == kind
        assert check_png(base64.b64decode(data["b64_json"])) == (8, 8)
        kinds.append(kind)
    partial, completed = "image_generation.partial_image", "image_generation.completed"
    assert kinds == [partial, completed, partial, completed]


def test_get_on_generations_is_405_with_allow(url: str) -> None:
    response = httpx.get(url + GENERATIONS)
    assert response.status_code == 405
    assert response.headers["allow"] == "POST"
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_unknown_path_is_404_envelope(url: str) -> None:
    response = httpx.post(url + "/v1/chat/completions", json={})
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"


def test_healthz(url: str) -> None:
    response = httpx.get(url + "/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


# --- delays ----------------------------------------------------------------------------------


class Recorder:
    """Wraps an ASGI app to observe, from the test thread, when and how each request ended."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.finished = threading.Event()
        self.errors: list[BaseException] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await self.app(scope, receive, send)
        except BaseException as exc:
            self.errors.append(exc)
            raise
        finally:
            if scope["type"] == "http":
                self.finished.set()


def test_stream_events_are_spread_over_the_delay() -> None:
    with serve(MockUpstream(delay=0.3)) as base:
        sdk = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=5)
        with sdk:
            stream = sdk.images.generate(prompt="p", size="8x8", stream=True, partial_images=2)
            arrivals = [time.monotonic() for _ in stream]
    assert len(arrivals) == 3
    assert arrivals[-1] - arrivals[0] >= 0.1


def test_client_disconnect_during_delay_ends_request_quietly() -> None:
    recorder = Recorder(MockUpstream(delay=30))
    with serve(recorder) as base:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(base + GENERATIONS, json={"prompt": "p"}, timeout=0.2)
        assert recorder.finished.wait(5), "the request kept sleeping after the client left"
    assert recorder.errors == []


def test_client_disconnect_mid_stream_ends_request_quietly() -> None:
    recorder = Recorder(MockUpstream(delay=30))
    body = {"prompt": "p", "stream": True, "partial_images": 1}
    with serve(recorder) as base, httpx.stream("POST", base + GENERATIONS, json=body) as response:
        assert response.status_code == 200
        response.close()
        assert recorder.finished.wait(5), "the stream kept going after the client left"
    assert recorder.errors == []
