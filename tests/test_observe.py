"""Request ids and the access log: one line per request, for every outcome, no secrets."""

from __future__ import annotations

import io
import json
import logging
import re
import time
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest
from conftest import CLIENT_KEY, UPSTREAM_KEY
from double import UPSTREAM_HEADERS, UpstreamDouble, error_json, sse, stall
from support import json_request_headers, raw_request

from imagegen_proxy.config import AccessLogConfig
from imagegen_proxy.observe.access import AccessLog, Generation, LineHandler

PATH = "/v1/images/generations"
KEYS = [{"name": "team-a", "key": CLIENT_KEY, "requests_per_minute": 2}]
AUTH = {"authorization": f"Bearer {CLIENT_KEY}"}


@pytest.fixture
def access(caplog: pytest.LogCaptureFixture) -> Callable[[], list[dict[str, Any]]]:
    """The access log lines written so far, parsed (the default format is JSON)."""
    caplog.set_level(logging.INFO, logger="imagegen_proxy.access")

    def lines() -> list[dict[str, Any]]:
        records = [r for r in caplog.records if r.name == "imagegen_proxy.access"]
        return [json.loads(record.getMessage()) for record in records]

    return lines


def no_request_id_upstream(double: UpstreamDouble) -> None:
    """Make the double answer like `json_image()`, but without its own x-request-id."""

    async def answer(x: Any) -> None:
        body = b'{"created": 1, "data": [{"b64_json": "AAAA"}]}'
        await x.start(200, [("content-type", "application/json")])
        await x.body(body, more=False)

    double.answer = answer


def test_the_upstreams_request_id_reaches_the_client_and_the_log(
    proxy: str, upstream: UpstreamDouble, access: Callable[[], list[dict[str, Any]]]
) -> None:
    answer = httpx.post(proxy + PATH, json={"prompt": "p"}, headers={"x-request-id": "trace-7"})
    assert answer.headers["x-request-id"] == dict(UPSTREAM_HEADERS)["x-request-id"]
    [line] = access()
    assert line["upstream_request_id"] == answer.headers["x-request-id"]
    assert line["client_request_id"] == "trace-7"
    assert line["request_id"].startswith("pxy_")


def test_without_an_upstream_id_the_proxy_makes_one(
    proxy: str, upstream: UpstreamDouble, access: Callable[[], list[dict[str, Any]]]
) -> None:
    no_request_id_upstream(upstream)
    client = openai.OpenAI(base_url=proxy + "/v1", api_key=CLIENT_KEY, max_retries=0)
    response = client.images.with_raw_response.generate(prompt="p")
    request_id = response.headers["x-request-id"]
    assert re.fullmatch(r"pxy_[0-9a-f]{24}", request_id)
    [line] = access()
    assert line["request_id"] == request_id and line["upstream_request_id"] is None
    # and the upstream heard of it, to find this request in its own logs
    assert upstream.last.header("x-client-request-id") == request_id


def test_the_clients_request_id_goes_upstream_as_a_separate_header(
    proxy: str, upstream: UpstreamDouble
) -> None:
    httpx.post(proxy + PATH, json={"prompt": "p"}, headers={"x-request-id": "client-abc-1"})
    assert upstream.last.header("x-client-request-id") == "client-abc-1"
    assert upstream.last.header("x-request-id") is None  # not under the upstream's own name
    httpx.post(proxy + PATH, json={"prompt": "p"}, headers={"x-client-request-id": "c-2"})
    assert upstream.last.header("x-client-request-id") == "c-2"


@pytest.mark.parametrize("bad", ["a b", "x" * 513, "é"])
def test_an_unusable_client_request_id_is_ignored(
    proxy: str,
    upstream: UpstreamDouble,
    access: Callable[[], list[dict[str, Any]]],
    bad: str,
) -> None:
    httpx.post(proxy + PATH, json={"prompt": "p"}, headers={"x-request-id": bad.encode()})
    assert (upstream.last.header("x-client-request-id") or "").startswith("pxy_")
    assert access()[0]["client_request_id"] is None


def test_the_proxys_own_errors_carry_a_request_id(
    start_proxy: Callable[..., str], access: Callable[[], list[dict[str, Any]]]
) -> None:
    proxy = start_proxy(auth={"open": False}, keys=KEYS)
    client = openai.OpenAI(base_url=proxy + "/v1", api_key="wrong-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as failure:
        client.images.generate(prompt="p")
    assert failure.value.request_id is not None
    assert failure.value.request_id == access()[0]["request_id"]


def test_one_line_per_outcome(
    start_proxy: Callable[..., str],
    upstream: UpstreamDouble,
    access: Callable[[], list[dict[str, Any]]],
) -> None:
    proxy = start_proxy(auth={"open": False}, keys=KEYS, azure=True)
    post = httpx.Client(base_url=proxy, headers=AUTH)
    assert post.post(PATH, json={"prompt": "p", "model": "m", "n": 2}).status_code == 200
    upstream.answer = error_json(400, {"message": "bad size", "code": "invalid_value"})
    assert post.post(PATH, json={"prompt": "p"}).status_code == 400
    assert post.post(PATH, json={"prompt": "p"}).status_code == 429  # 2 per minute
    assert post.post(PATH, json={"prompt": ""}).status_code == 400
    lines = access()
    assert [(line["outcome"], line["status"]) for line in lines] == [
        ("ok", 200),
        ("upstream_error", 400),
        ("limited", 429),
        ("rejected", 400),
    ]
    ok, failed, limited, rejected = lines
    assert ok["key"] == "team-a" and ok["model"] == "m" and ok["n"] == 2
    assert ok["stream"] is False and ok["form"] == "openai" and ok["upstream"] == "openai"
    assert ok["bytes_out"] > 0 and ok["ttfb_ms"] > 0 and ok["duration_ms"] >= ok["ttfb_ms"]
    assert failed["error"] == "status"
    assert limited["limit"] == "requests_per_minute" and limited["error"] == "rate_limit_exceeded"
    assert rejected["error"] == "empty_string" and rejected["key"] == "team-a"


def test_a_client_gone_while_waiting_is_logged_as_such(
    proxy: str, upstream: UpstreamDouble, access: Callable[[], list[dict[str, Any]]]
) -> None:
    upstream.answer = stall()
    body = json.dumps({"prompt": "p"}).encode()
    with raw_request(proxy, json_request_headers(body), body):
        assert upstream.arrived.wait(5)
    assert upstream.gone.wait(5)
    line = wait_for_line(access)
    assert line["outcome"] == "client_gone" and line["status"] == 499


def test_an_upstream_cut_mid_stream_is_an_upstream_error(
    proxy: str, upstream: UpstreamDouble, access: Callable[[], list[dict[str, Any]]]
) -> None:
    upstream.answer = sse(b'event: x\ndata: {"a": 1}\n\n', cut=True)
    httpx.post(proxy + PATH, json={"prompt": "p", "stream": True})
    [line] = access()
    assert (line["outcome"], line["status"], line["error"]) == ("upstream_error", 200, "mid_stream")
    assert line["stream"] is True


def test_a_dead_upstream_is_an_upstream_error(
    start_proxy: Callable[..., str], access: Callable[[], list[dict[str, Any]]]
) -> None:
    proxy = start_proxy(openai={"base_url": "http://127.0.0.1:9/v1"})
    assert httpx.post(proxy + PATH, json={"prompt": "p"}).status_code == 502
    [line] = access()
    assert (line["outcome"], line["error"], line["ttfb_ms"]) == ("upstream_error", "connect", None)


def test_an_internal_failure_is_logged_as_an_error(
    start_proxy: Callable[..., str], access: Callable[[], list[dict[str, Any]]]
) -> None:
    class Broken:
        async def authenticate(self, *args: object) -> None:
            raise RuntimeError("boom")

    proxy = start_proxy(hooks={"authenticator": Broken()})
    assert httpx.post(proxy + PATH, json={"prompt": "p"}).status_code == 500
    [line] = access()
    assert (line["outcome"], line["status"], line["error"]) == ("error", 500, "internal_error")


def test_prompts_are_logged_only_when_asked(
    start_proxy: Callable[..., str],
    upstream: UpstreamDouble,
    access: Callable[[], list[dict[str, Any]]],
) -> None:
    quiet = start_proxy()
    loud = start_proxy(access_log={"log_prompts": True})
    httpx.post(quiet + PATH, json={"prompt": "a secret garden"})
    httpx.post(loud + PATH, json={"prompt": "a secret garden"})
    first, second = access()
    assert "prompt" not in first and "a secret garden" not in json.dumps(first)
    assert second["prompt"] == "a secret garden"


def test_key_value_lines_cannot_be_forged_by_client_values(
    start_proxy: Callable[..., str], upstream: UpstreamDouble, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="imagegen_proxy.access")
    proxy = start_proxy(access_log={"format": "kv", "log_prompts": True})
    forged = 'm" outcome=ok status=200\nfake=line'
    httpx.post(proxy + PATH, json={"prompt": "two\nlines key=value", "model": forged})
    [line] = [r.getMessage() for r in caplog.records if r.name == "imagegen_proxy.access"]
    assert "\n" not in line
    fields = parse_kv(line)
    assert fields["model"] == forged and fields["prompt"] == "two\nlines key=value"
    assert fields["outcome"] == "ok" and fields["status"] == "200" and "fake" not in fields
    assert list(fields)[:2] == ["ts", "request_id"]


def parse_kv(line: str) -> dict[str, str]:
    """Read a key=value line as a log processor would: values quoted as JSON strings."""
    pairs = re.findall(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)(?: |$)', line)
    assert " ".join(f"{k}={v}" for k, v in pairs) == line  # nothing left over
    return {k: json.loads(v) if v.startswith('"') else v for k, v in pairs}


def test_no_key_reaches_the_access_log(
    start_proxy: Callable[..., str], upstream: UpstreamDouble, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="imagegen_proxy.access")
    for format in ("json", "kv"):
        proxy = start_proxy(auth={"open": False}, keys=KEYS, access_log={"format": format})
        httpx.post(proxy + PATH, json={"prompt": "p"}, headers=AUTH)
        httpx.post(proxy + PATH, json={"prompt": "p"}, headers={"x-api-key": CLIENT_KEY + "x"})
    text = caplog.text + "".join(repr(record.__dict__) for record in caplog.records)
    assert text.count("team-a") >= 2
    assert CLIENT_KEY not in text and UPSTREAM_KEY not in text


def test_the_access_log_can_be_turned_off(
    start_proxy: Callable[..., str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="imagegen_proxy.access")
    proxy = start_proxy(access_log={"enabled": False})
    httpx.post(proxy + PATH, json={"prompt": "p"})
    assert not [r for r in caplog.records if r.name == "imagegen_proxy.access"]


def wait_for_line(access: Callable[[], list[dict[str, Any]]]) -> dict[str, Any]:
    """The first line, once written: a client that left is logged when the proxy notices."""
    deadline = time.monotonic() + 5
    while not access() and time.monotonic() < deadline:
        time.sleep(0.02)
    return access()[0]


def test_the_commands_handler_writes_what_logging_would(monkeypatch: pytest.MonkeyPatch) -> None:
    """The command writes its lines straight to the stream, skipping the log record: the same
    line as logging would write. Any other handler, filter or propagation gets the record."""
    access_logger = logging.getLogger("imagegen_proxy.access")
    monkeypatch.setattr(access_logger, "handlers", [])
    monkeypatch.setattr(access_logger, "filters", [])
    monkeypatch.setattr(access_logger, "propagate", False)
    monkeypatch.setattr(access_logger, "level", logging.INFO)
    direct, logged = io.StringIO(), io.StringIO()
    log = AccessLog(AccessLogConfig())
    generation = Generation("openai", key="team-a", model='a "quoted"\nmodel', status=200)
    access_logger.addHandler(LineHandler(direct))
    log.emit(generation)
    records: list[logging.LogRecord] = []
    other = logging.StreamHandler(logged)
    other.setFormatter(logging.Formatter("%(message)s"))
    other.addFilter(lambda record: bool(records.append(record)) or True)
    access_logger.addHandler(other)  # now a record is made, for both handlers
    log.emit(generation)
    first, second, *rest = direct.getvalue().splitlines()
    assert rest == [] and logged.getvalue().splitlines() == [second]
    assert json.loads(first) | {"ts": "", "duration_ms": 0} == json.loads(second) | {
        "ts": "",
        "duration_ms": 0,
    }
    assert json.loads(first)["model"] == 'a "quoted"\nmodel'
    [record] = records
    assert record.access["key"] == "team-a"  # type: ignore[attr-defined]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", json.loads(first)["ts"])
