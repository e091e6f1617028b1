"""A small OTLP trace receiver on loopback, over HTTP (protobuf) or gRPC: what a collector
would get from the proxy, decoded into plain `Received` spans the tests can read."""

from __future__ import annotations

import contextlib
import gzip
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from support import serve


@dataclass
class Received:
    """One span as exported: ids in hex, attributes (and each event's) as plain values."""

    name: str
    trace_id: str
    span_id: str
    parent_id: str
    kind: int  # OTLP's: 1 internal, 2 server, 3 client
    attributes: dict[str, Any]
    events: list[tuple[str, dict[str, Any]]]
    status: int  # OTLP's: 0 unset, 1 ok, 2 error
    service: str | None
    start: int  # Unix ns
    end: int


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(one) for one in value.array_value.values]
    return getattr(value, kind) if kind else None


def _attributes(found: Any) -> dict[str, Any]:
    return {one.key: _value(one.value) for one in found}


@dataclass
class Receiver:
    """What the collector got: its spans and each export's headers, as they arrive."""

    spans: list[Received] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    arrived: threading.Condition = field(default_factory=threading.Condition)
    url: str = ""

    def take(self, body: bytes, headers: dict[str, str]) -> bytes:
        request = trace_service_pb2.ExportTraceServiceRequest()
        request.ParseFromString(body)
        found = []
        for resource_spans in request.resource_spans:
            resource = _attributes(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    found.append(
                        Received(
                            name=span.name,
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_id=span.parent_span_id.hex(),
                            kind=span.kind,
                            attributes=_attributes(span.attributes),
                            events=[(e.name, _attributes(e.attributes)) for e in span.events],
                            status=span.status.code,
                            service=resource.get("service.name"),
                            start=span.start_time_unix_nano,
                            end=span.end_time_unix_nano,
                        )
                    )
        with self.arrived:
            self.spans += found
            self.headers.append(headers)
            self.arrived.notify_all()
        return trace_service_pb2.ExportTraceServiceResponse().SerializeToString()

    def wait_for(self, condition: Callable[[list[Received]], bool], within: float) -> None:
        """Until `condition(spans)` holds, or fail after `within` seconds."""
        with self.arrived:
            if not self.arrived.wait_for(lambda: condition(self.spans), within):
                names = sorted({span.name for span in self.spans})
                raise AssertionError(f"spans not received within {within} s; got {names}")

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        """The OTLP/HTTP endpoint: `POST /v1/traces`, binary protobuf."""
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        body = b"".join(chunks)
        if headers.get("content-encoding") == "gzip":
            body = gzip.decompress(body)
        if scope["path"] != "/v1/traces":
            await send({"type": "http.response.start", "status": 404, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        answer = self.take(body, headers)
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/x-protobuf")],
            }
        )
        await send({"type": "http.response.body", "body": answer})


@contextlib.contextmanager
def otlp_http() -> Iterator[Receiver]:
    """A receiver at `receiver.url` (the collector's base URL, as `[tracing] endpoint`)."""
    receiver = Receiver()
    with serve(receiver, lifespan="off") as url:
        receiver.url = url
        yield receiver


@contextlib.contextmanager
def otlp_grpc() -> Iterator[Receiver]:
    """A receiver of OTLP/gRPC at `receiver.url` (`http://127.0.0.1:PORT`)."""
    import grpc
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc

    receiver = Receiver()

    class Service(trace_service_pb2_grpc.TraceServiceServicer):  # type: ignore[misc]
        def Export(self, request: Any, context: Any) -> Any:
            headers = {key: value for key, value in context.invocation_metadata()}
            receiver.take(request.SerializeToString(), headers)
            return trace_service_pb2.ExportTraceServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Service(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    receiver.url = f"http://127.0.0.1:{port}"
    try:
        yield receiver
    finally:
        server.stop(grace=None)
