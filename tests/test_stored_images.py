"""Images kept in `[storage]` and answered as URLs, through the proxy with the official
SDK: a `file://` store served by the proxy's signed URLs, and a real S3 API (moto) on
loopback."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import os
import socket
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from conftest import CLIENT_KEY, UPSTREAM_KEY, HostApp
from double import Exchange, UpstreamDouble, completed, json_image, partial, sse
from providers import b64, gemini_image, gemini_member, png
from support import bound, serve, until

from imagegen_proxy import ImageGenProxy, ProxyConfig

SIGNING = "storage-signing-key-0123456789"
Start = Callable[..., str]


def image_answer(image: bytes, n: int = 1) -> Any:
    """The OpenAI double answering `n` copies of `image` (a real PNG) as base64."""
    return json_image(b64(image)) if n == 1 else _many(image, n)


def _many(image: bytes, n: int) -> Any:
    async def answer(x: Exchange) -> None:
        body = json.dumps(
            {"created": 1, "data": [{"b64_json": b64(image)} for _ in range(n)], "usage": {}}
        ).encode()
        await x.start(200, [("content-type", "application/json")])
        await x.body(body, more=False)

    return answer


@pytest.fixture
def signing(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("IMAGE_SIGNING_KEY", SIGNING)
    return SIGNING


@pytest.fixture
def stored(upstream: UpstreamDouble, tmp_path: Path, signing: str) -> Iterator[Callable[..., str]]:
    """Start a proxy with a `file://` store in `tmp_path/images`; returns its URL."""
    with contextlib.ExitStack() as stack:

        def start(members: list[dict[str, Any]] | None = None, **storage: Any) -> str:
            sock = bound()
            url = f"http://127.0.0.1:{sock.getsockname()[1]}"
            settings = {
                "url": (tmp_path / "images").as_uri(),
                "public_url": url,
                "signing_key_env": "IMAGE_SIGNING_KEY",
                **storage,
            }
            config: dict[str, Any] = {"auth": {"open": True}, "storage": settings}
            if members is None:
                config["openai"] = {"base_url": upstream.url + "/v1", "api_key": UPSTREAM_KEY}
            else:
                config["upstreams"] = members
            proxy = ImageGenProxy(HostApp().app, ProxyConfig.model_validate(config))
            return stack.enter_context(serve(proxy, sock=sock))

        yield start


def sdk(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=CLIENT_KEY, max_retries=0)


def kept(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and ".incoming" not in p.parts)


def test_a_generation_answers_a_url_to_the_kept_image(
    upstream: UpstreamDouble, stored: Start, tmp_path: Path
) -> None:
    image = png(40, 30)
    upstream.answer = image_answer(image)
    url = stored()
    result = sdk(url).images.generate(model="gpt-image-1", prompt="p", response_format="url")
    assert result.data is not None and result.data[0].b64_json is None
    link = result.data[0].url
    assert link is not None and link.startswith(url + "/v1/imagegen/files/")
    fetched = httpx.get(link)
    assert fetched.status_code == 200 and fetched.content == image
    assert fetched.headers["content-type"] == "image/png"
    assert "response_format" not in upstream.last.json  # gpt-image answers base64 only
    [one] = kept(tmp_path / "images")
    assert one.read_bytes() == image and one.name.endswith("-0.png")


def test_dall_e_is_asked_for_base64(upstream: UpstreamDouble, stored: Start) -> None:
    upstream.answer = image_answer(png())
    url = stored()
    sdk(url).images.generate(model="dall-e-3", prompt="p", response_format="url")
    assert upstream.last.json["response_format"] == "b64_json"


def test_n_images_are_n_urls(
    upstream: UpstreamDouble, stored: Start, either_store: dict[str, Any]
) -> None:
    image = png(16, 16)
    upstream.answer = image_answer(image, n=3)
    url = stored(**either_store)
    result = sdk(url).images.generate(model="gpt-image-1", prompt="p", n=3, response_format="url")
    assert result.data is not None and len({one.url for one in result.data}) == 3
    assert all(httpx.get(one.url or "").content == image for one in result.data)


def test_a_stream_keeps_partial_images_base64_and_completes_with_a_url(
    upstream: UpstreamDouble, stored: Start, either_store: dict[str, Any]
) -> None:
    image = png(24, 24)
    upstream.answer = sse(partial(0), completed(b64(image)))
    url = stored(**either_store)
    events = list(
        sdk(url).images.generate(
            model="gpt-image-1", prompt="p", stream=True, partial_images=1, response_format="url"
        )
    )
    assert [e.type for e in events] == [
        "image_generation.partial_image",
        "image_generation.completed",
    ]
    final = events[-1].model_dump()
    assert not final.get("b64_json")
    assert httpx.get(final["url"]).content == image


def test_a_signed_url_tampered_or_expired_is_a_404(upstream: UpstreamDouble, stored: Start) -> None:
    upstream.answer = image_answer(png())
    url = stored()
    link = sdk(url).images.generate(model="gpt-image-1", prompt="p", response_format="url")
    good = httpx.URL(link.data[0].url or "")  # type: ignore[index]
    key = good.path.removeprefix("/v1/imagegen/files/")
    tampered = good.copy_with(path="/v1/imagegen/files/" + key.replace("-0", "-1"))
    assert httpx.get(tampered).status_code == 404
    past = "1000000000"
    signature = hmac.new(SIGNING.encode(), f"{key}\n{past}".encode(), hashlib.sha256).hexdigest()
    expired = good.copy_with(params={"expires": past, "signature": signature})
    answer = httpx.get(expired)
    assert answer.status_code == 404 and answer.json()["error"]["code"] == "not_found"
    escape = good.copy_with(raw_path=b"/v1/imagegen/files/..%2F..%2Fetc%2Fpasswd")
    assert httpx.get(escape).status_code == 404


def test_a_store_that_fails_is_a_502_and_no_url(
    upstream: UpstreamDouble, stored: Start, tmp_path: Path
) -> None:
    upstream.answer = image_answer(png())
    (tmp_path / "images").write_text("a file where the store's directory should be")
    url = stored()
    with pytest.raises(openai.InternalServerError) as caught:
        sdk(url).images.generate(model="gpt-image-1", prompt="p", response_format="url")
    assert caught.value.code == "storage_unavailable"


def test_a_store_that_fails_answers_inline_when_told_to(
    upstream: UpstreamDouble, stored: Start, tmp_path: Path
) -> None:
    image = png(12, 12)
    upstream.answer = image_answer(image)
    (tmp_path / "images").write_text("not a directory")
    url = stored(on_error="inline")
    result = sdk(url).images.generate(model="gpt-image-1", prompt="p", response_format="url")
    assert result.data is not None and result.data[0].url is None
    assert base64.b64decode(result.data[0].b64_json or "") == image


def test_keep_always_stores_what_was_asked_as_base64(
    upstream: UpstreamDouble, stored: Start, tmp_path: Path
) -> None:
    image = png(20, 10)
    upstream.answer = image_answer(image)
    url = stored(keep="always")
    result = sdk(url).images.generate(model="gpt-image-1", prompt="p")
    assert base64.b64decode(result.data[0].b64_json or "") == image  # type: ignore[index]
    assert until(lambda: len(kept(tmp_path / "images")) == 1, 10)
    assert kept(tmp_path / "images")[0].read_bytes() == image


def test_a_client_that_leaves_leaves_no_object(
    upstream: UpstreamDouble, stored: Start, tmp_path: Path
) -> None:
    async def half(x: Exchange) -> None:
        await x.start(200, [("content-type", "application/json")])
        await x.body(b'{"created":1,"data":[{"b64_json":"' + base64.b64encode(png(64, 64)))
        await x.until_disconnect()

    upstream.answer = half
    url = stored()
    body = json.dumps({"model": "gpt-image-1", "prompt": "p", "response_format": "url"}).encode()
    with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) as sock:
        head = "POST /v1/images/generations HTTP/1.1\r\nhost: t\r\n"
        head += f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
        sock.sendall(head.encode() + body)
        assert upstream.arrived.wait(10)
    assert upstream.gone.wait(10)  # generous: a loaded machine; the point is that it happens
    root = tmp_path / "images"
    assert until(lambda: not any((root / ".incoming").glob("*")) if root.exists() else True, 10)
    assert kept(root) == []


def test_an_edit_answers_a_url(
    upstream: UpstreamDouble, stored: Start, either_store: dict[str, Any]
) -> None:
    image = png(30, 30)
    upstream.answer = image_answer(image)
    url = stored(**either_store)
    result = sdk(url).images.edit(
        model="gpt-image-1", image=("in.png", png(), "image/png"), prompt="p", response_format="url"
    )
    assert httpx.get(result.data[0].url or "").content == image  # type: ignore[index]
    assert "response_format" not in upstream.last.fields


def test_another_providers_images_are_kept_too(upstream: UpstreamDouble, stored: Start) -> None:
    image = png(48, 32)
    upstream.answer = gemini_image(image)
    url = stored([gemini_member(upstream)])
    result = sdk(url).images.generate(
        model="gemini-3.1-flash-image", prompt="p", response_format="url"
    )
    assert httpx.get(result.data[0].url or "").content == image  # type: ignore[index]


def test_without_storage_a_url_is_the_upstreams_business(
    upstream: UpstreamDouble, proxy: str
) -> None:
    sdk(proxy).images.generate(model="dall-e-3", prompt="p", response_format="url")
    assert upstream.last.json["response_format"] == "url"


# --- an S3-compatible store: moto's S3 server on loopback ----------------------------------


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    from s3_server import s3_server

    with s3_server() as url:
        yield url


@pytest.fixture
def bucket(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    from s3_server import ACCESS_KEY, SECRET_KEY, s3_client

    monkeypatch.setenv("S3_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("S3_SECRET", SECRET_KEY)
    client = s3_client(s3_endpoint)
    name = "images-" + os.urandom(4).hex()
    client.create_bucket(Bucket=name)
    yield client, name


def s3_settings(endpoint: str, name: str, **extra: Any) -> dict[str, Any]:
    return {
        "url": f"s3://{name}/kept",
        "endpoint_url": endpoint,
        "region": "us-east-1",
        "access_key_id_env": "S3_KEY_ID",
        "secret_access_key_env": "S3_SECRET",
        "part_size": 5 * 1024 * 1024,
        **extra,
    }


def objects(client: Any, name: str) -> list[str]:
    return [item["Key"] for item in client.list_objects_v2(Bucket=name).get("Contents", [])]


@pytest.mark.parametrize("size", [20_000, 12 * 1024 * 1024])  # one put, and three parts
def test_s3_keeps_the_image_and_presigns_its_url(
    upstream: UpstreamDouble, stored: Start, s3_endpoint: str, bucket: Any, size: int
) -> None:
    client, name = bucket
    image = png(64, 64, pad_to=size)
    upstream.answer = image_answer(image)
    url = stored(**s3_settings(s3_endpoint, name))
    result = sdk(url).images.generate(model="gpt-image-1", prompt="p", response_format="url")
    link = result.data[0].url or ""  # type: ignore[index]
    assert link.startswith(s3_endpoint) and "Signature" in link
    assert httpx.get(link).content == image
    [key] = objects(client, name)
    assert key.startswith("kept/_/") and key.endswith("-0.png")
    assert client.list_multipart_uploads(Bucket=name).get("Uploads", []) == []


def test_s3_a_client_that_leaves_leaves_no_object_nor_upload(
    upstream: UpstreamDouble, stored: Start, s3_endpoint: str, bucket: Any
) -> None:
    client, name = bucket
    sent = threading.Event()

    async def half(x: Exchange) -> None:
        await x.start(200, [("content-type", "application/json")])
        big = base64.b64encode(png(64, 64, pad_to=7 * 1024 * 1024))  # past one 5 MiB part
        await x.body(b'{"created":1,"data":[{"b64_json":"' + big)
        sent.set()
        await x.until_disconnect()

    upstream.answer = half
    url = stored(**s3_settings(s3_endpoint, name))
    body = json.dumps({"model": "gpt-image-1", "prompt": "p", "response_format": "url"}).encode()
    with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) as sock:
        head = "POST /v1/images/generations HTTP/1.1\r\nhost: t\r\n"
        head += f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
        sock.sendall(head.encode() + body)
        assert sent.wait(10)
        # The first part went up: a multipart upload is pending until the client leaves.
        assert until(lambda: client.list_multipart_uploads(Bucket=name).get("Uploads"), 20)
    assert upstream.gone.wait(10)
    assert until(lambda: not client.list_multipart_uploads(Bucket=name).get("Uploads"), 20)
    assert objects(client, name) == []


def test_s3_unreachable_is_a_502(upstream: UpstreamDouble, stored: Start, bucket: Any) -> None:
    _, name = bucket
    upstream.answer = image_answer(png())
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    url = stored(**s3_settings(dead, name))
    with pytest.raises(openai.InternalServerError) as caught:
        sdk(url).images.generate(model="gpt-image-1", prompt="p", response_format="url")
    assert caught.value.code == "storage_unavailable"
    assert "S3_SECRET" not in caught.value.message and SIGNING not in caught.value.message


def test_retention_sweeps_old_images(
    upstream: UpstreamDouble, stored: Start, tmp_path: Path
) -> None:
    root = tmp_path / "images"
    old = root / "_" / "2020-01-01" / "pxy_old-0.png"
    old.parent.mkdir(parents=True)
    old.write_bytes(png())
    os.utime(old, (1_577_836_800, 1_577_836_800))  # 2020-01-01
    upstream.answer = image_answer(png())
    url = stored(retention_days=30)
    sdk(url).images.generate(model="gpt-image-1", prompt="p", response_format="url")
    assert until(lambda: not old.exists(), 10)
    assert len(kept(root)) == 1  # today's stays


@pytest.mark.parametrize("workers", ["1", "2"])
def test_the_bundled_proxy_serves_its_kept_images(tmp_path: Path, workers: str) -> None:
    from test_cli import running

    config = tmp_path / "proxy.toml"
    config.write_text(f'[storage]\nurl = "{(tmp_path / "images").as_uri()}"\n')
    lines = 6 if workers == "1" else 7  # the banner, and the note on workers
    with running("--config", str(config), "--workers", workers, lines=lines) as (url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="anything", max_retries=0)
        for _ in range(4):  # with two workers, URLs made by one are served by either
            made = client.images.generate(
                model="gpt-image-1", prompt="a lighthouse", size="64x64", response_format="url"
            )
            link = made.data[0].url or ""  # type: ignore[index]
            assert link.startswith(url + "/v1/imagegen/files/")
            fetched = httpx.get(link, timeout=30)
            assert fetched.status_code == 200 and fetched.content[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_owner_or_the_admin_gets_the_urls_again(
    upstream: UpstreamDouble, tmp_path: Path, signing: str
) -> None:
    image = png(20, 20)
    upstream.answer = image_answer(image)
    sock = bound()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    config = ProxyConfig.model_validate(
        {
            "openai": {"base_url": upstream.url + "/v1", "api_key": UPSTREAM_KEY},
            "keys": [
                {"name": "owner", "key": "sk-owner-0123456789"},
                {"name": "other", "key": "sk-other-0123456789"},
            ],
            "admin": {"key": "sk-admin-0123456789"},
            "store": {"url": f"sqlite:///{tmp_path}/proxy.db"},
            "storage": {
                "url": (tmp_path / "images").as_uri(),
                "public_url": url,
                "signing_key_env": "IMAGE_SIGNING_KEY",
            },
        }
    )
    from test_cli import run

    assert run("db", "upgrade", "--store", f"sqlite:///{tmp_path}/proxy.db").returncode == 0
    proxy = ImageGenProxy(HostApp().app, config)
    with serve(proxy, sock=sock):
        owner = openai.OpenAI(base_url=url + "/v1", api_key="sk-owner-0123456789", max_retries=0)
        made = owner.images.with_raw_response.generate(
            model="gpt-image-1", prompt="p", response_format="url"
        )
        request_id = made.headers["x-imagegen-request-id"]
        path = f"{url}/v1/imagegen/images/{request_id}"

        def again(key: str) -> httpx.Response:
            return httpx.get(path, headers={"authorization": f"Bearer {key}"})

        assert until(lambda: again("sk-owner-0123456789").status_code == 200, 10)  # ledger
        answer = again("sk-owner-0123456789").json()
        assert answer["request_id"] == request_id
        assert httpx.get(answer["data"][0]["url"]).content == image
        assert again("sk-admin-0123456789").status_code == 200
        refused = again("sk-other-0123456789")
        assert refused.status_code == 404 and refused.json()["error"]["code"] == "not_found"
        assert again("sk-nobody").status_code == 401


@pytest.fixture(params=["file", "s3"])
def either_store(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    """The `[storage]` settings of each store (beyond `stored`'s own file:// ones)."""
    if request.param == "file":
        return {}
    _, name = request.getfixturevalue("bucket")
    return s3_settings(request.getfixturevalue("s3_endpoint"), name)


@pytest.mark.parametrize("kind", ["gemini", "stability", "bfl", "bedrock"])
def test_every_kind_on_either_store_answers_urls(
    stored: Start, either_store: dict[str, Any], kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from test_kinds_on_the_mock import KEY, members

    from imagegen_proxy.mock import MockUpstream

    monkeypatch.setenv("MOCK_AWS_SECRET", KEY)
    with serve(MockUpstream(api_key=KEY)) as mock:
        member, model = members(mock)[kind]
        url = stored([{"name": kind, **member}], **either_store)
        result = sdk(url).images.generate(model=model, prompt="a lighthouse", response_format="url")
        link = result.data[0].url or ""  # type: ignore[index]
        fetched = httpx.get(link)
        assert fetched.status_code == 200 and fetched.content[:8] == b"\x89PNG\r\n\x1a\n"


def test_s3_refusing_mid_answer_is_a_502_and_no_object(
    upstream: UpstreamDouble, stored: Start, s3_endpoint: str, bucket: Any
) -> None:
    client, name = bucket
    sent, release = threading.Event(), threading.Event()

    async def slow(x: Exchange) -> None:
        big = base64.b64encode(png(64, 64, pad_to=7 * 1024 * 1024))  # past one 5 MiB part
        await x.start(200, [("content-type", "application/json")])
        await x.body(b'{"created":1,"data":[{"b64_json":"' + big)
        sent.set()
        await x.wait(release)
        await x.body(b'"}]}', more=False)

    upstream.answer = slow
    url = stored(**s3_settings(s3_endpoint, name))
    with ThreadPoolExecutor(1) as pool:
        call = pool.submit(
            sdk(url).images.generate, model="gpt-image-1", prompt="p", response_format="url"
        )
        assert sent.wait(10)
        assert until(lambda: client.list_multipart_uploads(Bucket=name).get("Uploads"), 20)
        # The store loses the upload halfway (an operator's lifecycle rule, a failover):
        # the rest of the image cannot be kept.
        [upload] = client.list_multipart_uploads(Bucket=name)["Uploads"]
        client.abort_multipart_upload(Bucket=name, Key=upload["Key"], UploadId=upload["UploadId"])
        release.set()
        with pytest.raises(openai.InternalServerError) as caught:
            call.result(60)
    assert caught.value.code == "storage_unavailable"
    assert objects(client, name) == []


@pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")  # the SDK's variations
def test_a_variation_answers_a_url(upstream: UpstreamDouble, stored: Start) -> None:
    image = png(18, 18)
    upstream.answer = image_answer(image)
    url = stored()
    result = sdk(url).images.create_variation(
        image=("in.png", png(), "image/png"), model="dall-e-2", response_format="url"
    )
    assert httpx.get(result.data[0].url or "").content == image  # type: ignore[index]
    assert upstream.last.fields["response_format"] == "b64_json"  # DALL·E's own choice


def test_keep_always_copies_a_streams_images_as_they_pass(
    upstream: UpstreamDouble, stored: Start, tmp_path: Path
) -> None:
    image = png(26, 26)
    upstream.answer = sse(partial(0), completed(b64(image)))
    url = stored(keep="always")
    events = list(
        sdk(url).images.generate(model="gpt-image-1", prompt="p", stream=True, partial_images=1)
    )
    assert base64.b64decode(events[-1].b64_json) == image  # answered as asked
    assert until(lambda: len(kept(tmp_path / "images")) == 1, 10)
    assert kept(tmp_path / "images")[0].read_bytes() == image


def test_keep_always_with_a_failing_store_answers_unharmed(
    upstream: UpstreamDouble, stored: Start, tmp_path: Path
) -> None:
    image = png(14, 14)
    (tmp_path / "images").write_text("not a directory")
    upstream.answer = sse(completed(b64(image)))
    url = stored(keep="always")
    events = list(sdk(url).images.generate(model="gpt-image-1", prompt="p", stream=True))
    assert base64.b64decode(events[-1].b64_json) == image
    upstream.answer = image_answer(image)
    result = sdk(url).images.generate(model="gpt-image-1", prompt="p")
    assert base64.b64decode(result.data[0].b64_json or "") == image  # type: ignore[index]
