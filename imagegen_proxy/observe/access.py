"""What one proxied request did, for the access log and the metrics: request ids, the
`Entry` that collects the facts as the request goes, and the structured access log."""

from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

from ..config import AccessLogConfig
from ..types import Scope
from ..wire.errors import ProxyError
from ..wire.request import ImageRequest

if TYPE_CHECKING:
    from ..governance.auth import Principal
    from ..upstream.relay import Outcome

access_logger = logging.getLogger("imagegen_proxy.access")

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


@dataclass(slots=True)
class Entry:
    """One proxied request, filled in as it goes; logged and counted when it ends."""

    form: str  # the path form the client used: "openai" or "azure"
    operation: str = "generation"  # "generation", "edit" or "variation"
    id: str = field(default_factory=new_request_id)
    started: float = field(default_factory=time.perf_counter)
    client_request_id: str | None = None
    key: str | None = None  # the principal's name, never its key
    key_id: str | None = None  # the store's id of the key, for a key kept there
    project: str | None = None  # the key's project
    project_id: str | None = None
    model: str | None = None  # the model, or the Azure deployment
    n: int | None = None
    stream: bool | None = None
    prompt: str | None = None
    status: int = 0  # what the client got
    bytes_out: int = 0  # body bytes sent to the client
    upstream: str | None = None  # the upstream's name, once the request went there
    attempts: int = 0  # upstreams tried (more than one: it failed over)
    failovers: list[tuple[str, str, str]] = field(default_factory=list)  # (from, to, reason)
    upstream_request_id: str | None = None
    ttfb: float | None = None  # seconds until the upstream's response started
    upstream_time: float | None = None  # seconds from sending upstream to the last byte
    outcome: Result = "ok"
    error: str | None = None  # the error code the client got, or how the upstream failed
    limit: str | None = None  # the limit that refused the request
    images: int = 0  # images charged: the request reached the upstream, which answered no error
    cost_micros: int | None = None  # what was charged, in micro-USD; None: no price known
    reserved: int = 0  # micro-USD reserved against its budgets before it went upstream
    size: str | None = None
    quality: str | None = None
    reached: bool = False  # the request may have reached the upstream (a ledger line)
    input_tokens: int = 0
    output_tokens: int = 0
    admitted: bool = False  # the limits let it through: it counts as in flight
    replay_of: str | None = None  # the request id of the generation it joined or replayed

    @property
    def over_reservation(self) -> bool:
        """Whether it cost more than the worst case reserved for it (a budgeted request)."""
        return self.cost_micros is not None and self.cost_micros > self.reserved > 0

    @property
    def duration(self) -> float:
        return time.perf_counter() - self.started

    def identify(self, principal: Principal) -> None:
        self.key, self.key_id = principal.name, principal.id
        if principal.project is not None:
            self.project, self.project_id = principal.project.name, principal.project.id

    def describe(self, request: ImageRequest) -> None:
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

    def relayed(self, outcome: Outcome, images: int) -> None:
        """The upstream exchange ended as `outcome` (normally, failed, or cut short)."""
        self.upstream_request_id = outcome.upstream_request_id
        self.upstream = outcome.upstream or self.upstream
        self.attempts = outcome.attempts
        self.ttfb, self.upstream_time = outcome.ttfb, outcome.elapsed
        self.bytes_out = outcome.bytes_out
        self.reached = outcome.reached
        if outcome.usage is not None:
            self.input_tokens = outcome.usage.input_tokens
            self.output_tokens = outcome.usage.output_tokens
        if outcome.status is not None:
            self.status = outcome.status
        if outcome.client_gone:
            self.gone()
        elif outcome.failure is not None:
            self.outcome, self.error = "upstream_error", outcome.failure
        if outcome.charged:
            self.images = images

    def fields(self, prompts: bool = False) -> dict[str, Any]:
        """The access log line's fields, in a stable order."""
        fields: dict[str, Any] = {
            "ts": _timestamp(),
            "request_id": self.id,
            "upstream_request_id": self.upstream_request_id,
            "client_request_id": self.client_request_id,
            "form": self.form,
            "operation": self.operation,
            "key": self.key,
            "project": self.project,
            "model": self.model,
            "n": self.n,
            "images": self.images,
            "cost_usd": None if self.cost_micros is None else self.cost_micros / 1_000_000,
            "stream": self.stream,
            "status": self.status,
            "outcome": self.outcome,
            "error": self.error,
            "limit": self.limit,
            "upstream": self.upstream,
            "attempts": self.attempts,
            "replay_of": self.replay_of,
            "bytes_out": self.bytes_out,
            "ttfb_ms": _ms(self.ttfb),
            "upstream_ms": _ms(self.upstream_time),
            "duration_ms": _ms(self.duration),
        }
        if prompts:
            fields["prompt"] = self.prompt
        return fields


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


_second: list[Any] = [None, ""]  # the last second formatted, and its text up to the seconds


def _timestamp() -> str:
    """Now in UTC, as `2026-12-01T23:58:01.123Z`; the date and time are formatted once a
    second, not for every line."""
    now = time.time()
    second = int(now)
    if second != _second[0]:
        moment = datetime.fromtimestamp(second, UTC)
        _second[0], _second[1] = second, moment.strftime("%Y-%m-%dT%H:%M:%S")
    return f"{_second[1]}.{int((now - second) * 1000):03d}Z"


class AccessLog:
    """Writes one line per request on the `imagegen_proxy.access` logger, at INFO.

    `json`: one JSON object. `kv`: `key=value` pairs, absent values left out, and any
    value that is not a plain word quoted as a JSON string, so a client-chosen model name
    or prompt can never forge a field or a line. The fields also ride on the record as
    `record.access`, for handlers that format records themselves.
    """

    def __init__(self, config: AccessLogConfig) -> None:
        self.format = config.format
        self.log_prompts = config.log_prompts

    def emit(self, entry: Entry) -> None:
        if not access_logger.isEnabledFor(logging.INFO):
            return
        fields = entry.fields(self.log_prompts)
        line = json.dumps(fields) if self.format == "json" else kv_line(fields)
        handler = _lines_only()
        if handler is None:
            access_logger.info(line, extra={"access": fields})
            return
        # The command's own handler alone: the line is all it writes, so it is written
        # without a log record, which costs more than the rest of the line (bench/README.md).
        with handler.lock:  # type: ignore[union-attr]
            handler.stream.write(line + "\n")
            handler.stream.flush()


class LineHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The command's access log handler: each line bare on the stream, nothing else."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self.setFormatter(logging.Formatter("%(message)s"))


def _lines_only() -> LineHandler | None:
    """The access logger's handler when it is a `LineHandler` alone, with no filter
    anywhere: writing the line is then all that logging the record would do."""
    handlers = access_logger.handlers
    if len(handlers) != 1 or access_logger.filters or access_logger.propagate:
        return None
    handler = handlers[0]
    if type(handler) is not LineHandler or handler.filters or handler.level > logging.INFO:
        return None
    return handler


_PLAIN = re.compile(r"[\w.:/@+-]+", re.ASCII)


def kv_line(fields: dict[str, Any]) -> str:
    parts = []
    for name, value in fields.items():
        if value is None:
            continue
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, int | float):
            text = str(value)
        else:
            text = value if _PLAIN.fullmatch(value) else json.dumps(value)
        parts.append(f"{name}={text}")
    return " ".join(parts)
