"""What this process is doing now and did lately, for the console: generations in flight,
the last hour's refusals and failures by kind, a minute at a time, and the latest of them
one by one (the ledger has only the requests that reached an upstream)."""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass

from ..generation import Generation

_MINUTES = 60
LATEST = 200  # refusals and failures kept one by one


@dataclass(frozen=True, slots=True)
class Unanswered:
    """A request refused or failed: who asked for what, and what it got. Never the prompt."""

    at: int  # Unix seconds, when it ended
    request_id: str
    key: str | None
    project: str | None
    model: str | None
    operation: str
    status: int
    outcome: str
    kind: str  # "outcome: code", as the hour's counts group it
    trace_id: str | None = None  # with [tracing] on


class Activity:
    """Fed by the middleware with each request's `Generation`: O(1) per request, bounded memory
    (60 buckets of at most as many kinds as there are error codes, and `LATEST` records)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.in_flight = 0
        self._clock = clock
        self._minutes: deque[tuple[int, Counter[str]]] = deque(maxlen=_MINUTES)
        self._latest: deque[Unanswered] = deque(maxlen=LATEST)

    def started(self, generation: Generation) -> None:
        self.in_flight += 1

    def ended(self, generation: Generation) -> None:
        if generation.admitted:
            self.in_flight -= 1
        if generation.outcome in ("ok", "replayed"):
            return
        now = int(self._clock())
        minute, kind = now // 60, f"{generation.outcome}: {generation.error or generation.status}"
        if not self._minutes or self._minutes[-1][0] != minute:
            self._minutes.append((minute, Counter()))
        self._minutes[-1][1][kind] += 1
        self._latest.append(
            Unanswered(
                now,
                generation.id,
                generation.key,
                generation.project,
                generation.model,
                generation.operation,
                generation.status,
                generation.outcome,
                kind,
                generation.trace_id,
            )
        )

    def errors(self) -> list[tuple[str, int]]:
        """The last hour's refusals and failures, by outcome and code, most first."""
        since = int(self._clock()) // 60 - _MINUTES
        total: Counter[str] = Counter()
        for minute, counts in self._minutes:
            if minute > since:
                total.update(counts)
        return total.most_common()

    def latest(self) -> list[Unanswered]:
        """The latest refusals and failures, newest first."""
        return list(reversed(self._latest))
