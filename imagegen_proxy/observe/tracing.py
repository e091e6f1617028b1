"""OpenTelemetry traces: a span for each proxied request, and its children.

One server span per request to an image endpoint (HTTP semantic conventions), continuing
the client's `traceparent`; under it a span for authentication, one for the limits (a
client span when Redis keeps them), one client span per upstream attempt (with the reason
it failed over, if it did), the relay of the answer (an event for each `partial_image` of
a stream) and, with Redis, the settling of its spend. Attributes follow the GenAI conventions where
they fit (`gen_ai.operation.name`, `gen_ai.request.model`...), plus the gateway's own
(`imagegen.*`). A key's value never goes into a span, nor the prompt unless
`[access_log] log_prompts` says so; an exception is told by its type, never its message.

Each attempt carries its span's W3C trace context upstream (`traceparent`), so a traced
upstream joins the trace; a kind that speaks another API gets a client span, and the
context, for each of its provider's requests (a task's submission, each poll).

This module needs the `tracing` extra; the middleware imports it only with tracing on, and
with it off the request path holds a `None` where a trace would be.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Iterator, Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any
from urllib.parse import urlsplit

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer, TracerProvider
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from ..config import ConfigError, ProxyConfig, TracingConfig
from ..generation import Generation
from ..types import Scope
from ..upstream.call import Answer, Call, SendUpstream
from ..upstream.relay import Attempts
from ..upstream.targets import Target
from ..wire.errors import ProxyError
from ..wire.routing import Route

logger = logging.getLogger("imagegen_proxy")

_PROPAGATOR = TraceContextTextMapPropagator()  # W3C trace context, in and out
_TRACE_HEADERS = (b"traceparent", b"tracestate")
# GenAI's gen_ai.operation.name has no image operation: these name the three.
OPERATIONS = {
    "generation": "image_generation",
    "edit": "image_edit",
    "variation": "image_variation",
}
_ENDPOINTS = {"generation": "generations", "edit": "edits", "variation": "variations"}
DEFAULT_SERVICE = "imagegen-proxy"


def _package_version() -> str:
    try:
        return version("imagegen-proxy")
    except PackageNotFoundError:  # pragma: no cover - run from a source tree
        return "0"


def start_tracing(config: ProxyConfig, provider: TracerProvider | None = None) -> Tracing:
    """The proxy's `Tracing`: with `provider` (an app's own), its tracer; with
    `[tracing] global_provider`, the global one's; else a provider of its own exporting
    over OTLP as `[tracing]` says (shut down with the proxy)."""
    settings = config.tracing
    owned = None
    if provider is None:
        if settings.global_provider:
            provider = trace.get_tracer_provider()
        else:
            provider = owned = own_provider(settings)
    tracer = provider.get_tracer("imagegen_proxy", _package_version())
    return Tracing(tracer, config, owned)


def own_provider(settings: TracingConfig) -> Any:
    """An SDK tracer provider exporting in batches (a worker thread) over OTLP."""
    from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
    from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    attributes: dict[str, str] = {SERVICE_VERSION: _package_version()}
    if settings.service_name is not None:
        attributes[SERVICE_NAME] = settings.service_name
    resource = Resource.create(attributes)
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE}))
    sampler = None
    if settings.sample_ratio is not None:  # else OTEL_TRACES_SAMPLER, parent-based always on
        sampler = ParentBased(TraceIdRatioBased(settings.sample_ratio))
    provider = SdkTracerProvider(resource=resource, sampler=sampler)
    provider.add_span_processor(BatchSpanProcessor(exporter(settings)))
    return provider


def exporter(settings: TracingConfig) -> Any:
    """The OTLP span exporter `[tracing]` names; what it leaves unset, the exporter takes
    from the `OTEL_EXPORTER_OTLP_*` variables."""
    from opentelemetry.util.re import parse_env_headers

    protocol = (
        settings.protocol
        or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    )
    headers = None
    if settings.headers_env is not None:
        value = os.environ.get(settings.headers_env)
        if value is None:
            raise ConfigError(f"[tracing] headers_env: ${settings.headers_env} is not set")
        headers = dict(parse_env_headers(value, liberal=True))
    endpoint = settings.endpoint
    try:
        if protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
                OTLPSpanExporter as GrpcExporter,
            )

            insecure = None if endpoint is None else endpoint.startswith("http://")
            return GrpcExporter(endpoint=endpoint, insecure=insecure, headers=headers)
        if protocol != "http/protobuf":
            raise ConfigError(
                f'[tracing]: OTLP protocol {protocol!r}: use "http/protobuf" or "grpc"'
            )
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        if endpoint is not None and not endpoint.endswith("/v1/traces"):
            endpoint += "/v1/traces"  # a collector's base URL, as OTEL_EXPORTER_OTLP_ENDPOINT
        return OTLPSpanExporter(endpoint=endpoint, headers=headers)
    except ImportError as exc:
        extra = "tracing-grpc" if protocol == "grpc" else "tracing"
        raise ConfigError(
            f"[tracing] needs the OTLP exporter: pip install 'imagegen-proxy[{extra}]' ({exc})"
        ) from None


def limits_attributes(config: ProxyConfig) -> tuple[SpanKind, dict[str, Any]]:
    """The limits span's kind, and where the limits are kept (never a URL's password)."""
    storage = config.limits.storage
    if storage == "memory":
        return SpanKind.INTERNAL, {"imagegen.limits.storage": "memory"}
    url = urlsplit(storage)
    found: dict[str, Any] = {"imagegen.limits.storage": "redis", "db.system.name": "redis"}
    if url.hostname:
        found["server.address"] = url.hostname
    found["server.port"] = url.port or 6379
    return SpanKind.CLIENT, found


class Tracing:
    """The proxy's tracer, and what every request's trace shares."""

    def __init__(self, tracer: Tracer, config: ProxyConfig, owned: Any = None) -> None:
        self.tracer = tracer
        self.prompts = config.access_log.log_prompts
        self.limits_kind, self.limits_attributes = limits_attributes(config)
        self.prefix = config.proxy.mount_prefix
        self._owned = owned  # a provider of its own, to flush and shut down

    def begin(self, scope: Scope, route: Route, generation: Generation) -> RequestTrace:
        """Start the trace of `generation`, a request just routed."""
        return RequestTrace(self, scope, route, generation)

    async def aclose(self) -> None:
        """Export what waits and stop exporting (a provider of its own only; in a thread:
        a collector that does not answer holds the exporter up to its timeout)."""
        owned, self._owned = self._owned, None
        if owned is not None:
            await asyncio.to_thread(owned.shutdown)


def _parent(scope: Scope) -> tuple[Context | None, SpanKind]:
    """Where a request's span hangs: the app's current span when an outer instrumentation
    made one (the gateway's span is then internal to it), else the caller's `traceparent`."""
    if trace.get_current_span().get_span_context().is_valid:
        return None, SpanKind.INTERNAL
    carrier = {
        key.decode("latin-1"): value.decode("latin-1")
        for key, value in scope["headers"]
        if key in _TRACE_HEADERS
    }
    return (_PROPAGATOR.extract(carrier) if carrier else Context()), SpanKind.SERVER


class RequestTrace:
    """One request's spans, started as it goes and ended by `finish`."""

    __slots__ = (
        "_attempt",
        "_completed",
        "_last",
        "_partials",
        "_relay",
        "_token",
        "context",
        "generation",
        "recording",
        "span",
        "tracing",
    )

    def __init__(
        self, tracing: Tracing, scope: Scope, route: Route, generation: Generation
    ) -> None:
        self.tracing, self.generation = tracing, generation
        parent, kind = _parent(scope)
        method = scope.get("method", "POST")
        template = _route(tracing.prefix, route, scope)
        attributes: dict[str, Any] = {
            "http.request.method": method,
            "http.route": template,
            "url.path": scope.get("root_path", "") + scope["path"],
            "url.scheme": scope.get("scheme", "http"),
            "imagegen.request_id": generation.id,
            "gen_ai.operation.name": OPERATIONS[route.operation],
        }
        client = scope.get("client")
        if client:
            attributes["client.address"] = client[0]
        self.span = tracing.tracer.start_span(
            f"{method} {template}", context=parent, kind=kind, attributes=attributes
        )
        self.context = trace.set_span_in_context(self.span, parent)
        # Current for the request, so that a library's own instrumentation (an app's httpx
        # client, SQLAlchemy, Redis) hangs its spans under it.
        self._token = otel_context.attach(self.context)
        found = self.span.get_span_context()
        if found.is_valid:
            generation.trace_id = format(found.trace_id, "032x")
        generation.trace = self
        # Not sampled: no span but this one, whose context still goes upstream (unsampled).
        self.recording = self.span.is_recording()
        self._attempt: _Attempt | None = None  # the attempt running, or ended and not told
        self._last: _Attempt | None = None  # the last attempt ended
        self._relay: Span | None = None
        self._partials = self._completed = 0

    # --- the pipeline's phases ---------------------------------------------------------

    def phase(
        self,
        name: str,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: dict[str, Any] | None = None,
    ) -> contextlib.AbstractContextManager[object]:
        """A child span around one step; a `ProxyError` out of it is told by its code.
        A request not sampled has none (its children would not be sampled either)."""
        if not self.recording:
            return contextlib.nullcontext()
        return self._phase(name, kind, attributes)

    @contextlib.contextmanager
    def _phase(
        self, name: str, kind: SpanKind, attributes: dict[str, Any] | None
    ) -> Iterator[Span]:
        span = self.tracing.tracer.start_span(
            name, context=self.context, kind=kind, attributes=attributes
        )
        try:
            yield span
        except ProxyError as error:
            span.set_attribute("imagegen.error", error.code or error.type)
            if error.status >= 500:
                span.set_status(Status(StatusCode.ERROR))
                span.set_attribute("error.type", error.code or error.type)
            raise
        except BaseException as exc:
            _failed(span, type(exc).__qualname__)
            raise
        finally:
            span.end()

    def limits(self) -> contextlib.AbstractContextManager[object]:
        tracing = self.tracing
        return self.phase("imagegen.limits", tracing.limits_kind, tracing.limits_attributes)

    def settle(self) -> contextlib.AbstractContextManager[object]:
        """Settling its spend: a span where it is a call to Redis; in memory it takes
        microseconds, and a span would cost more than it tells."""
        tracing = self.tracing
        if tracing.limits_kind != SpanKind.CLIENT or not self.recording:
            return contextlib.nullcontext()
        return self.phase("imagegen.settle", tracing.limits_kind, tracing.limits_attributes)

    # --- upstream attempts -------------------------------------------------------------

    def attempts(self, inner: Attempts) -> Attempts:
        """`inner`, with a client span for each attempt."""
        return _TracedAttempts(inner, self)

    def attempt_started(self, target: Target, call: Call) -> None:
        self._end_attempt()
        if not self.recording:
            self._carry(call, self.span)
            return
        generation = self.generation
        attributes = _http_client(call)
        attributes |= {
            "gen_ai.operation.name": OPERATIONS[generation.operation],
            "gen_ai.provider.name": target.api.system,
            "imagegen.upstream": target.name,
            "imagegen.attempt": generation.attempts,
        }
        if call.model is not None:
            attributes["gen_ai.request.model"] = call.model
        name = f"{attributes['gen_ai.operation.name']} {call.model or target.name}"
        span = self.tracing.tracer.start_span(
            name, context=self.context, kind=SpanKind.CLIENT, attributes=attributes
        )
        self._attempt = _Attempt(span, target.api.system, call.model)
        self._carry(call, span)

    def _carry(self, call: Call, span: Span) -> None:
        """`call` carries the context of `span` upstream; with a translating kind, each of
        its provider's requests does (with a span of its own, when sampled)."""
        if call.exchange is None:
            call.headers = call.headers + _injected(span)
        else:
            call.exchange = _Exchange(call.exchange, self, span)

    def attempt_ended(self, status: int | None) -> None:
        attempt = self._attempt
        if attempt is not None:
            attempt.status, attempt.ended = status, time.time_ns()

    def attempt_left(self) -> None:
        """The client left while the attempt ran: it was cancelled."""
        attempt = self._attempt
        if attempt is not None:
            attempt.reason = "client_gone"
            self._end_attempt()

    def failed_over(self, to: Target, reason: str) -> None:
        attempt = self._attempt
        if attempt is not None:
            attempt.span.set_attribute("imagegen.failover.reason", reason)
            attempt.span.set_attribute("imagegen.failover.to", to.name)
            attempt.reason = reason
            self._end_attempt()

    def _end_attempt(self) -> None:
        attempt, self._attempt = self._attempt, None
        if attempt is None:
            return
        span, status = attempt.span, attempt.status
        if status is not None:
            span.set_attribute("http.response.status_code", status)
            if 200 <= status < 300 and attempt.model is not None:
                span.set_attribute("gen_ai.response.model", attempt.model)
        if status is None or status >= 400:
            reason = attempt.reason or self.generation.failure or "_OTHER"
            _failed(span, reason if status is None else str(status))
        upstream_id = self.generation.upstream_request_id
        if upstream_id is not None and status is not None:
            span.set_attribute("imagegen.upstream_request_id", upstream_id)
        span.end(attempt.ended)
        self._last = attempt

    # --- the relay (`generation.Trace`) ------------------------------------------------

    def answering(self, status: int) -> None:
        if not self.recording:
            return
        self._relay = self.tracing.tracer.start_span(
            "imagegen.relay",
            context=self.context,
            attributes={"http.response.status_code": status},
        )

    def event(self, name: bytes) -> None:
        relay = self._relay
        if relay is None:
            return
        since = round(self.generation.duration * 1000, 2)
        if name.endswith(b".partial_image"):
            self._partials += 1
            if self._partials == 1:
                self.span.set_attribute("gen_ai.response.time_to_first_chunk", since / 1000)
            relay.add_event(
                "partial_image",
                {"imagegen.partial_images": self._partials, "imagegen.since_start_ms": since},
            )
        elif name.endswith(b".completed"):
            self._completed += 1
            relay.add_event(
                "image_completed",
                {"imagegen.completed_images": self._completed, "imagegen.since_start_ms": since},
            )
        elif name == b"error":
            relay.add_event("error", {"imagegen.since_start_ms": since})

    # --- the end -----------------------------------------------------------------------

    def finish(self) -> None:
        """End every span still open, the request's last, with how it ended."""
        try:
            self._finish()
        except Exception:
            logger.exception("ending the trace of request %s failed", self.generation.id)
        finally:
            otel_context.detach(self._token)
            self.generation.trace = None

    def _finish(self) -> None:
        self._end_attempt()
        generation, span = self.generation, self.span
        relay, self._relay = self._relay, None
        if relay is not None:
            relay.set_attribute("imagegen.bytes_out", generation.bytes_out)
            if generation.failure is not None:
                _failed(relay, generation.failure)
            relay.end()
        if span.is_recording():
            span.set_attributes(self._outcome(generation, self._last))
            if generation.status >= 500 or generation.outcome in ("upstream_error", "error"):
                error = generation.error or generation.failure
                # An upstream's error answer, relayed: told by its status, as HTTP's are.
                _failed(span, str(generation.status) if error in (None, "status") else error)
        span.end()

    def _outcome(self, generation: Generation, last: _Attempt | None) -> dict[str, Any]:
        found: dict[str, Any] = {
            "imagegen.outcome": generation.outcome,
            "gen_ai.output.type": "image",
        }
        if generation.status:
            found["http.response.status_code"] = generation.status
        values: Sequence[tuple[str, Any]] = (
            ("gen_ai.request.model", generation.model),
            ("gen_ai.request.choice.count", generation.n),
            ("gen_ai.request.stream", generation.stream),
            ("imagegen.key", generation.key),
            ("imagegen.project", generation.project),
            ("imagegen.client_request_id", generation.client_request_id),
            ("imagegen.size", generation.size),
            ("imagegen.quality", generation.quality),
            ("imagegen.error", generation.error),
            ("imagegen.limit", generation.limit),
            ("imagegen.replay_of", generation.replay_of),
            ("imagegen.upstream", generation.upstream if generation.attempts else None),
        )
        found.update((name, value) for name, value in values if value is not None)
        if generation.attempts:
            found["imagegen.attempts"] = generation.attempts
        if last is not None:
            found["gen_ai.provider.name"] = last.system
            if generation.charged and last.model is not None:
                found["gen_ai.response.model"] = last.model
        found["imagegen.images"] = generation.images
        found["imagegen.bytes_out"] = generation.bytes_out
        if generation.cost_micros is not None:
            found["imagegen.cost_usd"] = generation.cost_micros / 1_000_000
        if generation.usage is not None:
            found["gen_ai.usage.input_tokens"] = generation.usage.input_tokens
            found["gen_ai.usage.output_tokens"] = generation.usage.output_tokens
        if generation.stored:
            found["imagegen.stored_images"] = len(generation.stored)
        if self.tracing.prompts and generation.prompt is not None:
            found["imagegen.prompt"] = generation.prompt
        return found


@dataclasses.dataclass(slots=True)
class _Attempt:
    """An upstream attempt's span, and what ends it."""

    span: Span
    system: str  # gen_ai.provider.name
    model: str | None
    status: int | None = None
    ended: int | None = None  # when the relay was done with it (ns), before it was told why
    reason: str | None = None  # why it failed, when no status says it


class _TracedAttempts:
    """A request's `relay.Attempts`, each attempt told to its trace too."""

    __slots__ = ("_inner", "_trace")

    def __init__(self, inner: Attempts, trace: RequestTrace) -> None:
        self._inner, self._trace = inner, trace

    @property
    def targets(self) -> Sequence[Target]:
        return self._inner.targets

    def build(self, target: Target) -> Call:
        return self._inner.build(target)

    def started(self, target: Target, call: Call) -> None:
        self._inner.started(target, call)
        self._trace.attempt_started(target, call)

    def ended(self, target: Target, status: int | None, retry_after: float | None) -> None:
        self._inner.ended(target, status, retry_after)
        self._trace.attempt_ended(status)

    def left(self, target: Target) -> None:
        self._inner.left(target)
        self._trace.attempt_left()

    def failed_over(self, source: Target, to: Target, reason: str) -> None:
        self._inner.failed_over(source, to, reason)
        self._trace.failed_over(to, reason)


class _Exchange:
    """A translating kind's exchange, each of its provider's requests a client span
    under the attempt's, carrying its context."""

    __slots__ = ("_attempt", "_exchange", "_trace")

    def __init__(self, exchange: Any, trace: RequestTrace, attempt: Span) -> None:
        self._exchange, self._trace, self._attempt = exchange, trace, attempt

    async def __call__(self, send: SendUpstream) -> Answer:
        tracer, parent = self._trace.tracing.tracer, trace.set_span_in_context(self._attempt)
        if not self._trace.recording:  # the context alone, unsampled
            headers = _injected(self._attempt)

            async def carried(call: Call) -> Answer:
                return await send(dataclasses.replace(call, headers=call.headers + headers))

            unsampled: Answer = await self._exchange(carried)
            return unsampled

        async def traced(call: Call) -> Answer:
            span = tracer.start_span(
                call.method, context=parent, kind=SpanKind.CLIENT, attributes=_http_client(call)
            )
            # A copy: a kind may send one call twice, or share its headers between calls.
            call = dataclasses.replace(call, headers=call.headers + _injected(span))
            try:
                answer = await send(call)
            except BaseException as exc:
                _failed(span, type(exc).__qualname__)
                span.end()
                raise
            span.set_attribute("http.response.status_code", answer.status)
            if answer.status >= 400:
                _failed(span, str(answer.status))
            span.end()
            return answer

        answer: Answer = await self._exchange(traced)
        return answer


def _injected(span: Span) -> list[tuple[str, str]]:
    """The W3C trace context headers of `span`, for an upstream request."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
    return list(carrier.items())


def _http_client(call: Call) -> dict[str, Any]:
    """An HTTP client span's attributes for `call` (semantic conventions)."""
    url = urlsplit(call.url)
    return {
        "http.request.method": call.method,
        "url.full": _url(call.url),
        "server.address": url.hostname or "",
        "server.port": url.port or (443 if url.scheme == "https" else 80),
    }


def _url(url: str) -> str:
    """An upstream URL for a span: scheme, host, port and path; its query is left out, so
    nothing a provider puts there (a key, a signature) can reach a trace."""
    found = urlsplit(url)
    host = found.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = f":{found.port}" if found.port else ""
    return f"{found.scheme}://{host}{port}{found.path}"


def _route(prefix: str, route: Route, scope: Scope) -> str:
    """The request's route template (`http.route`): the path itself for OpenAI's fixed
    paths, the deployment a placeholder in Azure's."""
    if route.form == "azure":
        endpoint = _ENDPOINTS[route.operation]
        return f"{prefix}/openai/deployments/{{deployment-id}}/images/{endpoint}"
    path: str = scope["path"]
    return path


def _failed(span: Span, error_type: str) -> None:
    span.set_status(Status(StatusCode.ERROR))
    span.set_attribute("error.type", error_type)
