"""The bundled proxy's traces, end to end: exported over OTLP (HTTP and gRPC) to a receiver
on loopback, for an SDK request that carries a `traceparent`, with the upstream double
seeing the propagated context, and the trace id in the access log line and the ledger."""

from __future__ import annotations

import io
import json
import sqlite3
from pathlib import Path

import openai
from conftest import UPSTREAM_KEY
from double import UpstreamDouble
from otlp_receiver import Received, Receiver, otlp_grpc, otlp_http
from providers import png
from support import until
from test_cli import running

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
HEADERS_SECRET = "collector-token-5555"
# Spans are exported by a worker thread in batches; these tests make the batches quick
# (OTEL_BSP_SCHEDULE_DELAY, in ms) and wait this long at most: generous for a busy machine.
WITHIN = 60.0
SERVER = 2  # OTLP's SPAN_KIND_SERVER
CLIENT = 3


def config(upstream: UpstreamDouble, folder: Path, tracing: str) -> Path:
    path = folder / "proxy.toml"
    path.write_text(
        f'[openai]\nbase_url = "{upstream.url}/v1"\napi_key = "{UPSTREAM_KEY}"\n'
        f'[auth]\nopen = true\n[store]\nurl = "sqlite:///{folder}/proxy.db"\n'
        f"[tracing]\nenabled = true\n{tracing}"
    )
    return path


def servers(spans: list[Received]) -> list[Received]:
    return [span for span in spans if span.kind == SERVER]


def test_spans_arrive_over_otlp_http_continuing_the_callers_trace(
    upstream: UpstreamDouble, tmp_path: Path
) -> None:
    output: list[str] = []
    with otlp_http() as receiver:
        settings = (
            f'endpoint = "{receiver.url}"\nservice_name = "images-gateway"\n'
            'headers_env = "TRACING_HEADERS"\n'
        )
        env = {"OTEL_BSP_SCHEDULE_DELAY": "50", "TRACING_HEADERS": f"x-token={HEADERS_SECRET}"}
        path = config(upstream, tmp_path, settings)
        with running("--config", str(path), env=env, output=output) as (url, _):
            client = openai.OpenAI(base_url=url + "/v1", api_key="anything", max_retries=0)
            traced = {"traceparent": TRACEPARENT}
            client.images.generate(model="gpt-image-1", prompt="p", extra_headers=traced)
            client.images.edit(
                model="gpt-image-1",
                image=("in.png", io.BytesIO(png()), "image/png"),
                prompt="p",
                extra_headers=traced,
            )
            client.images.create_variation(
                model="dall-e-2", image=("in.png", png(), "image/png"), extra_headers=traced
            )
            receiver.wait_for(lambda spans: len(servers(spans)) >= 3, WITHIN)
            until(lambda: sum('"trace_id"' in line for line in output) >= 3, WITHIN)
    check_received(receiver, upstream)
    assert {headers.get("x-token") for headers in receiver.headers} == {HEADERS_SECRET}
    assert {span.service for span in receiver.spans} == {"images-gateway"}
    # The access log line and the ledger row carry the trace id.
    logged = [json.loads(line) for line in output if line.startswith("{")]
    assert [line["trace_id"] for line in logged] == [TRACE_ID] * 3
    with sqlite3.connect(tmp_path / "proxy.db") as db:  # written by the time it stopped
        rows = db.execute("SELECT source, trace_id FROM ledger ORDER BY id").fetchall()
    assert rows == [
        ("image.generation", TRACE_ID),
        ("image.edit", TRACE_ID),
        ("image.variation", TRACE_ID),
    ]


def check_received(receiver: Receiver, upstream: UpstreamDouble) -> None:
    """Each request's server span continues the caller's trace, its attempt's client span
    hangs under it, and the upstream got that attempt's context."""
    found = servers(receiver.spans)
    assert [span.name for span in found] == [
        "POST /v1/images/generations",
        "POST /v1/images/edits",
        "POST /v1/images/variations",
    ]
    for server, request in zip(found, upstream.requests, strict=True):
        assert (server.trace_id, server.parent_id) == (TRACE_ID, PARENT_ID)
        assert server.attributes["imagegen.outcome"] == "ok"
        [attempt] = [
            span
            for span in receiver.spans
            if span.parent_id == server.span_id and span.kind == CLIENT
        ]
        assert attempt.trace_id == TRACE_ID
        assert attempt.attributes["http.response.status_code"] == 200
        assert request.header("traceparent") == f"00-{TRACE_ID}-{attempt.span_id}-01"
        children = {span.name for span in receiver.spans if span.parent_id == server.span_id}
        assert {"imagegen.authenticate", "imagegen.limits", "imagegen.relay"} <= children


def test_spans_arrive_over_otlp_grpc_and_what_waits_is_sent_at_shutdown(
    upstream: UpstreamDouble, tmp_path: Path
) -> None:
    with otlp_grpc() as receiver:
        settings = f'endpoint = "{receiver.url}"\nprotocol = "grpc"\n'
        # A batch waits a minute: only the shutdown's flush can send it in time.
        env = {"OTEL_BSP_SCHEDULE_DELAY": "60000"}
        path = config(upstream, tmp_path, settings)
        with running("--config", str(path), env=env) as (url, _):
            client = openai.OpenAI(base_url=url + "/v1", api_key="anything", max_retries=0)
            stream = client.images.generate(
                model="gpt-image-1",
                prompt="p",
                extra_headers={"traceparent": TRACEPARENT},
            )
            assert stream.data
            assert not receiver.spans
        receiver.wait_for(lambda spans: len(servers(spans)) == 1, WITHIN)
    [server] = servers(receiver.spans)
    assert (server.trace_id, server.parent_id) == (TRACE_ID, PARENT_ID)
    assert server.service == "imagegen-proxy"
    assert (upstream.last.header("traceparent") or "").startswith(f"00-{TRACE_ID}-")
