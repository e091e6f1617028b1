"""Image edits with a JSON body (`images: [{"image_url"} | {"file_id"}]`): checked, their
images spooled to disk rather than held, relayed, priced and failed over like any request.

The SDK has no method for them: its generic `client.post` is how a user sends one.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from conftest import API_VERSION, CLIENT_KEY, UPSTREAM_KEY, HostApp
from double import UpstreamDouble, image_body, sse, sse_event
from openai.types import ImagesResponse
from support import on_store, raw_request, read_response, serve, until
from test_edits import PNG, deleted_files, form_headers, multipart
from test_pool import member

from imagegen_proxy import ImageGenProxy, ProxyConfig
from imagegen_proxy.wire.json_upload import LONG_STRING

EDITS = "/v1/images/edits"
DATA_URL = "data:image/png;base64," + base64.b64encode(PNG).decode()


def sdk(proxy: str, key: str = CLIENT_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy + "/v1", api_key=key, max_retries=0)


def json_edit(proxy: str, body: dict[str, Any], key: str = CLIENT_KEY) -> ImagesResponse:
    return sdk(proxy, key).post("/images/edits", body=body, cast_to=ImagesResponse)


def post(proxy: str, body: bytes | dict[str, Any], path: str = EDITS) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"content-type": "application/json", "authorization": f"Bearer {CLIENT_KEY}"}
    return httpx.post(proxy + path, content=content, headers=headers, timeout=30)


def test_a_json_edit_goes_upstream_as_json(proxy: str, upstream: UpstreamDouble) -> None:
    body = {
        "model": "gpt-image-2",
        "prompt": "a hat on the cat",
        "images": [{"image_url": DATA_URL}, {"file_id": "file-abc123"}],
        "mask": {"image_url": "https://example.com/mask.png"},
        "size": "1024x1024",
        "input_fidelity": "high",  # a field the proxy does not know passes as sent
    }
    assert json_edit(proxy, body).data
    request = upstream.last
    assert request.path == "/v1/images/edits"
    assert request.header("content-type") == "application/json"
    assert request.header("authorization") == f"Bearer {UPSTREAM_KEY}"
    assert CLIENT_KEY not in str(request.headers)
    assert request.json == body


def test_a_long_image_goes_upstream_byte_for_byte_as_sent(
    proxy: str, upstream: UpstreamDouble
) -> None:
    # Escaped slashes, as PHP's json_encode writes them, and other escapes, spread over
    # chunk boundaries: the string reaches the upstream exactly as the client wrote it.
    image = "data:image\\/png;base64," + "QUJD\\/\\u0041\\n" * (LONG_STRING // 4)
    raw = b'{"prompt": "p", "images": [{"image_url": "' + image.encode() + b'"}]}'
    answer = post(proxy, raw)
    assert answer.status_code == 200, answer.text
    assert b'"image_url":"' + image.encode() + b'"' in upstream.last.body
    sent = json.loads(raw)["images"][0]["image_url"]
    assert upstream.last.json["images"][0]["image_url"] == sent


def test_a_streamed_json_edit_relays_its_events(proxy: str, upstream: UpstreamDouble) -> None:
    upstream.answer = sse(
        sse_event("image_edit.partial_image", b64_json="cDA=", partial_image_index=0),
        sse_event("image_edit.completed", b64_json="ZmluYWw="),
    )
    body = {"model": "gpt-image-2", "prompt": "p", "images": [{"image_url": DATA_URL}]}
    stream = sdk(proxy).post(
        "/images/edits",
        body={**body, "stream": True, "partial_images": 1},
        cast_to=object,
        stream=True,
        stream_cls=openai.Stream[openai.types.ImageEditStreamEvent],
    )
    assert [event.type for event in stream] == [
        "image_edit.partial_image",
        "image_edit.completed",
    ]
    assert upstream.last.json["stream"] is True


def test_an_azure_json_edit_goes_to_the_deployment(
    start_proxy: Callable[..., str], upstream: UpstreamDouble
) -> None:
    proxy = start_proxy(openai=False, azure=True)
    path = f"/openai/deployments/img-edit/images/edits?api-version={API_VERSION}"
    body = {"prompt": "p", "images": [{"image_url": DATA_URL}]}
    answer = post(proxy, body, path)
    assert answer.status_code == 200, answer.text
    assert upstream.last.path == "/openai/deployments/img-edit/images/edits"
    assert upstream.last.json == body


def test_an_azure_form_json_edit_to_openai_names_the_deployment_as_model(
    proxy: str, upstream: UpstreamDouble
) -> None:
    path = f"/openai/deployments/gpt-image-2/images/edits?api-version={API_VERSION}"
    answer = post(proxy, {"prompt": "p", "images": [{"file_id": "file-1"}]}, path)
    assert answer.status_code == 200, answer.text
    assert upstream.last.path == "/v1/images/edits"
    assert upstream.last.json["model"] == "gpt-image-2"


def test_the_async_client_sends_json_edits(proxy: str, upstream: UpstreamDouble) -> None:
    async def edit() -> ImagesResponse:
        client = openai.AsyncOpenAI(base_url=proxy + "/v1", api_key=CLIENT_KEY, max_retries=0)
        async with client:
            body = {"prompt": "p", "images": [{"image_url": DATA_URL}]}
            return await client.post("/images/edits", body=body, cast_to=ImagesResponse)

    assert asyncio.run(edit()).data
    assert upstream.last.json["images"] == [{"image_url": DATA_URL}]


GOOD = {"prompt": "p", "images": [{"image_url": DATA_URL}]}


@pytest.mark.parametrize(
    ("body", "status", "param", "code"),
    [
        ({"prompt": "p"}, 400, "images", "missing_required_parameter"),
        ({"images": [{"file_id": "f"}]}, 400, "prompt", "missing_required_parameter"),
        ({**GOOD, "images": []}, 400, "images", "invalid_value"),
        ({**GOOD, "images": [{"file_id": "f"}] * 17}, 400, "images", "invalid_value"),
        ({**GOOD, "images": [{"file_id": "f", "image_url": "u"}]}, 400, "images.0", None),
        ({**GOOD, "images": [{}]}, 400, "images.0", None),
        ({**GOOD, "images": [{"file_id": "f", "image_url": None}]}, 400, "images.0", None),
        ({**GOOD, "images": [{"url": "u"}]}, 400, "images.0.url", None),
        ({**GOOD, "images": [{"file_id": 7}]}, 400, "images.0.file_id", "invalid_type"),
        ({**GOOD, "images": "a.png"}, 400, "images", "invalid_type"),
        ({**GOOD, "mask": "m.png"}, 400, "mask", "invalid_type"),
        ({**GOOD, "n": "2"}, 400, "n", "invalid_type"),
        ({**GOOD, "model": "dall-e-2"}, 400, "model", "invalid_value"),
        # A long string anywhere but an image: it is no prompt of 32,000 characters.
        ({**GOOD, "prompt": "p" * (LONG_STRING + 1)}, 400, "prompt", "string_above_max_length"),
        ({**GOOD, "user": "u" * (LONG_STRING + 1)}, 400, "user", "string_above_max_length"),
        (
            {**GOOD, "output_format": "gif", "mask": {"file_id": "m"}},
            400,
            "mask",
            "unsupported_parameter_combination",
        ),
    ],
)
def test_a_bad_json_edit_gets_a_clear_error_before_the_upstream(
    proxy: str,
    upstream: UpstreamDouble,
    body: dict[str, Any],
    status: int,
    param: str,
    code: str | None,
) -> None:
    answer = post(proxy, body)
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    if code is not None:
        assert error["code"] == code
    assert not upstream.requests


@pytest.mark.parametrize(
    "raw",
    [
        b'{"prompt": "p", "images": [',  # cut short
        b'{"prompt": "p", "images": [{"image_url": "abc',  # inside a string
        b'{"prompt": "p\x01", "images": [{"file_id": "f"}]}',  # a raw control character
        b'{"prompt": "\\q", "images": [{"file_id": "f"}]}',  # an escape JSON has not
        b"[1, 2]",
        b"",
        # The same, in a long string the proxy never parses whole.
        b'{"prompt": "p", "images": [{"image_url": "' + b"A" * LONG_STRING + b'\\x"}]}',
        b'{"prompt": "p", "images": [{"image_url": "' + b"A" * LONG_STRING + b'\\u12g4"}]}',
        b'{"prompt": "p", "images": [{"image_url": "' + b"A" * LONG_STRING + b'\x7f\x00"}]}',
        b'{"prompt": "p", "images": [{"image_url": "' + b"A" * LONG_STRING + b'\xff"}]}',
        b'{"prompt": "p", "images": [{"image_url": "' + b"A" * LONG_STRING,
    ],
)
def test_malformed_json_edits_are_invalid_json(
    proxy: str, upstream: UpstreamDouble, raw: bytes
) -> None:
    answer = post(proxy, raw)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["code"] in ("invalid_json", "invalid_type")
    assert not upstream.requests


def test_json_variations_are_refused(proxy: str, upstream: UpstreamDouble) -> None:
    answer = post(proxy, GOOD, "/v1/images/variations")
    assert answer.status_code == 415
    assert "multipart/form-data" in answer.json()["error"]["message"]
    assert not upstream.requests


def test_a_json_edit_over_the_upload_limit_is_413(
    start_proxy: Callable[..., str], upstream: UpstreamDouble
) -> None:
    proxy = start_proxy(proxy={"max_upload_bytes": 1024 * 1024})
    big = {"prompt": "p", "images": [{"image_url": "data:," + "A" * 1024 * 1024}]}
    answer = post(proxy, big)
    assert answer.status_code == 413
    assert not upstream.requests


def test_a_json_edit_fails_over_to_the_next_upstream_whole() -> None:
    # Its body is on disk: unlike a multipart upload, it can be sent again.
    a, b = UpstreamDouble(), UpstreamDouble()

    async def unavailable(x: Any) -> None:
        await x.start(503, [("content-type", "application/json")])
        await x.body(b'{"error": {"message": "busy", "type": "server_error"}}', more=False)

    a.answer = unavailable
    with contextlib.ExitStack() as stack:
        a.url, b.url = stack.enter_context(serve(a)), stack.enter_context(serve(b))
        members = [member("a", a.url, priority=1), member("b", b.url, priority=2)]
        config = {"auth": {"open": True}, "upstreams": members, "pool": {}}
        proxy = ImageGenProxy(HostApp().app, ProxyConfig.model_validate(config))
        url = stack.enter_context(serve(proxy))
        answer = post(url, body := json_failover_body())
    assert answer.status_code == 200, answer.text
    assert len(a.requests) == len(b.requests) == 1
    assert a.requests[0].body == b.requests[0].body
    assert b.last.json == body


def json_failover_body() -> dict[str, Any]:
    image = "data:image/png;base64," + base64.b64encode(os.urandom(3 * LONG_STRING)).decode()
    return {"model": "gpt-image-2", "prompt": "p", "images": [{"image_url": image}] * 3}


class DiskUpstream:
    """An upstream that writes each body it gets to a file rather than memory, and
    answers with one image."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.bodies: list[Path] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        path = self.folder / f"body{len(self.bodies)}.json"
        with path.open("wb") as out:
            while True:
                message = await receive()
                out.write(message.get("body", b""))
                if not message.get("more_body"):
                    break
        self.bodies.append(path)
        body = image_body("aW1hZ2U=")
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})


@contextlib.contextmanager
def disk_proxy(folder: Path) -> Iterator[tuple[str, DiskUpstream]]:
    double = DiskUpstream(folder)
    with serve(double) as url:
        config = ProxyConfig.model_validate(
            {"auth": {"open": True}, "openai": {"base_url": url + "/v1", "api_key": "k"}}
        )
        with serve(ImageGenProxy(HostApp().app, config)) as proxy:
            yield proxy, double


def test_sixty_megabytes_of_images_pass_without_being_held_in_memory(tmp_path: Path) -> None:
    # Three images of 20 MB, sent in 64 KB chunks from a generator: if the proxy (in this
    # process, in its server's thread) held the body, memory would peak above 60 MB.
    block = base64.b64encode(os.urandom(48 * 1024)).decode()  # 64 KB of base64
    images = 3
    per_image = 319  # blocks: just under the 20 MiB an image_url may have

    def body() -> Iterator[bytes]:
        yield b'{"model": "gpt-image-2", "prompt": "p", "images": ['
        for index in range(images):
            yield (", " if index else "").encode() + b'{"image_url": "data:image/png;base64,'
            for _ in range(per_image):
                yield block.encode()
            yield b'"}'
        yield b"]}"

    with disk_proxy(tmp_path) as (proxy, double):
        tracemalloc.start()
        try:
            answer = httpx.post(
                proxy + EDITS,
                content=body(),
                headers={"content-type": "application/json"},
                timeout=120,
            )
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert answer.status_code == 200, answer.text
    assert peak < 16 * 1024 * 1024, f"peak {peak / 1e6:.1f} MB"
    [sent] = double.bodies
    expected = "data:image/png;base64," + block * per_image
    relayed = json.loads(sent.read_bytes())
    assert relayed["model"] == "gpt-image-2"
    assert [i["image_url"] == expected for i in relayed["images"]] == [True] * images


def test_a_client_that_vanishes_mid_json_upload_leaves_nothing(
    start_proxy: Callable[..., str], upstream: UpstreamDouble, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="imagegen_proxy.access")
    proxy = start_proxy(access_log={"enabled": True})
    head = b'{"prompt": "p", "images": [{"image_url": "data:,' + b"A" * (4 * LONG_STRING)
    headers = {"content-type": "application/json", "content-length": str(len(head) * 2)}
    before = deleted_files()
    sock = raw_request(proxy, headers, head, EDITS)
    sock.close()
    until(lambda: any(hasattr(r, "access") for r in caplog.records), within=10)
    (line,) = [r.access for r in caplog.records if hasattr(r, "access")]  # type: ignore[attr-defined]
    assert line["outcome"] == "client_gone" and line["operation"] == "edit"
    assert not upstream.requests
    until(lambda: deleted_files() <= before, within=10)


def test_a_slow_json_upload_gets_408(
    start_proxy: Callable[..., str], upstream: UpstreamDouble
) -> None:
    proxy = start_proxy(proxy={"body_timeout": 0.5})
    head = b'{"prompt": "p", "images": [{"file_id": "f"'
    headers = {"content-type": "application/json", "content-length": str(len(head) + 2)}
    with raw_request(proxy, headers, head, EDITS) as sock:
        answer = read_response(sock)  # the rest never comes
    assert answer.status_code == 408
    assert answer.json()["error"]["code"] == "request_timeout"
    assert not upstream.requests


KEY = "sk-checkout-bot-0123456789"


@pytest.mark.parametrize("model", ["gpt-image-2", "gpt-image-2.5-sunburst", "gpt-image-2.6-flare"])
@pytest.mark.parametrize("shape", ["multipart", "json"])
def test_a_budgeted_edit_on_todays_models_is_in_the_ledger_at_its_exact_cost(
    start_proxy: Callable[..., str],
    upstream: UpstreamDouble,
    tmp_path: Path,
    model: str,
    shape: str,
) -> None:
    url = f"sqlite:///{tmp_path}/ledger.db"
    keys = [{"name": "checkout-bot", "key": KEY, "budget_usd": 5.0, "budget_period": "day"}]
    proxy = start_proxy(auth={"open": False}, keys=keys, store={"url": url})
    usage = {
        "total_tokens": 1300,
        "input_tokens": 1000,
        "output_tokens": 300,
        "input_tokens_details": {"text_tokens": 10, "image_tokens": 990},
        "output_tokens_details": {"text_tokens": 0, "image_tokens": 300},
    }

    async def answer(x: Any) -> None:
        body = json.dumps({"created": 1, "data": [{"b64_json": "aW1n"}], "usage": usage})
        await x.start(200, [("content-type", "application/json")])
        await x.body(body.encode(), more=False)

    upstream.answer = answer
    if shape == "json":
        body = {"model": model, "prompt": "p", "images": [{"image_url": DATA_URL}]}
        assert json_edit(proxy, body, KEY).data
    else:
        client = sdk(proxy, KEY)
        assert client.images.edit(image=("a.png", PNG, "image/png"), prompt="p", model=model)

    async def costs(store: Any) -> list[tuple[str, str, int]]:
        from sqlalchemy import text

        async with store.engine.connect() as connection:
            rows = await connection.execute(text("select source, model, cost_micros from ledger"))
            return [tuple(row) for row in rows]

    # 10 text tokens at $5/1M, 990 image tokens at $8/1M, 300 output tokens at $30/1M.
    exact = 10 * 5 + 990 * 8 + 300 * 30
    until(lambda: on_store(url, costs) == [("image.edit", model, exact)], within=10)


def test_a_gif_is_refused_what_it_cannot_be_made_with(proxy: str, upstream: UpstreamDouble) -> None:
    client = sdk(proxy)
    gif = {"model": "gpt-image-2.6-sunburst", "prompt": "p", "output_format": "gif"}
    for extra, param in [
        ({"stream": True}, "stream"),
        ({"stream": True, "partial_images": 2}, "stream"),
        ({"partial_images": 2}, "partial_images"),
        ({"output_compression": 50}, "output_compression"),
    ]:
        with pytest.raises(openai.BadRequestError) as refused:
            client.post("/images/generations", body={**gif, **extra}, cast_to=ImagesResponse)
        assert refused.value.param == param
        assert refused.value.code == "unsupported_parameter_combination"
    # A multipart edit under a mask, the mask after its images, as the SDK sends it.
    with pytest.raises(openai.BadRequestError) as refused:
        client.images.edit(
            image=("a.png", PNG, "image/png"),
            mask=("m.png", PNG, "image/png"),
            prompt="p",
            model="gpt-image-2.6-sunburst",
            output_format="gif",  # type: ignore[arg-type]
        )
    assert refused.value.param == "mask"
    assert not upstream.requests
    # What a GIF may have passes, with its frames.
    body = {**gif, "frame_count": 4, "frame_duration_ms": 120}
    assert client.post("/images/generations", body=body, cast_to=ImagesResponse).data
    assert upstream.last.json == body


def test_a_gif_edit_without_a_mask_passes(proxy: str, upstream: UpstreamDouble) -> None:
    raw = multipart(
        ("prompt", None, b"p"),
        ("model", None, b"gpt-image-2.6-sunburst"),
        ("output_format", None, b"gif"),
        ("image", "a.png", PNG),
    )
    answer = httpx.post(proxy + EDITS, content=raw, headers=form_headers(raw))
    assert answer.status_code == 200, answer.text
    assert upstream.last.fields["output_format"] == "gif"
