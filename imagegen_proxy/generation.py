"""One request's life in one record: who asked, for what, where it went, what it cost and
how it ended.

The middleware makes a `Generation` for each request to an image endpoint and passes it
along: the pipeline fills in who and what, the relay where it went and how the upstream
answered, and settling what it cost. When it ends, the access log, the metrics, the
console's activity and the ledger each read it; the limiter and the usage observers are
told of it once, in `ImageGenProxy._settle`.
"""

from __future__ import annotations

import os
import re
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

from .types import Scope
from .wire.errors import ProxyError
from .wire.request import ImageRequest
from .wire.usage import Usage

if TYPE_CHECKING:
    from .governance.auth import Principal
    from .governance.pricing import Price
    from .governance.ratelimit import Decision
    from .store.ledger import LedgerRow

# What the proxy accepts as a client's request id: visible ASCII, as OpenAI's own
# X-Client-Request-Id (anything else is ignored: never logged, never sent on).
_CLIENT_ID = re.compile(rb"[\x21-\x7e]{1,512}")
_CLIENT_ID_HEADERS = (b"x-client-request-id", b"x-request-id")

Result = Literal["ok", "replayed", "client_gone", "upstream_error", "limited", "rejected", "error"]
# nginx's "client closed request": the client left before any answer was sent.
CLIENT_CLOSED = 499


def new_request_id() -> str:
    """The proxy's own id for a request: the client gets it when the upstream gives none."""
    return "pxy_" + os.urandom(12).hex()


def client_request_id(scope: Scope) -> str | None:
    """The client's own id for its request (`X-Client-Request-Id`, else `X-Request-Id`)."""
    for name in _CLIENT_ID_HEADERS:
        for key, value in scope["headers"]:
            if key == name:
                return value.decode() if _CLIENT_ID.fullmatch(value) else None
    return None


class Trace(Protocol):
    """What the relay tells a traced request's trace (`observe.tracing.RequestTrace`)."""

    def answering(self, status: int) -> None:
        """The response starts: `status` goes to the client, and the relay begins."""
        ...

    def event(self, name: bytes) -> None:
        """An event of the answer's stream passed on to the client (`partial_image`...)."""
        ...

    def settle(self) -> AbstractContextManager[object]:
        """Around settling its spend (`ImageGenProxy._settle`)."""
        ...


@dataclass(slots=True)
class Generation:
    """One proxied request, filled in as it goes; logged, counted and settled when it ends."""

    form: str  # the path form the client used: "openai" or "azure"
    operation: str = "generation"  # "generation", "edit" or "variation"
    id: str = field(default_factory=new_request_id)
    started: float = field(default_factory=time.perf_counter)
    client_request_id: str | None = None
    # Who: the principal, by name and id (never its key).
    principal: Principal | None = None
    key: str | None = None
    key_id: str | None = None  # the store's id of the key, for a key kept there
    project: str | None = None  # the key's project
    project_id: str | None = None
    # What: the request, and what the limits made of it.
    request: ImageRequest | None = None
    model: str | None = None  # the model, or the Azure deployment
    n: int | None = None  # images asked for
    stream: bool | None = None
    prompt: str | None = None
    size: str | None = None
    quality: str | None = None
    price: Price | None = None
    reserved: int = 0  # micro-USD reserved against its budgets before it went upstream
    decision: Decision | None = None  # the limits' admission, released once when settled
    admitted: bool = False  # the limits let it through: it counts as in flight
    replay_of: str | None = None  # the request id of the generation it joined or replayed
    # Where it went, as the relay saw it.
    upstream: str | None = None  # the upstream of the last attempt
    attempts: int = 0  # upstreams tried (more than one: it failed over)
    failovers: list[tuple[str, str, str]] = field(default_factory=list)  # (from, to, reason)
    reached: bool = False  # it may have reached the upstream (and be billed there)
    upstream_status: int | None = None  # the upstream's, once it answered
    stored: list[str] = field(default_factory=list)  # its images' keys in [storage]
    billed: bool = False  # a provider took the work on (a submitted task): spent even if it failed
    upstream_request_id: str | None = None
    failure: str | None = None  # how the upstream failed (see metrics.Metrics.upstream_errors)
    client_gone: bool = False
    ttfb: float | None = None  # seconds until the upstream's response started
    upstream_time: float | None = None  # seconds from sending upstream to the last byte
    usage: Usage | None = None  # the upstream's token counts, when its answer had them
    bytes_out: int = 0  # body bytes sent to the client
    # How it ended.
    status: int = 0  # what the client got
    outcome: Result = "ok"
    error: str | None = None  # the error code the client got, or how the upstream failed
    limit: str | None = None  # the limit that refused the request
    images: int = 0  # images charged: it reached the upstream, which answered no error
    cost_micros: int | None = None  # what was charged, in micro-USD; None: no price known
    input_tokens: int = 0
    output_tokens: int = 0
    settled: bool = False  # its slot and its spend were given back and told, once
    # Its trace, with tracing on: the W3C trace id (logged, and in the ledger), and what
    # the relay tells it.
    trace_id: str | None = None
    trace: Trace | None = None

    @property
    def charged(self) -> bool:
        """Whether it counts as spent: it may have reached the upstream, and the upstream
        did not answer an error (or it had taken the work on, `billed`). A client that left
        changes nothing: the upstream may well finish the generation, and bill it."""
        status = self.upstream_status
        if self.billed:
            return True
        return self.reached if status is None else 200 <= status < 300

    @property
    def over_reservation(self) -> bool:
        """Whether it cost more than the worst case reserved for it (a budgeted request)."""
        return self.cost_micros is not None and self.cost_micros > self.reserved > 0

    @property
    def duration(self) -> float:
        return time.perf_counter() - self.started

    def identify(self, principal: Principal) -> None:
        self.principal = principal
        self.key, self.key_id = principal.name, principal.id
        if principal.project is not None:
            self.project, self.project_id = principal.project.name, principal.project.id

    def describe(self, request: ImageRequest) -> None:
        self.request = request
        self.model, self.n = request.model, request.images
        self.stream, self.prompt = request.stream, request.body.prompt
        self.size, self.quality = request.size, request.quality

    def refused(self, error: ProxyError) -> None:
        """The proxy answered `error` itself (an upstream failure is already known)."""
        self.status = error.status
        if self.outcome != "ok":
            return
        self.error = error.code
        if error.status == 429:
            self.outcome = "limited"
        else:
            self.outcome = "rejected" if error.status < 500 else "error"

    def gone(self) -> None:
        self.outcome, self.status = "client_gone", self.status or CLIENT_CLOSED

    def relayed(self) -> None:
        """The upstream exchange ended (normally, failed, or cut short): how it ended,
        from what the relay saw."""
        if self.usage is not None:
            self.input_tokens = self.usage.input_tokens
            self.output_tokens = self.usage.output_tokens
        if self.upstream_status is not None:
            self.status = self.upstream_status
        if self.client_gone:
            self.gone()
        elif self.failure is not None:
            self.outcome, self.error = "upstream_error", self.failure
        if self.charged:
            self.images = self.n or 0

    def ledger_row(self) -> LedgerRow:
        """The ledger's line for a generation that reached the upstream."""
        from .store.ledger import LedgerRow

        return LedgerRow(
            at=int(time.time()),
            request_id=self.id,
            key_id=self.key_id,
            key_name=self.key or "",
            project_id=self.project_id,
            project_name=self.project,
            model=self.model,
            source=f"image.{self.operation}",
            size=self.size,
            quality=self.quality,
            n=self.n or 1,
            images=self.images,
            status=self.status,
            outcome=self.outcome,
            input_tokens=self.input_tokens,
            output_tokens=self.output_tokens,
            cost_micros=self.cost_micros,
            duration_ms=round(self.duration * 1000),
            objects=self.stored or None,
            trace_id=self.trace_id,
        )
