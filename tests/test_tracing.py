"""OpenTelemetry traces of proxied requests: the spans' structure and attributes through an
in-memory exporter, the W3C context in from the client and out to the upstream, failover,
a client that leaves, and never a secret in a span. The export over OTLP to a collector is
in test_tracing_export.py."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import socket
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest
from conftest import CLIENT_KEY, UPSTREAM_KEY, HostApp, served_double
from double import UpstreamDouble, completed, error_json, partial, sse, stall
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from providers import PROVIDER_KEY, png
from support import json_request_headers, serve, until
from test_bfl import Flux
from test_bfl import member as bfl_member
from test_kinds_on_the_mock import KEY as MOCK_KEY
from test_kinds_on_the_mock import members as mock_members

from imagegen_proxy import ImageGenProxy, ProxyConfig
from imagegen_proxy.config import ConfigError
from imagegen_proxy.mock import MockUpstream
from imagegen_proxy.observe.tracing import limits_attributes

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
PROMPT = "a lighthouse at the edge of a secret map"
PATH = "/v1/images/generations"
# A bound on how long the last span waits after the client has its answer: the proxy ends
# the request's span just after the last byte. Generous for a busy machine.
WITHIN = 30.0


class Spans:
    """The spans a proxy's own tracer provider exported, read by name and family."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))

    @property
    def finished(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())

    def servers(self) -> list[ReadableSpan]:
        return [s for s in self.finished if s.attributes and "imagegen.outcome" in s.attributes]

    def wait(self, count: int = 1) -> list[ReadableSpan]:
        """The first `count` requests' spans, once each has ended."""
        until(lambda: len(self.servers()) >= count, WITHIN)
        return self.servers()

    def children(self, parent: ReadableSpan) -> list[ReadableSpan]:
        assert parent.context is not None
        return [s for s in self.finished if s.parent and s.parent.span_id == parent.context.span_id]

    def named(self, parent: ReadableSpan, name: str) -> list[ReadableSpan]:
        return [s for s in self.children(parent) if s.name == name]

    def every_value(self) -> Iterator[str]:
        """Every attribute value, of every span and event, as text."""
        for span in self.finished:
            for value in (span.attributes or {}).values():
                yield str(value)
            for event in span.events:
                for value in (event.attributes or {}).values():
                    yield str(value)
            yield span.name


@pytest.fixture
def spans() -> Spans:
    return Spans()


@pytest.fixture
def access(caplog: pytest.LogCaptureFixture) -> Callable[[], list[dict[str, Any]]]:
    caplog.set_level(logging.INFO, logger="imagegen_proxy.access")
    return lambda: [
        json.loads(r.getMessage()) for r in caplog.records if r.name == "imagegen_proxy.access"
    ]


def hex_id(value: int, digits: int) -> str:
    return format(value, f"0{digits}x")


def sdk(url: str, key: str = "anything") -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)


def test_a_generation_is_a_server_span_continuing_the_callers_trace(
    start_proxy: Callable[..., str],
    upstream: UpstreamDouble,
    spans: Spans,
    access: Callable[[], list[dict[str, Any]]],
) -> None:
    url = start_proxy(hooks={"tracer_provider": spans.provider})
    image = sdk(url).images.generate(
        model="gpt-image-1", prompt=PROMPT, extra_headers={"traceparent": TRACEPARENT}
    )
    assert image.data
    [server] = spans.wait()
    assert server.context is not None and server.parent is not None
    assert hex_id(server.context.trace_id, 32) == TRACE_ID
    assert hex_id(server.parent.span_id, 16) == PARENT_ID and server.parent.is_remote
    assert server.kind == SpanKind.SERVER and server.name == f"POST {PATH}"
    assert server.status.status_code == StatusCode.UNSET
    attributes = dict(server.attributes or {})
    assert attributes["http.request.method"] == "POST"
    assert attributes["http.route"] == PATH and attributes["url.path"] == PATH
    assert attributes["http.response.status_code"] == 200
    assert attributes["gen_ai.operation.name"] == "image_generation"
    assert attributes["gen_ai.output.type"] == "image"
    assert attributes["gen_ai.request.model"] == "gpt-image-1"
    assert attributes["gen_ai.response.model"] == "gpt-image-1"
    assert attributes["gen_ai.provider.name"] == "openai"
    assert attributes["gen_ai.usage.input_tokens"] == 4
    assert attributes["gen_ai.usage.output_tokens"] == 6
    assert attributes["imagegen.outcome"] == "ok" and attributes["imagegen.images"] == 1
    assert attributes["imagegen.upstream"] == "openai" and attributes["imagegen.attempts"] == 1
    assert float(attributes["imagegen.cost_usd"]) > 0  # type: ignore[arg-type]
    assert "imagegen.prompt" not in attributes  # [access_log] log_prompts is off

    steps = {span.name: span for span in spans.children(server)}
    attempt_name = "image_generation gpt-image-1"
    assert set(steps) == {
        "imagegen.authenticate",
        "imagegen.limits",
        attempt_name,
        "imagegen.relay",
    }  # and imagegen.settle with Redis limits only: in memory it takes microseconds
    attempt = steps[attempt_name]
    assert attempt.kind == SpanKind.CLIENT and attempt.context is not None
    assert attempt.attributes is not None
    assert attempt.attributes["url.full"] == upstream.url + "/v1/images/generations"
    assert attempt.attributes["server.address"] == "127.0.0.1"
    assert attempt.attributes["http.response.status_code"] == 200
    assert attempt.attributes["gen_ai.provider.name"] == "openai"
    assert attempt.attributes["imagegen.upstream_request_id"] == "req_upstream_123"
    assert steps["imagegen.limits"].kind == SpanKind.INTERNAL  # limits kept in memory
    # The upstream got the attempt's context: a traced upstream joins the trace under it.
    sent = upstream.last.header("traceparent")
    assert sent == f"00-{TRACE_ID}-{hex_id(attempt.context.span_id, 16)}-01"
    # The access log line carries the trace id.
    assert access()[-1]["trace_id"] == TRACE_ID


def test_without_a_traceparent_a_request_starts_its_own_trace(
    start_proxy: Callable[..., str],
    upstream: UpstreamDouble,
    spans: Spans,
    access: Callable[[], list[dict[str, Any]]],
) -> None:
    url = start_proxy(hooks={"tracer_provider": spans.provider})
    sdk(url).images.generate(model="gpt-image-1", prompt=PROMPT)
    # A malformed traceparent is ignored: a new trace, never an error.
    sdk(url).images.generate(
        model="gpt-image-1", prompt=PROMPT, extra_headers={"traceparent": "00-zz-yy-01"}
    )
    first, second = spans.wait(2)
    for server in (first, second):
        assert server.parent is None and server.kind == SpanKind.SERVER
    assert first.context is not None and second.context is not None
    assert first.context.trace_id != second.context.trace_id
    logged = [line["trace_id"] for line in access()]
    assert logged == [hex_id(first.context.trace_id, 32), hex_id(second.context.trace_id, 32)]


def test_a_stream_has_an_event_for_each_partial_image(
    start_proxy: Callable[..., str], upstream: UpstreamDouble, spans: Spans
) -> None:
    upstream.answer = sse(partial(0), partial(1), completed())
    url = start_proxy(hooks={"tracer_provider": spans.provider})
    stream = sdk(url).images.generate(
        model="gpt-image-1", prompt=PROMPT, stream=True, partial_images=2
    )
    assert [event.type for event in stream][-1] == "image_generation.completed"
    [server] = spans.wait()
    [relay] = spans.named(server, "imagegen.relay")
    names = [event.name for event in relay.events]
    assert names == ["partial_image", "partial_image", "image_completed"]
    since = [float(event.attributes["imagegen.since_start_ms"]) for event in relay.events]  # type: ignore[index,arg-type]
    assert since == sorted(since) and since[0] > 0
    assert [e.attributes["imagegen.partial_images"] for e in relay.events[:2]] == [1, 2]  # type: ignore[index]
    assert server.attributes is not None
    assert server.attributes["gen_ai.request.stream"] is True
    assert 0 < float(server.attributes["gen_ai.response.time_to_first_chunk"]) < WITHIN  # type: ignore[arg-type]
    assert relay.attributes is not None and relay.attributes["imagegen.bytes_out"] > 0  # type: ignore[operator]


@pytest.fixture
def spare() -> Iterator[UpstreamDouble]:
    with served_double() as double:
        yield double


def openai_member(name: str, url: str, priority: int) -> dict[str, Any]:
    return {
        "name": name,
        "kind": "openai",
        "base_url": url + "/v1",
        "api_key": UPSTREAM_KEY,
        "priority": priority,  # tried in this order
    }


def test_a_failover_is_two_attempt_spans_the_first_telling_why(
    provider_proxy: Callable[..., str],
    upstream: UpstreamDouble,
    spare: UpstreamDouble,
    spans: Spans,
) -> None:
    busy = {"message": "busy", "type": "server_error", "param": None, "code": None}
    upstream.answer = error_json(503, busy)
    members = [openai_member("busy", upstream.url, 1), openai_member("spare", spare.url, 2)]
    url = provider_proxy(members, hooks={"tracer_provider": spans.provider})
    sdk(url).images.generate(model="gpt-image-1", prompt=PROMPT)
    [server] = spans.wait()
    first, second = sorted(
        spans.named(server, "image_generation gpt-image-1"), key=lambda span: span.start_time or 0
    )
    assert first.attributes is not None and second.attributes is not None
    assert first.attributes["imagegen.upstream"] == "busy"
    assert first.attributes["http.response.status_code"] == 503
    assert first.attributes["imagegen.failover.reason"] == "503"
    assert first.attributes["imagegen.failover.to"] == "spare"
    assert first.status.status_code == StatusCode.ERROR and first.attributes["error.type"] == "503"
    assert second.attributes["imagegen.upstream"] == "spare"
    assert second.attributes["http.response.status_code"] == 200
    assert second.attributes["imagegen.attempt"] == 2
    assert second.status.status_code == StatusCode.UNSET
    assert (first.end_time or 0) <= (second.start_time or 0)
    # Each upstream got its own attempt's context.
    for span, double in ((first, upstream), (second, spare)):
        assert span.context is not None
        assert hex_id(span.context.span_id, 16) in (double.last.header("traceparent") or "")
    assert server.attributes is not None and server.attributes["imagegen.attempts"] == 2
    assert server.status.status_code == StatusCode.UNSET  # the client got its image


def test_a_dead_upstream_fails_over_with_the_failure_as_its_reason(
    provider_proxy: Callable[..., str], spare: UpstreamDouble, spans: Spans
) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{closed.getsockname()[1]}"  # bound, not listening: refused
        members = [openai_member("dead", dead, 1), openai_member("spare", spare.url, 2)]
        url = provider_proxy(members, hooks={"tracer_provider": spans.provider})
        sdk(url).images.generate(model="gpt-image-1", prompt=PROMPT)
    [server] = spans.wait()
    first = next(s for s in spans.children(server) if s.attributes.get("imagegen.attempt") == 1)  # type: ignore[union-attr]
    assert first.attributes is not None
    assert first.attributes["imagegen.failover.reason"] == "connect"
    assert first.attributes["error.type"] == "connect"
    assert "http.response.status_code" not in first.attributes


def test_an_upstream_error_marks_the_request_failed(
    start_proxy: Callable[..., str], upstream: UpstreamDouble, spans: Spans
) -> None:
    upstream.answer = error_json(
        500, {"message": "boom", "type": "server_error", "param": None, "code": None}
    )
    url = start_proxy(hooks={"tracer_provider": spans.provider})
    with pytest.raises(openai.InternalServerError):
        sdk(url).images.generate(model="gpt-image-1", prompt=PROMPT)
    [server] = spans.wait()
    assert server.status.status_code == StatusCode.ERROR
    assert server.attributes is not None
    assert server.attributes["imagegen.outcome"] == "upstream_error"
    assert server.attributes["error.type"] == "500"
    assert server.attributes["http.response.status_code"] == 500
    [attempt] = spans.named(server, "image_generation gpt-image-1")
    assert attempt.attributes is not None and attempt.attributes["error.type"] == "500"


def test_a_client_that_leaves_ends_the_span_with_its_outcome(
    start_proxy: Callable[..., str], upstream: UpstreamDouble, spans: Spans
) -> None:
    upstream.answer = stall()
    url = start_proxy(hooks={"tracer_provider": spans.provider})
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"model": "gpt-image-1", "prompt": PROMPT}).encode()
    headers = json_request_headers(body, traceparent=TRACEPARENT)
    with socket.create_connection((host, int(port))) as client:
        head = f"POST {PATH} HTTP/1.1\r\nhost: {host}\r\n"
        head += "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        client.sendall(head.encode() + b"\r\n" + body)
        assert upstream.arrived.wait(WITHIN)
    # The client is gone: the upstream request is cancelled, and the trace ends with it.
    assert upstream.gone.wait(WITHIN)
    [server] = spans.wait()
    assert server.attributes is not None
    assert server.attributes["imagegen.outcome"] == "client_gone"
    assert server.attributes["http.response.status_code"] == 499
    assert server.status.status_code == StatusCode.UNSET  # not the gateway's failure
    [attempt] = spans.named(server, "image_generation gpt-image-1")
    assert attempt.attributes is not None and attempt.attributes["error.type"] == "client_gone"
    assert attempt.end_time is not None


def test_a_refusal_is_told_on_its_step_and_no_secret_is_in_any_span(
    start_proxy: Callable[..., str], upstream: UpstreamDouble, spans: Spans
) -> None:
    keys = [{"name": "team-a", "key": CLIENT_KEY, "requests_per_minute": 1}]
    url = start_proxy(auth={"open": False}, keys=keys, hooks={"tracer_provider": spans.provider})
    sdk(url, CLIENT_KEY).images.generate(model="gpt-image-1", prompt=PROMPT)
    with pytest.raises(openai.RateLimitError):
        sdk(url, CLIENT_KEY).images.generate(model="gpt-image-1", prompt=PROMPT)
    with pytest.raises(openai.AuthenticationError):
        sdk(url, "sk-forged-0000000000").images.generate(model="gpt-image-1", prompt=PROMPT)
    basic = httpx.post(
        url + PATH, json={"prompt": PROMPT}, auth=("user", CLIENT_KEY), headers={"x": "y"}
    )
    assert basic.status_code == 429  # the same key, by Basic auth: still limited
    ok, limited, forged, _ = spans.wait(4)
    assert ok.attributes is not None and ok.attributes["imagegen.key"] == "team-a"
    assert limited.attributes is not None and forged.attributes is not None
    assert limited.attributes["imagegen.outcome"] == "limited"
    assert limited.attributes["imagegen.limit"] == "requests_per_minute"
    assert limited.status.status_code == StatusCode.UNSET  # a 429 is the client's answer
    [limits] = spans.named(limited, "imagegen.limits")
    assert limits.attributes is not None
    assert limits.attributes["imagegen.error"] == "rate_limit_exceeded"
    [auth] = spans.named(forged, "imagegen.authenticate")
    assert auth.attributes is not None and auth.attributes["imagegen.error"] == "invalid_api_key"
    assert forged.attributes["imagegen.outcome"] == "rejected"
    assert not spans.named(forged, "imagegen.limits")  # a stranger gets no further
    text = "\n".join(spans.every_value())
    for secret in (CLIENT_KEY, UPSTREAM_KEY, "sk-forged-0000000000", PROMPT):
        assert secret not in text
    # Nor upstream: the client's credentials and its traceparent are not what it gets.
    for request in upstream.requests:
        assert CLIENT_KEY not in str(request.headers)


def test_the_prompt_is_traced_only_where_the_access_log_logs_it(
    start_proxy: Callable[..., str], upstream: UpstreamDouble, spans: Spans
) -> None:
    url = start_proxy(access_log={"log_prompts": True}, hooks={"tracer_provider": spans.provider})
    sdk(url).images.generate(model="gpt-image-1", prompt=PROMPT)
    [server] = spans.wait()
    assert server.attributes is not None and server.attributes["imagegen.prompt"] == PROMPT


def test_edits_and_variations_are_traced_and_carry_the_context(
    start_proxy: Callable[..., str], upstream: UpstreamDouble, spans: Spans
) -> None:
    url = start_proxy(hooks={"tracer_provider": spans.provider})
    client = sdk(url)
    image = ("in.png", io.BytesIO(png()), "image/png")
    client.images.edit(model="gpt-image-1", image=image, prompt=PROMPT)
    client.images.create_variation(model="dall-e-2", image=("in.png", png(), "image/png"))
    edit, variation = spans.wait(2)
    expected = (
        (edit, "/v1/images/edits", "image_edit", "gpt-image-1"),
        (variation, "/v1/images/variations", "image_variation", "dall-e-2"),
    )
    for server, path, operation, model in expected:
        assert server.attributes is not None
        assert server.name == f"POST {path}"
        assert server.attributes["gen_ai.operation.name"] == operation
        [attempt] = spans.named(server, f"{operation} {model}")
        assert attempt.context is not None and attempt.attributes is not None
        assert attempt.attributes["url.full"] == upstream.url + path
        sent = next(r for r in upstream.requests if r.path == path)
        assert hex_id(attempt.context.span_id, 16) in (sent.header("traceparent") or "")


def test_a_provider_task_is_a_span_per_request_under_its_attempt(
    provider_proxy: Callable[..., str], upstream: UpstreamDouble, spans: Spans
) -> None:
    flux = Flux()
    upstream.answer = flux
    url = provider_proxy([bfl_member(upstream)], hooks={"tracer_provider": spans.provider})
    sdk(url).images.generate(model="flux-pro-1.1", prompt=PROMPT)
    [server] = spans.wait()
    [attempt] = spans.named(server, "image_generation flux-pro-1.1")
    assert attempt.attributes is not None
    assert attempt.attributes["gen_ai.provider.name"] == "black_forest_labs"
    requests = sorted(spans.children(attempt), key=lambda span: span.start_time or 0)
    assert [span.name for span in requests] == ["POST", "GET", "GET", "GET"]  # one pending poll
    assert flux.steps == ["submit", "Pending", "Ready", "download"]
    for span, sent in zip(requests, upstream.requests, strict=True):
        assert span.kind == SpanKind.CLIENT and span.context is not None
        assert span.attributes is not None and span.attributes["http.response.status_code"] == 200
        assert "?" not in str(span.attributes["url.full"])  # a query can hold a signature
        assert hex_id(span.context.span_id, 16) in (sent.header("traceparent") or "")
    assert PROVIDER_KEY not in "\n".join(spans.every_value())
    assert server.attributes is not None
    assert server.attributes["gen_ai.provider.name"] == "black_forest_labs"


def test_inside_an_instrumented_app_its_span_is_the_parent(
    upstream: UpstreamDouble, spans: Spans
) -> None:
    """An app whose own OpenTelemetry middleware made a span for the request: the
    gateway's hangs under it, as an internal span."""
    config = ProxyConfig.model_validate(
        {
            "auth": {"open": True},
            "openai": {"base_url": upstream.url + "/v1", "api_key": UPSTREAM_KEY},
        }
    )
    proxy = ImageGenProxy(HostApp().app, config, tracer_provider=spans.provider)
    tracer = spans.provider.get_tracer("host")

    async def instrumented(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await proxy(scope, receive, send)
            return
        with tracer.start_as_current_span("host request", kind=SpanKind.SERVER):
            await proxy(scope, receive, send)

    with serve(instrumented) as url:
        sdk(url).images.generate(model="gpt-image-1", prompt=PROMPT)
        [server] = spans.wait()
        host = next(span for span in spans.finished if span.name == "host request")
    assert server.kind == SpanKind.INTERNAL
    assert server.parent is not None and host.context is not None
    assert server.parent.span_id == host.context.span_id


def test_tracing_off_leaves_no_trace(
    start_proxy: Callable[..., str],
    upstream: UpstreamDouble,
    access: Callable[[], list[dict[str, Any]]],
) -> None:
    url = start_proxy()
    sdk(url).images.generate(
        model="gpt-image-1", prompt=PROMPT, extra_headers={"traceparent": TRACEPARENT}
    )
    assert access()[-1]["trace_id"] is None
    assert upstream.last.header("traceparent") is None


def test_the_tracing_settings_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    base: dict[str, Any] = {"auth": {"open": True}, "openai": {"api_key": "k"}}
    with pytest.raises(ValueError, match="without credentials"):
        ProxyConfig.model_validate(base | {"tracing": {"endpoint": "http://u:p@collector"}})
    with pytest.raises(ValueError, match="sample_ratio"):
        ProxyConfig.model_validate(base | {"tracing": {"sample_ratio": 2}})
    monkeypatch.delenv("NO_SUCH_TRACING_HEADERS", raising=False)
    missing = base | {"tracing": {"enabled": True, "headers_env": "NO_SUCH_TRACING_HEADERS"}}
    with pytest.raises(ConfigError, match="NO_SUCH_TRACING_HEADERS"):
        ImageGenProxy(HostApp().app, ProxyConfig.model_validate(missing))


def test_sampled_out_requests_are_served_and_still_logged_with_their_trace_id(
    start_proxy: Callable[..., str],
    upstream: UpstreamDouble,
    access: Callable[[], list[dict[str, Any]]],
) -> None:
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=ALWAYS_OFF)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    url = start_proxy(hooks={"tracer_provider": provider})
    with contextlib.closing(sdk(url)) as client:
        client.images.generate(model="gpt-image-1", prompt=PROMPT)
    line = access()[-1]
    assert line["outcome"] == "ok" and len(line["trace_id"]) == 32
    assert exporter.get_finished_spans() == ()
    # The upstream still joins the trace, told it is not sampled (the flags' low bit).
    sent = upstream.last.header("traceparent") or ""
    assert sent.startswith(f"00-{line['trace_id']}-") and int(sent[-2:], 16) & 1 == 0
    assert trace.get_current_span() is trace.INVALID_SPAN  # nothing left attached


@pytest.fixture(scope="module")
def provider_mock() -> Iterator[str]:
    with serve(MockUpstream(api_key=MOCK_KEY)) as base:
        yield base


@pytest.mark.parametrize(
    ("kind", "system"),
    [
        ("gemini", "gcp.gemini"),
        ("stability", "stability_ai"),
        ("bfl", "black_forest_labs"),
        ("bedrock", "aws.bedrock"),  # SigV4-signed: the context rides outside the signature
    ],
)
def test_every_provider_kind_is_traced_request_by_request(
    provider_mock: str,
    provider_proxy: Callable[..., str],
    spans: Spans,
    monkeypatch: pytest.MonkeyPatch,
    kind: str,
    system: str,
) -> None:
    monkeypatch.setenv("MOCK_AWS_SECRET", MOCK_KEY)
    member, model = mock_members(provider_mock)[kind]
    url = provider_proxy([{"name": kind, **member}], hooks={"tracer_provider": spans.provider})
    assert sdk(url).images.generate(model=model, prompt=PROMPT).data
    [server] = spans.wait()
    assert server.attributes is not None
    assert server.attributes["gen_ai.provider.name"] == system
    assert server.attributes["gen_ai.response.model"] == model
    [attempt] = [s for s in spans.children(server) if s.kind == SpanKind.CLIENT]
    requests = spans.children(attempt)
    assert requests and all(s.kind == SpanKind.CLIENT for s in requests)
    assert all(s.status.status_code == StatusCode.UNSET for s in [server, attempt, *requests])
    assert MOCK_KEY not in "\n".join(spans.every_value())


def test_limits_kept_in_redis_are_a_client_span_naming_the_server_not_its_password(
    start_proxy: Callable[..., str], upstream: UpstreamDouble, spans: Spans
) -> None:
    from redis_server import redis_server

    with redis_server() as (redis_url, _):
        url = start_proxy(limits={"storage": redis_url}, hooks={"tracer_provider": spans.provider})
        sdk(url).images.generate(model="gpt-image-1", prompt=PROMPT)
        [server] = spans.wait()
    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    for name in ("imagegen.limits", "imagegen.settle"):
        [span] = spans.named(server, name)
        assert span.kind == SpanKind.CLIENT and span.attributes is not None
        assert span.attributes["db.system.name"] == "redis"
        assert (span.attributes["server.address"], span.attributes["server.port"]) == (
            "127.0.0.1",
            port,
        )
    # A password in the URL stays out of the span.
    config = ProxyConfig.model_validate(
        {
            "auth": {"open": True},
            "openai": {"api_key": "k"},
            "limits": {"storage": "redis://user:hunter2-secret@redis.internal:6380/0"},
        }
    )
    kind, attributes = limits_attributes(config)
    assert kind == SpanKind.CLIENT and "hunter2-secret" not in str(attributes)
    assert (attributes["server.address"], attributes["server.port"]) == ("redis.internal", 6380)


def test_a_provider_task_not_sampled_still_carries_the_context_on_every_request(
    provider_proxy: Callable[..., str], upstream: UpstreamDouble
) -> None:
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

    upstream.answer = Flux()
    provider = TracerProvider(sampler=ALWAYS_OFF)
    url = provider_proxy([bfl_member(upstream)], hooks={"tracer_provider": provider})
    sdk(url).images.generate(
        model="flux-pro-1.1", prompt=PROMPT, extra_headers={"traceparent": TRACEPARENT[:-2] + "00"}
    )
    sent = {request.header("traceparent") for request in upstream.requests}
    assert len(upstream.requests) == 4 and len(sent) == 1  # submit, poll, poll, download
    [context] = sent
    assert context is not None and context.startswith(f"00-{TRACE_ID}-")
    assert int(context[-2:], 16) & 1 == 0
