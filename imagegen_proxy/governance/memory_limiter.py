"""The in-memory limiter: exact for one process, not shared between several.

Every check and every count of one request happens in one synchronous stretch (no await
between them), so concurrent requests of the event loop cannot slip past a limit or a
budget between the check and the count.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from ..config import BudgetPeriod
from ..wire.request import ImageRequest
from ..wire.usage import Usage
from .auth import Principal
from .ratelimit import (
    WINDOW,
    Admitted,
    Decision,
    RateLimiter,
    Standing,
    Subject,
    admitted,
    budget_period,
    budget_refusal,
    concurrency_refusal,
    quota_refusal,
    rate_refusal,
    settled,
    subjects,
    too_many_images,
    utc_day,
    with_budgets,
)


@dataclass
class _State:
    requests: deque[float] = field(default_factory=deque)
    images: deque[tuple[float, int]] = field(default_factory=deque)
    images_in_window: int = 0
    in_flight: int = 0
    day: str = ""
    spent: Usage = field(default_factory=Usage)  # today's
    period: str = ""  # the budget's current period
    committed: int = 0  # micro-USD spent or reserved in `period`


class MemoryLimiter(RateLimiter):
    """Limits held in this process. `clock` (epoch seconds) may be injected for tests."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._states: dict[str, _State] = {}

    async def seed(self, name: str, period: str, micros: int, kind: BudgetPeriod) -> None:
        """Start the key's (or "project:NAME"'s) budget `period` at `micros` spent, unless
        this process already counts in it."""
        state = self._states.setdefault(name, _State())
        if state.period != period:
            state.period, state.committed = period, micros

    async def spent(self, name: str) -> Usage:
        """What the key (or "project:NAME") spent today: requests, images, tokens."""
        state = self._states.get(name)
        return Usage() if state is None else state.spent

    async def committed(self, name: str) -> int:
        """Micro-USD the key (or "project:NAME") has spent or reserved this budget period."""
        state = self._states.get(name)
        return 0 if state is None else state.committed

    async def in_flight(self, name: str) -> int:
        state = self._states.get(name)
        return 0 if state is None else state.in_flight

    async def standing(self, principal: Principal) -> list[Standing]:
        now = self._clock()
        day, _ = utc_day(now)
        found = []
        for subject in subjects(principal):
            state = self._states.get(subject.id) or _State()
            period = budget_period(subject.policy.budget_period, now)[0]
            today = state.spent if state.day == day else Usage()
            found.append(Standing(subject, today, state.committed if state.period == period else 0))
        return found

    def _committed(self, found: list[Subject], now: float) -> list[tuple[Subject, int]]:
        """Each budgeted subject's spending in its current budget period."""
        committed = []
        for subject in found:
            if subject.policy.budget_micros is not None:
                state = self._states.get(subject.id)
                period = budget_period(subject.policy.budget_period, now)[0]
                spent = state.committed if state is not None and state.period == period else 0
                committed.append((subject, spent))
        return committed

    async def acquire(
        self, principal: Principal, request: ImageRequest, reservation: int = 0
    ) -> Decision:
        n, now = request.images, self._clock()
        day, until_tomorrow = utc_day(now)
        checked: list[tuple[Subject, _State]] = []
        holders = subjects(principal, request.model)
        for subject in holders:
            state = self._states.setdefault(subject.id, _State())
            refusal = self._check(subject, state, n, reservation, now, day, until_tomorrow)
            if refusal is not None:
                return with_budgets(refusal, self._committed(holders, now), now)
            checked.append((subject, state))
        found = []
        periods = []
        counted = Usage(requests=1, images=n)
        for subject, state in checked:
            used, images = len(state.requests), state.images_in_window
            state.requests.append(now)
            state.images.append((now, n))
            state.images_in_window += n
            state.in_flight += 1
            state.spent = state.spent + counted
            reset = None
            if subject.policy.budget_usd is not None:
                state.committed += reservation
                reset = budget_period(subject.policy.budget_period, now)[1]
                periods.append(state.period)
            else:
                periods.append("")  # no budget: nothing to settle there
            found.append(Admitted(subject, used + 1, images + n, state.committed, reset))

        async def release(spent: Usage | None) -> None:
            tokens, cost = (0, 0) if spent is None else settled(spent)
            returned = Usage(images=-n) if spent is None else Usage(tokens=tokens)
            for (_, state), period in zip(checked, periods, strict=True):
                state.in_flight -= 1
                if state.day == day:
                    state.spent = state.spent + returned
                if period and state.period == period:
                    # Nothing was billed: the reservation goes back. Else the cost replaces it.
                    state.committed += cost - reservation

        return admitted(found, release)

    def _check(
        self,
        subject: Subject,
        state: _State,
        n: int,
        reservation: int,
        now: float,
        day: str,
        until_tomorrow: float,
    ) -> Decision | None:
        """The refusal of the first limit of `subject` the request does not fit, if any."""
        policy = subject.policy
        if state.day != day:
            state.day, state.spent = day, Usage()
        if policy.tokens_per_day is not None and state.spent.tokens >= policy.tokens_per_day:
            return quota_refusal(subject, "tokens", policy.tokens_per_day, until_tomorrow)
        if policy.images_per_day is not None and state.spent.images + n > policy.images_per_day:
            return quota_refusal(subject, "images", policy.images_per_day, until_tomorrow)
        budget = policy.budget_micros
        if budget is not None:
            period = budget_period(policy.budget_period, now)[0]
            if state.period != period:
                state.period, state.committed = period, 0
            if state.committed + reservation > budget:
                return budget_refusal(subject, state.committed, reservation, now)
        if policy.max_concurrent is not None and state.in_flight >= policy.max_concurrent:
            return concurrency_refusal(subject, policy.max_concurrent)

        while state.requests and state.requests[0] <= now - WINDOW:
            state.requests.popleft()
        while state.images and state.images[0][0] <= now - WINDOW:
            state.images_in_window -= state.images.popleft()[1]
        rpm, ipm = policy.requests_per_minute, policy.images_per_minute
        used = len(state.requests)
        if rpm is not None and used >= rpm:
            return rate_refusal(subject, "requests", rpm, state.requests[used - rpm] + WINDOW - now)
        images = state.images_in_window
        if ipm is not None and n > ipm:
            return too_many_images(subject, n, ipm)
        if ipm is not None and images + n > ipm:
            retry = _images_free_at(state.images, images + n - ipm, now)
            return rate_refusal(subject, "images", ipm, retry, ipm - images)
        return None

    async def aclose(self) -> None:
        """Nothing to close: the counts live and die with the process."""


def _images_free_at(log: deque[tuple[float, int]], excess: int, now: float) -> float:
    """Seconds until enough images leave the window for `n` more to fit."""
    freed = 0
    for at, count in log:
        freed += count
        if freed >= excess:
            return at + WINDOW - now
    return WINDOW
