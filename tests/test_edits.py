"""Image edits and variations: multipart uploads relayed as they arrive, through the SDK."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest
from conftest import API_VERSION, CLIENT_KEY, UPSTREAM_KEY, HostApp
from double import UpstreamDouble, image_body, sse, sse_event
from python_multipart.multipart import MultipartParser, parse_options_header
from support import raw_request, read_response, serve, until
from test_cli import running

from imagegen_proxy import ImageGenProxy, ProxyConfig
from imagegen_proxy.mock import decode_png, encode_rgba

PNG = b"\x89PNG\r\n\x1a\n" + b"pixels" * 1000
EDITS = "/v1/images/edits"

# The SDK marks variations (DALL·E 2) deprecated; they are still served.
pytestmark = pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")


def client(proxy: str, **kwargs: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy + "/v1", api_key=CLIENT_KEY, max_retries=0, **kwargs)


def test_an_edit_goes_upstream_as_sent(proxy: str, upstream: UpstreamDouble) -> None:
    answer = client(proxy).images.edit(
        image=("cat.png", PNG, "image/png"),
        prompt="a hat on the cat",
        model="gpt-image-1",
        n=2,
        size="1024x1024",
    )
    assert answer.data
    request = upstream.last
    assert request.path == "/v1/images/edits"
    assert request.header("authorization") == f"Bearer {UPSTREAM_KEY}"
    assert CLIENT_KEY not in str(request.headers)
    assert (request.header("content-type") or "").startswith("multipart/form-data; boundary=")
    assert upstream.last.parts == [
        ("prompt", None, b"a hat on the cat"),
        ("model", None, b"gpt-image-1"),
        ("n", None, b"2"),
        ("size", None, b"1024x1024"),
        ("image", "cat.png", PNG),
    ]


def multipart(*parts: tuple[str, str | None, bytes], boundary: str = "b0undary") -> bytes:
    """A multipart body written by hand, in the order given."""
    out = b""
    for name, filename, content in parts:
        disposition = f'form-data; name="{name}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n".encode()
        if filename is not None:
            out += b"Content-Type: image/png\r\n"
        out += b"\r\n" + content + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def form_headers(body: bytes, boundary: str = "b0undary", **extra: str) -> dict[str, str]:
    return {
        "content-type": f"multipart/form-data; boundary={boundary}",
        "content-length": str(len(body)),
        **extra,
    }


def post_form(proxy: str, body: bytes, path: str = EDITS, **extra: str) -> httpx.Response:
    return httpx.post(proxy + path, content=body, headers=form_headers(body, **extra))


def deleted_files() -> set[str]:
    """Deleted temporary files this process holds open (pytest's capture holds some)."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith(tempfile.gettempdir()) and target.endswith("(deleted)"):
                found.add(target)
    return found


@pytest.fixture
def open_spools() -> Callable[[], set[str]]:
    """The upload spools still open: deleted temporary files held since the test began."""
    before = deleted_files()
    return lambda: deleted_files() - before


def test_a_list_of_images_and_a_mask_keep_their_names(proxy: str, upstream: UpstreamDouble) -> None:
    client(proxy).images.edit(
        image=[("a.png", PNG, "image/png"), ("b.webp", b"RIFF....WEBP", "image/webp")],
        mask=("mask.png", b"mask-bytes", "image/png"),
        prompt="compose",
        model="gpt-image-1",
    )
    assert upstream.last.parts == [
        ("prompt", None, b"compose"),
        ("model", None, b"gpt-image-1"),
        ("image[]", "a.png", PNG),
        ("image[]", "b.webp", b"RIFF....WEBP"),
        ("mask", "mask.png", b"mask-bytes"),
    ]


def edit_events(*frames: bytes) -> bytes:
    return b"".join(frames)


def test_a_streamed_edit_relays_its_partial_images(proxy: str, upstream: UpstreamDouble) -> None:
    usage = {
        "total_tokens": 400,
        "input_tokens": 300,
        "output_tokens": 100,
        "input_tokens_details": {"text_tokens": 10, "image_tokens": 290},
    }
    upstream.answer = sse(
        sse_event("image_edit.partial_image", b64_json="cDA=", partial_image_index=0),
        sse_event("image_edit.partial_image", b64_json="cDE=", partial_image_index=1),
        sse_event("image_edit.completed", b64_json="ZmluYWw=", usage=usage),
        hold=True,  # the proxy ends the answer after `completed`, whatever the upstream does
    )
    stream = client(proxy).images.edit(
        image=("cat.png", PNG, "image/png"),
        prompt="p",
        model="gpt-image-1",
        stream=True,
        partial_images=2,
    )
    events = [event.type for event in stream]
    assert events == [
        "image_edit.partial_image",
        "image_edit.partial_image",
        "image_edit.completed",
    ]
    assert upstream.last.fields["stream"] == "true"


def test_azure_edits_go_to_the_deployment(
    start_proxy: Callable[..., str], upstream: UpstreamDouble
) -> None:
    proxy = start_proxy(openai=False, azure=True)
    azure = openai.AzureOpenAI(
        azure_endpoint=proxy, api_key=CLIENT_KEY, api_version=API_VERSION, max_retries=0
    )
    azure.images.edit(image=("cat.png", PNG, "image/png"), prompt="p", model="edits-dep")
    request = upstream.last
    assert request.path == "/openai/deployments/edits-dep/images/edits"
    assert request.query == f"api-version={API_VERSION}"
    assert request.header("api-key") == UPSTREAM_KEY
    assert CLIENT_KEY not in str(request.headers)
    # An OpenAI-form edit reaches Azure too, its model naming the deployment.
    client(proxy).images.edit(image=("cat.png", PNG, "image/png"), prompt="p", model="dep-2")
    assert upstream.last.path == "/openai/deployments/dep-2/images/edits"


def test_an_azure_form_edit_to_openai_names_the_deployment_as_model(
    proxy: str, upstream: UpstreamDouble
) -> None:
    azure = openai.AzureOpenAI(
        azure_endpoint=proxy, api_key=CLIENT_KEY, api_version=API_VERSION, max_retries=0
    )
    azure.images.edit(image=("cat.png", PNG, "image/png"), prompt="p", model="my-dep")
    assert upstream.last.path == "/v1/images/edits"
    assert upstream.last.parts == [
        ("model", None, b"my-dep"),
        ("prompt", None, b"p"),
        ("image", "cat.png", PNG),
    ]


def test_variations(proxy: str, upstream: UpstreamDouble) -> None:
    answer = client(proxy).images.create_variation(
        image=("cat.png", PNG, "image/png"), model="dall-e-2", n=2, size="256x256"
    )
    assert len(answer.data) == 2
    assert upstream.last.path == "/v1/images/variations"
    assert upstream.last.parts == [
        ("model", None, b"dall-e-2"),
        ("n", None, b"2"),
        ("size", None, b"256x256"),
        ("image", "cat.png", PNG),
    ]


def test_variations_have_no_azure_form(
    start_proxy: Callable[..., str], upstream: UpstreamDouble
) -> None:
    proxy = start_proxy(openai=False, azure=True)
    with pytest.raises(openai.NotFoundError, match="variations are not available on Azure"):
        client(proxy).images.create_variation(image=("cat.png", PNG, "image/png"))
    assert not upstream.requests
    # There is no Azure path for them: the host app has it.
    answer = httpx.post(proxy + "/openai/deployments/dep/images/variations?api-version=v1")
    assert answer.status_code == 405  # the host app's catch-all route is GET only


def test_fields_after_the_files_are_read_from_a_spool(
    proxy: str, upstream: UpstreamDouble, open_spools: Callable[[], set[str]]
) -> None:
    big = os.urandom(3 * 1024 * 1024)
    body = multipart(
        ("image", "a.png", big),
        ("prompt", None, b"late prompt"),
        ("mask", "m.png", b"mask"),
        ("model", None, b"gpt-image-1"),
        ("n", None, b"2"),
    )
    answer = post_form(proxy, body)
    assert answer.status_code == 200, answer.text
    assert len(answer.json()["data"]) == 2
    # The text fields go first; the files keep their order.
    assert upstream.last.parts == [
        ("prompt", None, b"late prompt"),
        ("model", None, b"gpt-image-1"),
        ("n", None, b"2"),
        ("image", "a.png", big),
        ("mask", "m.png", b"mask"),
    ]
    assert open_spools() == set()


def test_a_deciding_field_after_streamed_files_is_refused(
    proxy: str, upstream: UpstreamDouble
) -> None:
    body = multipart(
        ("prompt", None, b"p"),
        ("model", None, b"gpt-image-1"),
        ("image", "a.png", PNG),
        ("n", None, b"10"),  # would raise the price after it was decided
    )
    answer = post_form(proxy, body)
    assert answer.status_code == 400
    assert answer.json()["error"]["param"] == "n"
    assert answer.json()["error"]["code"] == "field_after_files"
    # The upstream never got a whole request it could act on.
    assert all(not r.body.endswith(b"--\r\n") for r in upstream.requests)


@pytest.mark.parametrize(
    ("name", "first", "second"),
    [
        ("model", b"gpt-image-1", b"gpt-image-1-mini"),
        ("model", b"gpt-image-1-mini", b"gpt-image-1"),
        ("n", b"10", b"1"),
        ("n", b"1", b"10"),
        ("quality", b"low", b"high"),
        ("prompt", b"p", b"q"),
    ],
)
def test_a_checked_field_sent_twice_is_refused_before_the_upstream(
    proxy: str, upstream: UpstreamDouble, name: str, first: bytes, second: bytes
) -> None:
    # Checked once and sent twice, an upstream reading the other copy would act on a model,
    # n or quality the allow-list, quotas and reservation never saw.
    fields = [("prompt", None, b"p")] if name != "prompt" else []
    body = multipart(*fields, (name, None, first), (name, None, second), ("image", "a.png", PNG))
    answer = post_form(proxy, body)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert (error["param"], error["code"]) == (name, "duplicate_field")
    assert upstream.requests == []


@pytest.mark.parametrize(
    ("body", "headers", "status", "param", "code"),
    [
        (
            multipart(("prompt", None, b"p"), ("image", "a.png", PNG)),
            {"content-type": "text/plain"},
            415,
            None,
            "unsupported_media_type",
        ),
        (
            multipart(("prompt", None, b"p"), ("image", "a.png", PNG)),
            {"content-type": "multipart/form-data"},
            400,
            None,
            "invalid_multipart",
        ),
        (
            b"--b0undary\r\nContent-Disposition: form-data\r\n\r\nx\r\n--b0undary--\r\n",
            {},
            400,
            "part 1",
            "invalid_multipart",
        ),
        (
            multipart(("prompt", None, b"p"), ("image", "a.png", PNG))[:-30],
            {},
            400,
            "image",
            "invalid_multipart",
        ),
        (
            multipart(("prompt", None, b"p"), ("image", "a.png", PNG), boundary="other"),
            {},
            400,
            "body",  # no part could be read: the body is not of the Content-Type's boundary
            "invalid_multipart",
        ),
        (multipart(("image", "a.png", PNG)), {}, 400, "prompt", "missing_required_parameter"),
        (
            multipart(("prompt", None, b"p"), ("n", None, b"two"), ("image", "a.png", PNG)),
            {},
            400,
            "n",
            "invalid_type",
        ),
        (
            multipart(("prompt", "p.txt", b"p"), ("image", "a.png", PNG)),
            {},
            400,
            "prompt",
            "invalid_type",
        ),
        (
            multipart(("prompt", None, b"p"), *[("x", None, b"") for i in range(1001)]),
            {},
            400,
            None,
            "too_many_parts",
        ),
        (
            multipart(("prompt", None, b"p"), *[("image[]", f"{i}.png", PNG) for i in range(17)]),
            {},
            400,
            "image[]",
            "too_many_files",
        ),
    ],
)
def test_bad_uploads_get_a_clear_error(
    proxy: str,
    upstream: UpstreamDouble,
    body: bytes,
    headers: dict[str, str],
    status: int,
    param: str | None,
    code: str,
    open_spools: Callable[[], set[str]],
) -> None:
    answer = httpx.post(proxy + EDITS, content=body, headers={**form_headers(body), **headers})
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["param"], error["code"]) == (param, code)
    assert all(not r.body.endswith(b"--\r\n") for r in upstream.requests)
    until(lambda: open_spools() == set(), within=5)  # closed as the answer goes


def test_an_upload_over_the_limit_is_refused_without_reading_it(
    start_proxy: Callable[..., str], upstream: UpstreamDouble
) -> None:
    proxy = start_proxy(proxy={"max_upload_bytes": 1024 * 1024})
    head = multipart(("prompt", None, b"p"), ("model", None, b"m"))[: -len("--b0undary--\r\n")]
    # Declared: refused from the headers, before a byte of the body.
    sock = raw_request(proxy, form_headers(b"", **{"content-length": str(10**9)}), head, EDITS)
    with sock:
        answer = read_response(sock)
    assert answer.status_code == 413
    assert answer.json()["error"]["code"] == "request_too_large"

    # Not declared (chunked): refused once it grows past the limit, mid-file.
    def chunks() -> Iterator[bytes]:
        yield (
            head
            + b'--b0undary\r\nContent-Disposition: form-data; name="image"; filename="a"\r\n\r\n'
        )
        for _ in range(100):
            yield b"x" * 65536

    answer = httpx.post(
        proxy + EDITS,
        content=chunks(),
        headers={"content-type": "multipart/form-data; boundary=b0undary"},
    )
    assert answer.status_code == 413
    assert all(not r.body.endswith(b"--\r\n") for r in upstream.requests)


def test_a_keyless_upload_gets_401_before_its_body_is_read(
    start_proxy: Callable[..., str], upstream: UpstreamDouble
) -> None:
    proxy = start_proxy(auth={"open": False}, keys=[{"name": "a", "key": CLIENT_KEY}])
    # 50 MB announced, nothing sent: the answer cannot wait for the body.
    sock = raw_request(proxy, form_headers(b"", **{"content-length": str(50 * 10**6)}), b"", EDITS)
    with sock:
        answer = read_response(sock)
    assert answer.status_code == 401
    assert not upstream.requests


def test_a_slow_upload_gets_408(
    start_proxy: Callable[..., str], upstream: UpstreamDouble, open_spools: Callable[[], set[str]]
) -> None:
    # A generous bound would make the test slow; 0.5 s of silence is plenty to see the 408.
    proxy = start_proxy(proxy={"body_timeout": 0.5})
    body = multipart(("prompt", None, b"p"), ("model", None, b"m"), ("image", "a.png", PNG))
    sock = raw_request(proxy, form_headers(body), body[:-100], EDITS)
    with sock:
        answer = read_response(sock)
    assert answer.status_code == 408
    assert answer.json()["error"]["code"] == "request_timeout"
    assert all(not r.body.endswith(b"--\r\n") for r in upstream.requests)
    until(lambda: open_spools() == set(), within=5)


class HashingUpstream:
    """An upstream that hashes what it receives as it arrives, and says how far it got:
    the proof that an upload streams through the proxy instead of being collected first."""

    def __init__(self) -> None:
        self.received = 0
        self.digest = hashlib.sha256()
        self.started = threading.Event()  # the first 10 MB have arrived
        self.whole = threading.Event()  # the body arrived whole
        self.gone = threading.Event()  # the proxy dropped the request mid-body
        self.parser: MultipartParser | None = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        content_type = dict(scope["headers"])[b"content-type"]
        _, options = parse_options_header(content_type)
        in_image = False

        def begin() -> None:
            nonlocal in_image
            in_image = False

        def header_value(data: bytes, start: int, end: int) -> None:
            nonlocal in_image
            in_image = in_image or b'name="image"' in data[start:end]

        def part_data(data: bytes, start: int, end: int) -> None:
            if in_image:
                self.digest.update(data[start:end])

        parser = MultipartParser(
            options[b"boundary"],
            {"on_part_begin": begin, "on_header_value": header_value, "on_part_data": part_data},
        )
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.gone.set()
                return
            parser.write(message.get("body", b""))
            self.received += len(message.get("body", b""))
            if self.received > 10 * 1024 * 1024:
                self.started.set()
            if not message.get("more_body"):
                break
        self.whole.set()
        body = image_body("aW1hZ2U=")
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})


@pytest.fixture
def hashing() -> Iterator[tuple[HashingUpstream, str]]:
    double = HashingUpstream()
    with serve(double) as url:
        yield double, url


@contextlib.contextmanager
def hashing_proxy(url: str) -> Iterator[str]:
    config = ProxyConfig.model_validate(
        {
            "auth": {"open": True},
            "openai": {"base_url": url + "/v1", "api_key": UPSTREAM_KEY},
            "access_log": {"enabled": True},
        }
    )
    with serve(ImageGenProxy(HostApp().app, config)) as proxy:
        yield proxy


def test_a_40_mb_upload_streams_through_intact(hashing: tuple[HashingUpstream, str]) -> None:
    double, url = hashing
    image = os.urandom(40 * 1024 * 1024)
    head, tail = multipart(
        ("prompt", None, b"p"), ("model", None, b"gpt-image-1"), ("image", "big.png", image)
    ).split(image[-4096:])
    with hashing_proxy(url) as proxy:
        headers = form_headers(b"", **{"content-length": str(len(head) + 4096 + len(tail))})
        sock = raw_request(proxy, headers, head, EDITS)
        with sock:
            # The upstream has most of the image while the client still holds its end back.
            assert double.started.wait(30), "the upload did not stream"
            assert not double.whole.is_set()
            sock.sendall(image[-4096:] + tail)
            answer = read_response(sock)
    assert answer.status_code == 200, answer.text
    assert double.digest.hexdigest() == hashlib.sha256(image).hexdigest()


def test_a_client_that_vanishes_mid_upload_cancels_the_upstream_request(
    hashing: tuple[HashingUpstream, str], caplog: pytest.LogCaptureFixture
) -> None:
    double, url = hashing
    image = os.urandom(20 * 1024 * 1024)
    body = multipart(("prompt", None, b"p"), ("model", None, b"m"), ("image", "a.png", image))
    caplog.set_level(logging.INFO, logger="imagegen_proxy.access")
    with hashing_proxy(url) as proxy:
        sock = raw_request(proxy, form_headers(body), body[: 15 * 1024 * 1024], EDITS)
        assert double.started.wait(30)
        sock.close()
        assert double.gone.wait(10), "the upstream request was not cancelled"
    assert not double.whole.is_set()
    (line,) = [r.access for r in caplog.records if hasattr(r, "access")]  # type: ignore[attr-defined]
    assert line["outcome"] == "client_gone" and line["operation"] == "edit"
    assert line["images"] == 0  # the upstream never had the whole request: nothing to pay


def test_the_bundled_proxy_edits_on_its_mock() -> None:
    # The no-config mode: the embedded mock decodes the PNG and tints it by the prompt.
    grey = encode_rgba(64, 64, bytes([128, 128, 128, 255]) * 64 * 64)
    with running(lines=7) as (url, _):
        answer = openai.OpenAI(base_url=url + "/v1", api_key="any", max_retries=0).images.edit(
            image=("grey.png", grey, "image/png"), prompt="make it red", model="gpt-image-1"
        )
    assert answer.usage is not None and answer.usage.input_tokens_details.image_tokens > 0
    assert answer.data and answer.data[0].b64_json
    bitmap = decode_png(base64.b64decode(answer.data[0].b64_json))
    assert bitmap is not None and (bitmap.width, bitmap.height) == (64, 64)
    red, green, blue = bitmap.rgba[0:3]
    assert red > 128 > green and green == blue  # grey, tinted red


@pytest.mark.anyio
async def test_the_async_client_edits_and_streams(proxy: str, upstream: UpstreamDouble) -> None:
    upstream.answer = sse(sse_event("image_edit.completed", b64_json="ZmluYWw=", usage={}))
    client = openai.AsyncOpenAI(base_url=proxy + "/v1", api_key=CLIENT_KEY, max_retries=0)
    stream = await client.images.edit(
        image=("a.png", PNG, "image/png"), prompt="p", model="gpt-image-1", stream=True
    )
    assert [event.type async for event in stream] == ["image_edit.completed"]
    await client.close()


def test_a_client_that_vanishes_while_spooling_leaves_no_file(
    proxy: str, upstream: UpstreamDouble, open_spools: Callable[[], set[str]]
) -> None:
    body = multipart(("image", "a.png", os.urandom(4 * 1024 * 1024)), ("prompt", None, b"p"))
    sock = raw_request(proxy, form_headers(body), body[: 3 * 1024 * 1024], EDITS)
    until(lambda: open_spools() != set(), within=10)  # the image is on its way to disk
    sock.close()
    until(lambda: open_spools() == set(), within=10)
    assert not upstream.requests


def test_sixteen_images_and_a_mask_pass_and_other_fields_go_as_sent(
    proxy: str, upstream: UpstreamDouble
) -> None:
    images = [(f"{i}.png", PNG, "image/png") for i in range(16)]
    client(proxy).images.edit(
        image=images,
        mask=("m.png", b"mask", "image/png"),
        prompt="p",
        model="gpt-image-1",
        extra_body={"user": "caf\xe9"},
    )
    names = [name for name, _, _ in upstream.last.parts]
    assert names.count("image[]") == 16 and names.count("mask") == 1
    # A field the proxy does not decide on goes as sent, whatever its bytes.
    body = multipart(
        ("prompt", None, b"p"),
        ("model", None, b"m"),
        ("user", None, b"\xff\xfe"),
        ("image", "a", PNG),
    )
    assert post_form(proxy, body).status_code == 200
    assert ("user", None, b"\xff\xfe") in upstream.last.parts
