"""Faults on either side, injected over real sockets: the exact answer, and nothing leaked."""

from __future__ import annotations

import base64
import contextlib
import gc
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest
from conftest import API_VERSION, CLIENT_KEY, UPSTREAM_KEY, HostApp, proxy_config
from double import (
    UpstreamDouble,
    completed,
    cut_json,
    error_json,
    json_image,
    partial,
    sse,
    stall,
)
from support import json_request_headers, raw_request, read_response, serving, until

from imagegen_proxy import ImageGenProxy
from imagegen_proxy.governance.memory_limiter import MemoryLimiter
from imagegen_proxy.upstream.transport import AiohttpTransport

PATH = "/v1/images/generations"


@contextlib.contextmanager
def raw_upstream(reply: bytes) -> Iterator[str]:
    """An upstream that reads a request and writes `reply` (however broken), then hangs up."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def run() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.recv(65536)
                conn.sendall(reply)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(5)
        server.close()


def test_a_body_sent_too_slowly_gets_408(
    start_proxy: Callable[..., str], upstream: UpstreamDouble
) -> None:
    proxy = start_proxy(proxy={"body_timeout": 0.5})
    body = json.dumps({"prompt": "p"}).encode()
    started = time.monotonic()
    with raw_request(proxy, json_request_headers(body), body[:5]) as sock:
        reply = read_response(sock)
    assert reply.status_code == 408
    assert reply.json()["error"]["code"] == "request_timeout"
    # Generous for a loaded CI machine, and far below the default body_timeout (30 s): the
    # configured 0.5 s ended it.
    assert time.monotonic() - started < 5
    assert upstream.requests == []


def test_a_body_longer_than_declared_never_reaches_the_upstream_past_its_length(
    proxy: str, upstream: UpstreamDouble
) -> None:
    body = b'{"prompt": "p"}'
    smuggled = b'{"prompt": "smuggled", "n": 10}'
    with raw_request(proxy, json_request_headers(body), body + smuggled) as sock:
        reply = read_response(sock)
    # The extra bytes are a malformed next request to the server: it refuses them (400),
    # which may cut the first request short. Either way, only the declared body went on.
    assert reply.status_code in (200, 400)
    assert [request.json for request in upstream.requests] in ([], [{"prompt": "p"}])
    assert httpx.post(proxy + PATH, json={"prompt": "p"}).status_code == 200


def test_a_body_shorter_than_declared_gets_408(
    start_proxy: Callable[..., str], upstream: UpstreamDouble
) -> None:
    proxy = start_proxy(proxy={"body_timeout": 0.5})
    body = b'{"prompt": "p"}'
    headers = {"content-type": "application/json", "content-length": str(len(body) + 50)}
    with raw_request(proxy, headers, body) as sock:
        reply = read_response(sock)
    assert reply.status_code == 408
    assert upstream.requests == []


@pytest.mark.parametrize(
    "reply",
    [
        b"",  # hangs up without a word
        b"HTTP/1.1 200 OK\r\nContent-Ty",  # resets in the middle of the headers
        b"NOT HTTP AT ALL\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nx-huge: " + b"a" * 200_000 + b"\r\n\r\n",
    ],
)
def test_a_broken_upstream_answer_is_502(start_proxy: Callable[..., str], reply: bytes) -> None:
    with raw_upstream(reply) as url:
        proxy = start_proxy(openai={"base_url": url + "/v1"})
        answer = httpx.post(proxy + PATH, json={"prompt": "p"})
    assert answer.status_code == 502
    assert answer.json()["error"]["code"] == "upstream_error"
    assert httpx.get(proxy + "/hello").status_code == 200  # and the proxy lives on


@pytest.mark.parametrize(
    "bad",
    [b"event: image_generation.partial_image\ndata: oops\n\n", b"data: [DONE]\n\n", b"id: 1\n\n"],
)
def test_malformed_sse_from_the_upstream_becomes_an_error_event(
    proxy: str, upstream: UpstreamDouble, bad: bytes
) -> None:
    upstream.answer = sse(partial(0), bad, completed(), hold=True)
    client = openai.OpenAI(base_url=proxy + "/v1", api_key=CLIENT_KEY, max_retries=0)
    received = []
    with pytest.raises(openai.APIError) as failure:
        for event in client.images.generate(prompt="p", stream=True, partial_images=1):
            received.append(event.type)
    assert received == ["image_generation.partial_image"]  # the bad event never reached it
    assert failure.value.code == "upstream_error"
    assert "malformed event stream" in failure.value.message
    assert upstream.gone.wait(5)  # and the upstream connection was dropped


def test_no_secret_reaches_any_log_at_debug(
    start_proxy: Callable[..., str], upstream: UpstreamDouble, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # every logger: ours, httpx, aiohttp, uvicorn, asyncio
    keys = [{"name": "team-a", "key": CLIENT_KEY, "requests_per_minute": 3, "username": "u"}]
    proxy = start_proxy(auth={"open": False}, keys=keys, azure=True)
    basic = "Basic " + base64.b64encode(f"u:{CLIENT_KEY}".encode()).decode()
    for headers in (
        {"authorization": f"Bearer {CLIENT_KEY}"},
        {"authorization": basic},
        {"api-key": CLIENT_KEY},
        {"x-api-key": CLIENT_KEY + "-wrong"},
        {"authorization": f"Bearer {CLIENT_KEY}", "x-virtual-key": "other-" + CLIENT_KEY},
    ):
        httpx.post(proxy + PATH, json={"prompt": "p", "model": "m"}, headers=headers)
    upstream.answer = sse(partial(0), completed())
    azure = openai.AzureOpenAI(
        azure_endpoint=proxy, api_key=CLIENT_KEY, api_version=API_VERSION, max_retries=0
    )
    with contextlib.suppress(openai.APIError):
        list(azure.images.generate(model="dep", prompt="p", stream=True))  # limited by now
    upstream.answer = error_json(500, {"message": "x", "type": "y", "param": None, "code": None})
    httpx.post(
        proxy + PATH, json={"prompt": "p"}, headers={"authorization": f"Bearer {CLIENT_KEY}"}
    )
    text = caplog.text + "".join(repr(record.__dict__) for record in caplog.records)
    assert caplog.records, "nothing was logged: the test proves nothing"
    for secret in (CLIENT_KEY, UPSTREAM_KEY, basic.split()[1]):
        assert secret not in text


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


FAULTS = 1_000


def test_a_thousand_mixed_faults_leak_no_connection_slot_task_or_descriptor(
    upstream: UpstreamDouble,
) -> None:
    limiter = MemoryLimiter()
    keys = [{"name": "team-a", "key": CLIENT_KEY, "max_concurrent": 10_000}]
    dead = {"endpoint": f"http://127.0.0.1:{closed_port()}"}
    config = proxy_config(upstream, azure=dead, auth={"open": False}, keys=keys)
    auth = {"authorization": f"Bearer {CLIENT_KEY}"}
    stream = json.dumps({"prompt": "p", "stream": True}).encode()
    azure_path = f"/openai/deployments/dep/images/generations?api-version={API_VERSION}"
    before = open_fds()
    proxy = ImageGenProxy(HostApp().app, config, rate_limiter=limiter)
    with serving(proxy, lifespan="on") as server, httpx.Client(timeout=10) as client:
        url = server.url
        assert client.post(url + PATH, json={"prompt": "p"}, headers=auth).status_code == 200
        baseline = coroutines(server)  # the server's own, and the transport's closing guard

        def vanish_waiting() -> None:  # while the upstream works
            upstream.answer = stall()
            vanish_after(lambda sock: upstream.arrived.wait(5))

        def vanish_mid_stream() -> None:
            upstream.answer = sse(partial(0), hold=True)
            vanish_after(lambda sock: recv_until(sock, b"partial_image"))

        def vanish_mid_body() -> None:  # before the proxy has the whole body
            with raw_request(url, json_request_headers(stream, **auth), stream[:7]):
                pass

        def vanish_after(step: Callable[[socket.socket], object]) -> None:
            upstream.arrived.clear()
            with raw_request(url, json_request_headers(stream, **auth), stream) as sock:
                assert step(sock)

        def upstream_error() -> None:
            upstream.answer = error_json(500, {"message": "x"})
            assert client.post(url + PATH, json={"prompt": "p"}, headers=auth).status_code == 500

        def upstream_cut() -> None:
            upstream.answer = cut_json()
            with pytest.raises(httpx.RemoteProtocolError):
                client.post(url + PATH, json={"prompt": "p"}, headers=auth)

        def upstream_malformed() -> None:
            upstream.answer = sse(partial(0), b"data: oops\n\n", hold=True)
            answer = client.post(url + PATH, json={"prompt": "p", "stream": True}, headers=auth)
            assert "event: error" in answer.text and "malformed event stream" in answer.text

        def upstream_dead() -> None:
            answer = client.post(url + azure_path, json={"prompt": "p"}, headers=auth)
            assert answer.status_code == 502

        faults = [
            vanish_waiting,
            vanish_mid_stream,
            vanish_mid_body,
            upstream_error,
            upstream_cut,
            upstream_malformed,
            upstream_dead,
        ]
        for index in range(FAULTS):
            faults[index % len(faults)]()

        transport = proxy.transport
        assert isinstance(transport, AiohttpTransport)

        def leaks() -> list[object]:
            return [
                asyncio_in_flight(limiter),  # concurrency slots not given back
                transport.in_use,  # upstream responses not closed: pool connections held
                upstream.active,  # requests the upstream still serves
                len(coroutines(server)) - len(baseline),  # tasks left running
            ]

        deadline = time.monotonic() + 10
        while any(leaks()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert leaks() == [0, 0, 0, 0]
        assert coroutines(server) == baseline
        assert len(upstream.requests) > FAULTS * 5 // 7  # the faults did reach it
    # The proxy has shut down (closing its upstream connections): descriptors are back.
    deadline = time.monotonic() + 10
    while open_fds() > before + 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert open_fds() <= before + 5


def asyncio_in_flight(limiter: MemoryLimiter) -> int:
    import asyncio

    return asyncio.run(limiter.in_flight("team-a"))


def coroutines(server: Any) -> list[str]:
    # An async generator dropped unfinished is closed by a task of the loop's own, whose
    # coroutine (`async_generator_athrow`) has no __qualname__: named by its type.
    coros = (task.get_coro() for task in server.tasks())
    return sorted(getattr(coro, "__qualname__", type(coro).__name__) for coro in coros)


def recv_until(sock: socket.socket, marker: bytes) -> bool:
    data = b""
    while marker not in data:
        more = sock.recv(65536)
        if not more:
            return False
        data += more
    return True


def test_requests_leave_no_reference_cycle_behind(
    start_proxy: Callable[..., str], upstream: UpstreamDouble, caplog: pytest.LogCaptureFixture
) -> None:
    """Objects in cycles wait for the cyclic GC, whose full passes stall the event loop for
    milliseconds once a burst has filled the old generation: requests must free what they
    made by reference counting alone."""
    keys = [{"name": "team-a", "key": CLIENT_KEY, "requests_per_minute": 1000}]
    caplog.set_level(logging.INFO, logger="imagegen_proxy.access")
    proxy = start_proxy(auth={"open": False}, keys=keys)
    dead = start_proxy(openai={"base_url": f"http://127.0.0.1:{closed_port()}/v1"})
    answers = [
        json_image(),
        sse(partial(0), completed()),
        error_json(500, {"message": "x"}),
        stall(),  # with a client that leaves
    ]
    with httpx.Client(base_url=proxy, headers={"authorization": f"Bearer {CLIENT_KEY}"}) as c:
        c.post(PATH, json={"prompt": "p"})  # first-use objects: the transport, caches
        gc.collect()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            for answer in answers * 5:
                upstream.answer = answer
                if answer is answers[3]:
                    with pytest.raises(httpx.ReadTimeout):
                        c.post(PATH, json={"prompt": "p"}, timeout=0.3)
                    continue
                c.post(PATH, json={"prompt": "p", "stream": answer is answers[1]})
            c.post(PATH, json={"prompt": ""})  # 400
            c.post(PATH, json={"prompt": "p"}, headers={"authorization": "Bearer wrong"})
            assert httpx.post(dead + PATH, json={"prompt": "p"}).status_code == 502
            # A request's access log line is the last thing it does: once the five abandoned
            # ones are logged, their cancellation has run its course.
            until(lambda: client_gone(caplog) == 5, within=10)
            gc.collect()
            ours = [o for o in gc.garbage if type(o).__module__.startswith("imagegen_proxy")]
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
    assert sorted({type(o).__qualname__ for o in ours}) == []


def client_gone(caplog: pytest.LogCaptureFixture) -> int:
    return sum(getattr(r, "access", {}).get("outcome") == "client_gone" for r in caplog.records)
