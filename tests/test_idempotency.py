"""Retries that never pay twice: joined while running, replayed once finished, over real
sockets with the official SDK."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import stat
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from conftest import CLIENT_KEY, HostApp, proxy_config
from double import (
    Exchange,
    UpstreamDouble,
    completed,
    error_json,
    held,
    json_image,
    partial,
    sse,
    stall,
)
from redis_server import redis_server
from support import serve, until
from test_cli import running

from imagegen_proxy import ImageGenProxy
from imagegen_proxy.config import IdempotencyConfig
from imagegen_proxy.retries.idempotency import Idempotency
from imagegen_proxy.retries.recording import Marker, Recording
from imagegen_proxy.wire.errors import ClientGone

PATH = "/v1/images/generations"
BODY = {"model": "gpt-image-1", "prompt": "a lighthouse"}
SERVER_ERROR = {"message": "boom", "type": "server_error", "param": None, "code": None}

Start = Callable[..., tuple[str, ImageGenProxy]]
LARGE = "QUFB" * 40_000  # an image of 160 kB: over what is held in memory


@pytest.fixture
def proxied(upstream: UpstreamDouble) -> Iterator[Start]:
    """A proxy in front of the double, and the proxy object (to read its recordings)."""
    with contextlib.ExitStack() as stack:

        def start(**sections: Any) -> tuple[str, ImageGenProxy]:
            proxy = ImageGenProxy(HostApp().app, proxy_config(upstream, **sections))
            return stack.enter_context(serve(proxy)), proxy

        yield start


def keyed(url: str, key: str, body: dict[str, Any] = BODY) -> httpx.Response:
    return httpx.post(url + PATH, json=body, headers={"idempotency-key": key}, timeout=30)


def spooled(proxy: ImageGenProxy) -> list[str]:
    assert proxy.idempotency is not None
    return sorted(path.name for path in proxy.idempotency.folder.iterdir())


def test_an_sdk_retry_after_its_timeout_joins_the_running_generation(
    proxied: Start, upstream: UpstreamDouble
) -> None:
    release = threading.Event()
    upstream.answer = held(release)
    url, proxy = proxied()
    assert proxy.idempotency is not None
    registry = proxy.idempotency
    # The SDK gives up after 1 s, then retries with x-stainless-retry-count: 1 and the
    # same body. Once that retry joined, the generation answers.
    sdk = openai.OpenAI(base_url=url + "/v1", api_key=CLIENT_KEY, timeout=1.0, max_retries=2)
    releaser = threading.Thread(
        target=lambda: (until(lambda: registry.repeats == 1, within=20), release.set())
    )
    releaser.start()
    answer = sdk.images.generate(**BODY)
    releaser.join(5)
    assert answer.data and answer.data[0].b64_json
    assert len(upstream.requests) == 1  # one generation, paid once


def test_a_stream_joined_midway_gets_every_event_from_the_first(
    proxied: Start, upstream: UpstreamDouble
) -> None:
    go = threading.Event()
    upstream.answer = sse(partial(0), partial(1), completed(), pause_after=1, resume=go)
    url, _ = proxied()
    body = {**BODY, "stream": True, "partial_images": 2}
    headers = {"idempotency-key": "k-stream"}
    with (
        httpx.Client(timeout=30) as client,
        client.stream("POST", url + PATH, json=body, headers=headers) as first,
    ):
        chunks = first.iter_bytes()
        seen = next(chunks)
        assert b"partial_image_index" in seen  # the first event reached the first client
        with client.stream("POST", url + PATH, json=body, headers=headers) as second:
            assert second.headers["idempotent-replayed"] == "true"
            go.set()
            joined = second.read()
        seen += b"".join(chunks)
    assert joined == seen
    assert joined.count(b"event: image_generation.partial_image") == 2
    assert joined.count(b"event: image_generation.completed") == 1
    assert len(upstream.requests) == 1


def test_a_replay_within_the_ttl_and_a_fresh_generation_after(
    proxied: Start, upstream: UpstreamDouble
) -> None:
    upstream.answer = json_image(LARGE)  # spooled to a file (a small one stays in memory)
    url, proxy = proxied()
    assert proxy.idempotency is not None
    now = [1000.0]
    proxy.idempotency._clock = lambda: now[0]
    first = keyed(url, "k-ttl")
    again = keyed(url, "k-ttl")
    assert first.status_code == again.status_code == 200
    assert again.content == first.content
    assert again.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers
    assert len(upstream.requests) == 1 and len(spooled(proxy)) == 1
    now[0] += 600  # the ttl: the answer is gone, its file too
    fresh = keyed(url, "k-ttl")
    assert "idempotent-replayed" not in fresh.headers
    assert len(upstream.requests) == 2 and len(spooled(proxy)) == 1  # the new one's


def test_the_same_key_with_another_body_is_refused(proxied: Start) -> None:
    url, _ = proxied()
    sdk = openai.OpenAI(base_url=url + "/v1", api_key=CLIENT_KEY, max_retries=0)
    headers = {"Idempotency-Key": "k-reuse"}
    sdk.images.generate(**BODY, extra_headers=headers)
    with pytest.raises(openai.UnprocessableEntityError) as refused:
        sdk.images.generate(model="gpt-image-1", prompt="another", extra_headers=headers)
    assert refused.value.code == "idempotency_key_reused"


def test_a_first_attempt_is_never_deduplicated(proxied: Start, upstream: UpstreamDouble) -> None:
    url, _ = proxied()
    sdk = openai.OpenAI(base_url=url + "/v1", api_key=CLIENT_KEY, max_retries=0)
    for _ in range(2):  # two people asking the same prompt want two images
        sdk.images.generate(**BODY)
    assert len(upstream.requests) == 2


def test_keys_are_per_client_key(proxied: Start, upstream: UpstreamDouble) -> None:
    url, _ = proxied(
        auth={"open": False},
        keys=[{"name": "a", "key": "sk-idem-a-0123456789"}, {"name": "b", "key": "sk-idem-b-0123"}],
    )
    for key in ("sk-idem-a-0123456789", "sk-idem-b-0123"):
        headers = {"authorization": f"Bearer {key}", "idempotency-key": "shared"}
        assert httpx.post(url + PATH, json=BODY, headers=headers).status_code == 200
    assert len(upstream.requests) == 2


def test_a_failed_generation_is_not_kept(proxied: Start, upstream: UpstreamDouble) -> None:
    upstream.answer = error_json(500, SERVER_ERROR)
    url, proxy = proxied()
    assert keyed(url, "k-fail").status_code == 500
    until(lambda: spooled(proxy) == [], within=5)  # nothing kept: a retry is a fresh attempt
    upstream.answer = None
    assert keyed(url, "k-fail").status_code == 200
    assert len(upstream.requests) == 2


def test_a_generation_nobody_came_back_for_is_cancelled_after_the_grace(
    proxied: Start, upstream: UpstreamDouble
) -> None:
    upstream.answer = stall()
    url, proxy = proxied(idempotency={"grace": 0.5})
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        body = b'{"model": "gpt-image-1", "prompt": "a lighthouse"}'
        sock.sendall(
            b"POST " + PATH.encode() + b" HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"idempotency-key: k-grace\r\ncontent-length: %d\r\n\r\n" % len(body) + body
        )
        assert upstream.arrived.wait(10)
    # The client left; the generation goes on for the grace, then, nobody back, stops.
    assert upstream.gone.wait(10)  # generous: the grace is half a second
    until(lambda: spooled(proxy) == [], within=10)


def test_without_idempotency_nothing_is_recorded(proxied: Start, upstream: UpstreamDouble) -> None:
    url, proxy = proxied(idempotency={"enabled": False})
    assert proxy.idempotency is None
    for _ in range(2):
        assert keyed(url, "k-off").status_code == 200
    assert len(upstream.requests) == 2


def test_a_refused_first_attempt_leaves_nothing_and_its_repeat_is_fresh(
    proxied: Start, upstream: UpstreamDouble, caplog: pytest.LogCaptureFixture
) -> None:
    url, proxy = proxied(
        auth={"open": False},
        keys=[{"name": "a", "key": "sk-idem-a-0123456789", "requests_per_minute": 2}],
    )
    headers = {"authorization": "Bearer sk-idem-a-0123456789", "idempotency-key": "k-limit"}
    other = {**headers, "idempotency-key": "k-other"}
    assert httpx.post(url + PATH, json=BODY, headers=other).status_code == 200
    assert httpx.post(url + PATH, json=BODY, headers=other).status_code == 200  # replayed
    refused = httpx.post(url + PATH, json=BODY, headers=headers)
    assert refused.status_code == 429  # the replay counted against the rate
    assert proxy.idempotency is not None
    assert len(proxy.idempotency) == 1  # the kept answer (in memory: it is small)
    assert spooled(proxy) == []  # and no file of the refused one
    assert len(upstream.requests) == 1


def test_the_access_log_names_what_a_replay_repeats(
    proxied: Start, caplog: pytest.LogCaptureFixture
) -> None:
    url, _ = proxied(access_log={"format": "json"})
    with caplog.at_level("INFO", logger="imagegen_proxy.access"):
        first = keyed(url, "k-log")
        keyed(url, "k-log")

        def lines() -> list[str]:
            return [r.getMessage() for r in caplog.records if r.name.endswith("access")]

        until(lambda: len(lines()) == 2, within=5)  # each is written just after its answer
    original = first.headers["x-imagegen-request-id"]
    replayed = lines()[-1]
    assert '"outcome": "replayed"' in replayed and f'"replay_of": "{original}"' in replayed
    assert '"images": 0' in replayed


def test_shutdown_removes_the_spool(proxied: Start, upstream: UpstreamDouble) -> None:
    upstream.answer = json_image(LARGE)
    url, proxy = proxied()
    keyed(url, "k-shutdown")
    assert proxy.idempotency is not None
    folder = proxy.idempotency.folder
    assert len(list(folder.iterdir())) == 1
    proxy.idempotency.close()
    assert not folder.exists()


def _rss_peak_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def _pid_of(marker: str) -> int:
    """The process whose command line names `marker` (the proxy, by its config path)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    return int(entry.name)
    raise AssertionError(f"no process with {marker!r}")


def test_twenty_joiners_of_a_20_mb_answer_keep_memory_flat(
    upstream: UpstreamDouble, tmp_path: Path
) -> None:
    go = threading.Event()
    size = 20 * 1024 * 1024

    async def big(x: Exchange) -> None:
        await x.start(200, [("content-type", "application/json"), ("content-length", str(size))])
        await x.body(b" " * 65536)
        await x.wait(go)
        for _ in range(size // 65536 - 1):
            await x.body(b" " * 65536)
        await x.body(b"", more=False)

    upstream.answer = big
    config = tmp_path / "memory.toml"
    config.write_text(
        f'[openai]\nbase_url = "{upstream.url}/v1"\napi_key = "k"\n[auth]\nopen = true\n'
    )
    with running("--config", str(config)) as (url, _):
        pid = _pid_of(str(config))
        before = _rss_peak_kib(pid)
        received: list[int] = []
        reading = threading.Semaphore(0)

        def read() -> None:
            headers = {"idempotency-key": "k-big"}
            total = 0
            with httpx.stream("POST", url + PATH, json=BODY, headers=headers, timeout=60) as r:
                for chunk in r.iter_bytes():
                    if not total:
                        reading.release()  # its first bytes came: it joined
                    total += len(chunk)
            received.append(total)

        readers = [threading.Thread(target=read) for _ in range(20)]
        readers[0].start()
        assert upstream.arrived.wait(10)
        for reader in readers[1:]:
            reader.start()
        for _ in readers:  # every one joined before the rest of the answer comes
            assert reading.acquire(timeout=20)
        go.set()
        for reader in readers:
            reader.join(60)
        grown = _rss_peak_kib(pid) - before
    assert received == [size] * 20
    assert len(upstream.requests) == 1
    # 20 readers of 20 MB: 400 MB if answers were held; each reads the spool in 256 KiB
    # pieces. The bound is generous for the allocator's and the kernel buffers' slack.
    print(f"peak RSS grew by {grown} KiB while 20 clients read 20 MB each")
    assert grown < 64 * 1024, f"peak RSS grew by {grown} KiB"


def test_two_processes_share_a_generation_through_redis(
    upstream: UpstreamDouble, tmp_path: Path
) -> None:
    release = threading.Event()
    upstream.answer = held(release)
    with redis_server() as (redis_url, _):
        config = tmp_path / "shared.toml"
        config.write_text(
            f'[openai]\nbase_url = "{upstream.url}/v1"\napi_key = "k"\n[auth]\nopen = true\n'
            f'[limits]\nstorage = "{redis_url}"\n'
        )
        with (
            running("--config", str(config)) as (one, _),
            running("--config", str(config)) as (
                two,
                _,
            ),
        ):
            first: list[httpx.Response] = []
            runner = threading.Thread(target=lambda: first.append(keyed(one, "k-shared")))
            runner.start()
            assert upstream.arrived.wait(10)
            # The repeat lands on the other process: it waits for the generation to end,
            # then replays it from the spool file both can read.
            repeat: list[httpx.Response] = []
            waiter = threading.Thread(target=lambda: repeat.append(keyed(two, "k-shared")))
            waiter.start()
            release.set()
            runner.join(30)
            waiter.join(30)
            assert first[0].status_code == repeat[0].status_code == 200
            assert repeat[0].headers["idempotent-replayed"] == "true"
            assert repeat[0].content == first[0].content
            assert len(upstream.requests) == 1
            # Where the answer cannot be read (here: its file is gone), a 409 says when to
            # retry rather than paying twice.
            for spool in (Path(tempfile.gettempdir()) / "imagegen-proxy-spool").glob("*/*"):
                if spool.read_bytes() == first[0].content:
                    spool.unlink()
            refused = keyed(two, "k-shared")
            assert refused.status_code == 409
            assert refused.json()["error"]["code"] == "idempotency_in_progress"
            assert refused.headers["retry-after"] == "1"
    assert len(upstream.requests) == 1


def _record(registry: Idempotency, key: str, body: bytes) -> Recording:
    """A finished generation under `key`, answered `body`, as the relay writes one."""
    recording = registry.start(Marker(key, "d", joins=True, explicit=True), f"pxy_{key}")

    async def write() -> None:
        await recording.send({"type": "http.response.start", "status": 200, "headers": []})
        await recording.send({"type": "http.response.body", "body": body, "more_body": False})
        registry.ended(recording)
        recording.detach()

    asyncio.run(write())
    return recording


def test_past_max_bytes_the_oldest_answers_go_first(tmp_path: Path) -> None:
    config = IdempotencyConfig(max_bytes=250_000, spool_dir=str(tmp_path))
    registry = Idempotency(config)
    for key in ("a", "b", "c"):
        _record(registry, key, b"x" * 100_000)  # each over what is held in memory: a file
    found = [registry.find(Marker(key, "d", joins=True, explicit=True)) for key in "abc"]
    assert [recording is not None for recording in found] == [False, True, True]
    assert registry.kept == 200_000 and len(list(registry.folder.iterdir())) == 2
    registry.close()


def test_the_spool_of_a_process_that_died_is_removed_at_start(tmp_path: Path) -> None:
    root = tmp_path / "imagegen-proxy-spool"
    leftover = root / str(_gone_pid())
    leftover.mkdir(parents=True)
    (leftover / "0.spool").write_bytes(b"an answer nobody will replay")
    registry = Idempotency(IdempotencyConfig(spool_dir=str(tmp_path)))
    assert registry.folder.parent == root
    assert not leftover.exists()
    registry.close()


def _gone_pid() -> int:
    """The pid of a process that has ended."""
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_a_spool_file_shorter_than_recorded_ends_its_replay_instead_of_spinning(
    tmp_path: Path,
) -> None:
    path = tmp_path / "answer"
    path.write_bytes(b"x" * 1000)  # recorded as 5,000 bytes: cut short, or changed since
    start = {"type": "http.response.start", "status": 200, "headers": []}
    marker = Marker("k", "d", joins=True, explicit=True)
    recording = Recording.stored(marker, "pxy_short", path, start, 5000)
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        await asyncio.Event().wait()  # the client stays
        raise AssertionError

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def main() -> int:
        # Generous: a replay of 1,000 bytes takes microseconds; a spinning one never ends.
        return await asyncio.wait_for(recording.stream(receive, send), 30)

    assert asyncio.run(main()) == 1000
    bodies = [m for m in sent if m["type"] == "http.response.body"]
    assert b"".join(m["body"] for m in bodies) == b"x" * 1000
    assert all(m["more_body"] for m in bodies)  # no end: the connection is cut, not "done"


def test_a_spool_file_that_is_a_link_is_not_replayed(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"not an answer")
    path = tmp_path / "answer"
    path.symlink_to(secret)
    start = {"type": "http.response.start", "status": 200, "headers": []}
    recording = Recording.stored(Marker("k", "d", True, True), "pxy_link", path, start, 13)

    async def receive() -> dict[str, Any]:
        await asyncio.Event().wait()
        raise AssertionError

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def main() -> None:
        with pytest.raises(ClientGone):  # an OSError (ELOOP): the replay ends
            await asyncio.wait_for(recording.stream(receive, send), 30)

    asyncio.run(main())
    assert b"not an answer" not in b"".join(m.get("body", b"") for m in sent)


@pytest.mark.parametrize("kind", ["another user's", "a link"])
def test_a_spool_folder_that_is_not_this_users_own_is_not_used(tmp_path: Path, kind: str) -> None:
    shared = tmp_path / "imagegen-proxy-spool"
    if kind == "a link":
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir(mode=0o700)
        shared.symlink_to(elsewhere)
    else:
        if os.getuid() != 0:
            pytest.skip("giving a folder to another user needs root (CI runs as root)")
        shared.mkdir(mode=0o700)
        os.chown(shared, 65534, 65534)  # nobody's
    folder = Idempotency(IdempotencyConfig(spool_dir=str(tmp_path))).folder
    assert shared not in folder.parents
    assert folder.parent.name.startswith("imagegen-proxy-spool-")
    assert stat.S_IMODE(folder.parent.stat().st_mode) == 0o700


def test_a_spool_folder_of_this_users_open_to_others_is_closed_to_them(tmp_path: Path) -> None:
    shared = tmp_path / "imagegen-proxy-spool"
    shared.mkdir()
    shared.chmod(0o777)
    folder = Idempotency(IdempotencyConfig(spool_dir=str(tmp_path))).folder
    assert folder.parent == shared and stat.S_IMODE(shared.stat().st_mode) == 0o700
