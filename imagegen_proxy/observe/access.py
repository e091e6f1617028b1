"""The structured access log: one line per request, from its `Generation`."""

from __future__ import annotations

import json
import logging
import re
import time
from datetime import UTC, datetime
from typing import Any

from ..config import AccessLogConfig
from ..generation import Generation

access_logger = logging.getLogger("imagegen_proxy.access")


def log_fields(generation: Generation, prompts: bool = False) -> dict[str, Any]:
    """The access log line's fields of `generation`, in a stable order."""
    fields: dict[str, Any] = {
        "ts": _timestamp(),
        "request_id": generation.id,
        "upstream_request_id": generation.upstream_request_id,
        "client_request_id": generation.client_request_id,
        "trace_id": generation.trace_id,
        "form": generation.form,
        "operation": generation.operation,
        "key": generation.key,
        "project": generation.project,
        "model": generation.model,
        "n": generation.n,
        "images": generation.images,
        "cost_usd": None if generation.cost_micros is None else generation.cost_micros / 1_000_000,
        "stream": generation.stream,
        "status": generation.status,
        "outcome": generation.outcome,
        "error": generation.error,
        "limit": generation.limit,
        "upstream": generation.upstream,
        "attempts": generation.attempts,
        "replay_of": generation.replay_of,
        "bytes_out": generation.bytes_out,
        "ttfb_ms": _ms(generation.ttfb),
        "upstream_ms": _ms(generation.upstream_time),
        "duration_ms": _ms(generation.duration),
    }
    if prompts:
        fields["prompt"] = generation.prompt
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

    def emit(self, generation: Generation) -> None:
        if not access_logger.isEnabledFor(logging.INFO):
            return
        fields = log_fields(generation, self.log_prompts)
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
