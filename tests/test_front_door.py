"""The bundled proxy's front door (imagegen_proxy.server.front_door): bounded request heads,
the header timeout and the connection cap, on real sockets, with both of uvicorn's parsers."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import resource
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Literal, cast

import httpx
import openai
import pytest
from double import UpstreamDouble, held
from support import json_request_headers, raw_request, read_response, serve

from imagegen_proxy.config import ServerConfig
from imagegen_proxy.server.front_door import (
    default_max_connections,
    raise_open_files_limit,
    uvicorn_options,
)

MB = 1024 * 1024
BODY = json.dumps({"model": "gpt-image-1", "prompt": "a lighthouse"}).encode()
REQUEST = (
    b"POST /v1/images/generations HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\n"
    + b"content-length: %d\r\n\r\n" % len(BODY)
    + BODY
)
HALF_SENT = b"POST /v1/images/generations HTTP/1.1\r\nhost: test\r\nx-slow: "

Start = Callable[..., str]
Parser = Literal["httptools", "h11"]


@pytest.fixture(params=["httptools", "h11"])
def parser(request: pytest.FixtureRequest) -> Parser:
    """Each test runs with both of uvicorn's HTTP/1.1 parsers."""
    return cast(Parser, request.param)


@pytest.fixture
def app() -> UpstreamDouble:
    """The app behind the door: it records what reaches it."""
    return UpstreamDouble()


@pytest.fixture
def door(parser: Parser, app: UpstreamDouble) -> Iterator[Start]:
    """Start uvicorn with the front door (the given `[server]` settings) in front of `app`."""
    with contextlib.ExitStack() as stack:

        def start(**server: Any) -> str:
            options = uvicorn_options(ServerConfig(**server), http=parser)
            return stack.enter_context(serve(app, lifespan="off", **options))

        yield start


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def readable(sock: socket.socket) -> bool:
    poller = select.poll()  # select() takes no descriptor above 1023
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


def read_to_eof(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes (a reset after its answer included)."""
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            data += chunk
    return data


def parse(data: bytes) -> tuple[int, dict[str, str], Any]:
    """A raw answer's status, header fields and JSON body."""
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    fields = dict(line.lower().split(": ", 1) for line in lines[1:])
    assert int(fields["content-length"]) == len(body)
    return int(lines[0].split()[1]), fields, json.loads(body)


def flood(url: str, endless_line: bool = False, limit: int = 64 * MB) -> bytes:
    """Send a request head that never ends (header lines, or one header line that never
    ends) until the server answers or closes, `limit` bytes at most; return its answer."""
    line = b"a" * 1024 if endless_line else b"x-flood: " + b"a" * 1013 + b"\r\n"
    chunk = line * 64
    with connect(url) as sock:
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nhost: test\r\nx-first: ")
        with contextlib.suppress(OSError):  # the server closed while we sent: reset, EPIPE
            for _ in range(limit // len(chunk)):
                if readable(sock):
                    break
                sock.sendall(chunk)
        return read_to_eof(sock)


def assert_error(data: bytes, status: int, code: str) -> tuple[dict[str, str], Any]:
    """`data` is an OpenAI-shaped error answer, and the last thing on its connection."""
    got, fields, body = parse(data)
    assert got == status
    assert fields["content-type"] == "application/json"
    assert fields["connection"] == "close"
    assert body["error"]["code"] == code
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return fields, body


# --- bounded heads --------------------------------------------------------------------


@pytest.mark.parametrize("endless_line", [False, True], ids=["lines", "one-line"])
def test_a_header_flood_gets_431_and_a_closed_connection(
    door: Start, app: UpstreamDouble, endless_line: bool
) -> None:
    url = door()
    _, body = assert_error(flood(url, endless_line), 431, "request_header_fields_too_large")
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["param"] is None
    assert app.requests == []


def test_too_many_headers_get_431(door: Start, app: UpstreamDouble) -> None:
    url = door(max_header_count=20)
    headers = {f"x-extra-{i}": "1" for i in range(20)}
    with raw_request(url, json_request_headers(BODY, **headers), BODY) as sock:
        assert_error(read_to_eof(sock), 431, "request_header_fields_too_large")
    assert app.requests == []


def test_a_head_just_under_the_limits_is_served(door: Start, app: UpstreamDouble) -> None:
    url = door(max_header_bytes=4096, max_header_count=20)
    # 16 fields with host and the two json_request_headers add: 19 fields, about 3.5 KiB.
    headers = {f"x-extra-{i}": "v" * 200 for i in range(16)}
    with raw_request(url, json_request_headers(BODY, **headers), BODY) as sock:
        assert read_response(sock).status_code == 200
    assert len(app.requests) == 1


def test_requests_on_a_keep_alive_connection_are_served(door: Start) -> None:
    url = door()
    with connect(url) as sock:
        for _ in range(3):
            sock.sendall(REQUEST)
            assert read_response(sock).status_code == 200


# --- header timeout -------------------------------------------------------------------


def test_idle_and_half_sent_connections_are_closed_after_the_header_timeout(
    door: Start,
) -> None:
    url = door(header_timeout=1.0)
    opened = time.monotonic()
    with contextlib.ExitStack() as stack:
        idle = [stack.enter_context(connect(url)).fileno() for _ in range(500)]
        half_sent = [stack.enter_context(connect(url)) for _ in range(100)]
        for sock in half_sent:
            sock.sendall(HALF_SENT)
        received, closed_at = until_closed(idle + [sock.fileno() for sock in half_sent])
        assert min(closed_at) - opened >= 0.9  # not before the timeout
        assert all(received[fd] == b"" for fd in idle)
        for sock in half_sent:
            assert_error(received[sock.fileno()], 408, "request_timeout")


def until_closed(fds: list[int]) -> tuple[dict[int, bytes], list[float]]:
    """Read every descriptor until the server closes it; return what each received, and
    when each was closed."""
    received = dict.fromkeys(fds, b"")
    closed_at: list[float] = []
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    # Every connection should be closed about a second after it opened; 30 s is for a
    # loaded CI machine, not a bound under test.
    deadline = time.monotonic() + 30
    while len(closed_at) < len(fds) and time.monotonic() < deadline:
        for fd, _ in poller.poll(1000):
            chunk = os.read(fd, 65536)
            received[fd] += chunk
            if not chunk:
                closed_at.append(time.monotonic())
                poller.unregister(fd)
    assert len(closed_at) == len(fds), f"{len(fds) - len(closed_at)} connections still open"
    return received, closed_at


def test_an_idle_keep_alive_connection_is_closed_without_an_answer(door: Start) -> None:
    url = door(header_timeout=0.5)
    with connect(url) as sock:
        sock.sendall(REQUEST)
        assert read_response(sock).status_code == 200
        assert read_to_eof(sock) == b""


# --- connection cap -------------------------------------------------------------------


def test_a_newcomer_at_the_cap_evicts_the_oldest_idle_connection(
    door: Start, app: UpstreamDouble
) -> None:
    url = door(max_connections=4)
    idle = [connect(url) for _ in range(3)]
    with connect(url) as served:
        # Answered in turn: by then the server holds all four, this one the newest idle.
        served.sendall(REQUEST)
        assert read_response(served).status_code == 200
        with connect(url) as newcomer:
            newcomer.sendall(REQUEST)
            assert read_response(newcomer).status_code == 200
        assert read_to_eof(idle[0]) == b""
        for sock in idle[1:]:
            assert not readable(sock)  # still open, nothing sent
    for sock in idle:
        sock.close()


def test_a_half_sent_request_evicted_at_the_cap_gets_503(door: Start) -> None:
    url = door(max_connections=2)
    with connect(url) as slow, connect(url) as served:
        slow.sendall(HALF_SENT)
        served.sendall(REQUEST)
        assert read_response(served).status_code == 200
        with connect(url) as newcomer:
            newcomer.sendall(REQUEST)
            assert read_response(newcomer).status_code == 200
        assert_error(read_to_eof(slow), 503, "server_overloaded")


def test_a_newcomer_gets_503_when_every_connection_runs_a_request(
    door: Start, app: UpstreamDouble
) -> None:
    release = threading.Event()
    app.answer = held(release)
    url = door(max_connections=2)
    busy = []
    for _ in range(2):
        busy.append(raw_request(url, json_request_headers(BODY), BODY))
        assert app.arrived.wait(10)
        app.arrived.clear()
    try:
        with raw_request(url, json_request_headers(BODY), BODY) as newcomer:
            fields, body = assert_error(read_to_eof(newcomer), 503, "server_overloaded")
        assert fields["retry-after"] == "1"
        assert body["error"]["type"] == "server_error"
        release.set()
        assert [read_response(sock).status_code for sock in busy] == [200, 200]
    finally:
        release.set()
        for sock in busy:
            sock.close()


def test_default_max_connections_leaves_two_descriptors_per_request_and_a_reserve() -> None:
    assert default_max_connections(1024) == 480
    assert 2 * default_max_connections(65536) + 64 <= 65536
    assert default_max_connections(64) == 16  # a floor, whatever the limit


def test_raising_the_open_files_limit_reports_the_limit_in_force(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO, logger="imagegen_proxy"):
        limit = raise_open_files_limit()
    assert limit == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    assert f"open files limit: {limit}" in caplog.messages


# --- in a process of its own -----------------------------------------------------------

BUNDLED = ["-m", "imagegen_proxy", "--port", "0", "--log-level", "warning"]
# A bare app behind the front door, for a memory figure of the front door alone.
BARE = [
    "-c",
    """
import socket, sys
import uvicorn
from imagegen_proxy.config import ServerConfig
from imagegen_proxy.server.front_door import uvicorn_options

async def app(scope, receive, send):
    await send({"type": "http.response.start", "status": 204, "headers": []})
    await send({"type": "http.response.body", "body": b""})

sock = socket.create_server(("127.0.0.1", 0))
print(f"listening on http://127.0.0.1:{sock.getsockname()[1]}", flush=True)
options = uvicorn_options(ServerConfig(), http=sys.argv[1])
uvicorn.Server(uvicorn.Config(app, lifespan="off", log_level="error", **options)).run([sock])
""",
]


@contextlib.contextmanager
def running(
    *args: str, nofile: int | None = None, output: list[str] | None = None
) -> Iterator[tuple[str, int]]:
    """`python *args` (a server that prints "listening on URL"), its open-files limit
    `nofile` if given; yield its URL and process id. Its output is read as it comes, into
    `output` if given: a full pipe would stall it."""

    def limit() -> None:
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    # In a new empty directory: the no-config mode makes its store file where it runs.
    folder = tempfile.TemporaryDirectory(prefix="imagegen-door-")
    process = subprocess.Popen(
        [sys.executable, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=limit,
        cwd=folder.name,
    )
    try:
        assert process.stdout is not None
        banner = process.stdout.readline()
        assert "listening on http://" in banner, banner + process.stdout.read()
        sink = output if output is not None else []
        threading.Thread(target=sink.extend, args=(process.stdout,), daemon=True).start()
        yield banner.split("listening on ", 1)[1].split()[0], process.pid
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(10)
        folder.cleanup()


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1])


def test_header_floods_leave_the_server_memory_bounded(parser: Parser) -> None:
    with running(*BARE, parser) as (url, pid):
        started = rss_kib(pid)
        for endless_line in (False, True):  # what a flood makes the server allocate once
            assert parse(flood(url, endless_line))[0] == 431
        before = rss_kib(pid)
        answers = [parse(flood(url, endless_line=i % 2 == 1))[0] for i in range(100)]
        after = rss_kib(pid)
    print(
        f"\n{parser}: RSS {started} KiB at start, {before} KiB before 100 header floods, "
        f"{after} KiB after"
    )
    assert answers == [431] * 100
    # Without the limits a flood's every byte was kept (64 MiB each here); what may remain
    # is the allocator's slack: 16 MiB is generous.
    assert after - before < 16 * 1024


def test_idle_sockets_cannot_lock_out_a_client_at_the_open_files_limit() -> None:
    nofile = 1024
    with running(*BUNDLED, nofile=nofile) as (url, pid), contextlib.ExitStack() as stack:
        idle = [stack.enter_context(connect(url)) for _ in range(1100)]
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        image = client.images.generate(model="gpt-image-1", prompt="a lighthouse", size="64x64")
        assert image.data and image.data[0].b64_json
        descriptors = len(os.listdir(f"/proc/{pid}/fd"))
        evicted = [sock for sock in idle if readable(sock)]
        assert all(sock.recv(1) == b"" for sock in evicted)
    print(f"\n{descriptors} descriptors open, {len(idle) - len(evicted)} idle sockets held")
    assert descriptors < nofile
    assert len(idle) - len(evicted) <= default_max_connections(nofile)


def test_worker_processes_get_the_same_front_door() -> None:
    with running(*BUNDLED, "--workers", "2") as (url, _):
        assert_error(flood(url), 431, "request_header_fields_too_large")
        assert httpx.get(url + "/healthz", timeout=10).status_code == 200
