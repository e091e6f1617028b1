"""What this process is doing now and did lately, for the console's overview: generations
in flight, and the last hour's refusals and failures by kind, a minute at a time."""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable

from .observe import Entry

_MINUTES = 60


class Activity:
    """Fed by the middleware with each request's `Entry`: O(1) per request, bounded memory
    (60 buckets of at most as many kinds as there are error codes)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.in_flight = 0
        self._clock = clock
        self._minutes: deque[tuple[int, Counter[str]]] = deque(maxlen=_MINUTES)

    def started(self, entry: Entry) -> None:
        self.in_flight += 1

    def ended(self, entry: Entry) -> None:
        if entry.admitted:
            self.in_flight -= 1
        if entry.outcome in ("ok", "replayed"):
            return
        minute = int(self._clock()) // 60
        if not self._minutes or self._minutes[-1][0] != minute:
            self._minutes.append((minute, Counter()))
        self._minutes[-1][1][f"{entry.outcome}: {entry.error or entry.status}"] += 1

    def errors(self) -> list[tuple[str, int]]:
        """The last hour's refusals and failures, by outcome and code, most first."""
        since = int(self._clock()) // 60 - _MINUTES
        total: Counter[str] = Counter()
        for minute, counts in self._minutes:
            if minute > since:
                total.update(counts)
        return total.most_common()
