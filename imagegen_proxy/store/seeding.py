"""Budgets that survive restarts: the limiter's budget periods start from the ledger.

A limiter's budget counts live in this process (memory) or in Redis. A restart, a deploy or
a crash empties the first, and a switch from one to the other starts the new one empty:
without this, every budget would be given back. With a store, `LedgerSeeded` wraps the
limiter: the first time this process sees a budgeted key, project or organization in a
budget period, it reads what the ledger holds for it since the period began and starts
the limiter's count there (memory: unless this process already counts in it; Redis: unless
Redis has the count already, so what any process counted stands). Requests for the same
subject meanwhile wait for the same read.

What the ledger cannot know stays unknown: the generations that were in flight when the
process died (their reservation was never written), and the rows still waiting to be
written (`LedgerWriter`: at most a second of them).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any, Literal, Protocol

from ..config import BudgetPeriod
from ..governance.auth import Principal
from ..governance.ratelimit import (
    Decision,
    RateLimiter,
    Standing,
    Subject,
    budget_period,
    period_start,
)
from ..governance.ratelimit import subjects as subjects_of
from ..wire.errors import ProxyError
from ..wire.request import ImageRequest
from . import Store

logger = logging.getLogger("imagegen_proxy")


class Seedable(RateLimiter, Protocol):
    async def seed(self, name: str, period: str, micros: int, kind: BudgetPeriod) -> None: ...


class LedgerSeeded:
    """`inner`, its budget periods started from the ledger of `store` (see the module)."""

    def __init__(
        self,
        inner: Seedable,
        store: Store,
        *,
        on_error: Literal["deny", "allow"] = "deny",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.inner = inner
        self._store = store
        self._on_error = on_error
        self._clock = clock
        self._seeded: dict[str, str] = {}  # subject id -> the budget period seeded
        self._reading: dict[tuple[str, str], asyncio.Task[None]] = {}

    async def acquire(
        self, principal: Principal, request: ImageRequest, reservation: int = 0
    ) -> Decision:
        await self._seed(subjects_of(principal, request.model))
        return await self.inner.acquire(principal, request, reservation)

    async def standing(self, principal: Principal) -> list[Standing]:
        with contextlib.suppress(ProxyError):  # the view shows what the limiter has
            await self._seed(subjects_of(principal))
        return await self.inner.standing(principal)

    async def aclose(self) -> None:
        await self.inner.aclose()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)  # spent, committed, in_flight, ...

    async def _seed(self, subjects: list[Subject]) -> None:
        now = self._clock()
        for subject in subjects:
            policy = subject.policy
            if policy.budget_micros is None:
                continue
            period = budget_period(policy.budget_period, now)[0]
            if self._seeded.get(subject.id) == period:
                continue  # the common case: one dict lookup a budget
            key = (subject.id, period)
            task = self._reading.get(key)
            if task is None:
                since = period_start(policy.budget_period, now)
                reading = self._read(subject, period, since, policy.budget_period)
                task = self._reading[key] = asyncio.ensure_future(reading)
            try:
                await asyncio.shield(task)
            except Exception as exc:
                self._reading.pop(key, None)
                logger.warning(
                    "could not read the %s's spending from the ledger: %s",
                    subject.label,
                    type(exc).__name__,
                )
                if self._on_error == "deny":
                    raise ProxyError(
                        503,
                        "The proxy cannot read its budgets' spending right now: try again.",
                        type="server_error",
                        code="limits_unavailable",
                    ) from None
                continue
            self._seeded[subject.id] = period
            self._reading.pop(key, None)

    async def _read(self, subject: Subject, period: str, since: int, kind: BudgetPeriod) -> None:
        from .ledger import spent_since

        name = subject.id
        if name == "organization:":
            micros = await spent_since(self._store, since)
        elif name.startswith("project:"):
            micros = await spent_since(self._store, since, project=name.removeprefix("project:"))
        else:
            micros = await spent_since(self._store, since, key=name)
        await self.inner.seed(name, period, micros, kind)
