"""Limits: the `RateLimiter` hook, its decisions, and the in-memory (per-process) limiter.

"N per minute" is exact: no more than N in any 60 seconds (a sliding log, not a token
bucket that admits extra). Quotas count per UTC day. The answer tells the client the
real time until a slot frees, so the SDK's own retries wait just long enough.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Protocol

from .auth import Principal
from .errors import ProxyError
from .request import ImageRequest
from .usage import Usage

WINDOW = 60.0
Release = Callable[[bool], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class LimitStatus:
    """One limit as the `x-ratelimit-*-{name}` headers report it."""

    name: str  # "requests" or "images"
    limit: int
    remaining: int
    reset: float  # seconds until the window is back to its full limit


@dataclass(slots=True)
class Decision:
    """A limiter's answer. When `allowed`, `release(charged)` must be awaited exactly once,
    when the generation ends. `charged`: it counts as spent, because it may have reached the
    upstream and the upstream answered no error (a client that left is still charged)."""

    allowed: bool
    limits: list[LimitStatus] = field(default_factory=list)
    retry_after: float = 0.0
    code: str = "rate_limit_exceeded"  # or "insufficient_quota"
    message: str = ""
    retry: bool = True  # False: waiting will not help (x-should-retry: false)
    release: Release | None = None
    limit: str = ""  # the limit that refused: "requests_per_minute", "images_per_day", ...

    def headers(self) -> list[tuple[str, str]]:
        headers = []
        for status in self.limits:
            headers += [
                (f"x-ratelimit-limit-{status.name}", str(status.limit)),
                (f"x-ratelimit-remaining-{status.name}", str(status.remaining)),
                (f"x-ratelimit-reset-{status.name}", duration(status.reset)),
            ]
        return headers

    def refusal(self) -> ProxyError:
        headers = self.headers()
        headers.append(("retry-after", str(max(1, math.ceil(self.retry_after)))))
        headers.append(("retry-after-ms", str(max(1, math.ceil(self.retry_after * 1000)))))
        quota = self.code == "insufficient_quota"
        if quota or not self.retry:
            headers.append(("x-should-retry", "false"))
        return ProxyError(
            429,
            self.message,
            type="insufficient_quota" if quota else "rate_limit_error",
            code=self.code,
            headers=headers,
        )


class RateLimiter(Protocol):
    """Admits or refuses a request for a principal, counting it when admitted."""

    async def acquire(self, principal: Principal, request: ImageRequest) -> Decision: ...


def duration(seconds: float) -> str:
    """OpenAI's reset format: "250ms", "12s", "1m3s"."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    whole = math.ceil(seconds)
    return f"{whole // 60}m{whole % 60}s" if whole >= 60 else f"{whole}s"


def utc_day(now: float) -> tuple[str, float]:
    """Today's UTC date and the seconds until tomorrow."""
    today = datetime.fromtimestamp(now, UTC)
    midnight = datetime(today.year, today.month, today.day, tzinfo=UTC) + timedelta(days=1)
    return today.date().isoformat(), midnight.timestamp() - now


def quota_refusal(what: str, limit: int, until_tomorrow: float) -> Decision:
    return Decision(
        False,
        retry_after=until_tomorrow,
        code="insufficient_quota",
        retry=False,
        message=f"Daily quota of {limit} {what} is spent; it renews at 00:00 UTC.",
        limit=f"{what}_per_day",
    )


def rate_refusal(name: str, limit: int, retry_after: float, limits: list[LimitStatus]) -> Decision:
    return Decision(
        False,
        limits,
        retry_after=retry_after,
        message=f"Rate limit of {limit} {name} per minute reached: retry in "
        f"{math.ceil(retry_after * 1000)} ms.",
        limit=f"{name}_per_minute",
    )


def too_many_images(n: int, limit: int) -> Decision:
    return Decision(
        False,
        retry_after=WINDOW,
        retry=False,
        message=f"n={n} can never fit this key's limit of {limit} images per minute.",
        limit="images_per_minute",
    )


def concurrency_refusal(limit: int) -> Decision:
    return Decision(
        False,
        retry_after=1.0,
        message=f"Too many generations in flight: at most {limit} at a time for this key.",
        limit="max_concurrent",
    )


@dataclass
class _State:
    requests: deque[float] = field(default_factory=deque)
    images: deque[tuple[float, int]] = field(default_factory=deque)
    images_in_window: int = 0
    in_flight: int = 0
    day: str = ""
    spent: Usage = field(default_factory=Usage)  # today's


class MemoryLimiter:
    """Limits held in this process: exact for one process, not shared between several."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._states: dict[str, _State] = {}

    async def spent(self, name: str) -> Usage:
        """What `name` spent today (requests, images, tokens)."""
        state = self._states.get(name)
        return Usage() if state is None else state.spent

    async def in_flight(self, name: str) -> int:
        state = self._states.get(name)
        return 0 if state is None else state.in_flight

    async def acquire(self, principal: Principal, request: ImageRequest) -> Decision:
        policy, n, now = principal.policy, request.images, self._clock()
        state = self._states.setdefault(principal.name, _State())
        day, until_tomorrow = utc_day(now)
        if state.day != day:
            state.day, state.spent = day, Usage()
        if policy.tokens_per_day is not None and state.spent.tokens >= policy.tokens_per_day:
            return quota_refusal("tokens", policy.tokens_per_day, until_tomorrow)
        if policy.images_per_day is not None and state.spent.images + n > policy.images_per_day:
            return quota_refusal("images", policy.images_per_day, until_tomorrow)
        if policy.max_concurrent is not None and state.in_flight >= policy.max_concurrent:
            return concurrency_refusal(policy.max_concurrent)

        while state.requests and state.requests[0] <= now - WINDOW:
            state.requests.popleft()
        while state.images and state.images[0][0] <= now - WINDOW:
            state.images_in_window -= state.images.popleft()[1]
        rpm, ipm = policy.requests_per_minute, policy.images_per_minute
        used = len(state.requests)
        if rpm is not None and used >= rpm:
            retry = state.requests[used - rpm] + WINDOW - now
            return rate_refusal("requests", rpm, retry, [LimitStatus("requests", rpm, 0, retry)])
        images = state.images_in_window
        if ipm is not None and n > ipm:
            return too_many_images(n, ipm)
        if ipm is not None and images + n > ipm:
            retry = _images_free_at(state.images, images + n - ipm, now)
            status = LimitStatus("images", ipm, ipm - images, retry)
            return rate_refusal("images", ipm, retry, [status])

        state.requests.append(now)
        state.images.append((now, n))
        state.images_in_window += n
        state.in_flight += 1
        state.spent = state.spent + Usage(requests=1, images=n)
        admitted_day = day

        async def release(charged: bool) -> None:
            state.in_flight -= 1
            if not charged and state.day == admitted_day:  # nothing was billed: give it back
                state.spent = state.spent - Usage(requests=0, images=n)

        return Decision(True, statuses(rpm, used + 1, ipm, images + n), release=release)

    async def record(self, principal: Principal, request: ImageRequest, usage: Usage) -> None:
        state = self._states.get(principal.name)
        if state is not None:
            state.spent = state.spent + Usage(tokens=usage.tokens)


def statuses(rpm: int | None, requests: int, ipm: int | None, images: int) -> list[LimitStatus]:
    """The limit headers after admitting: `requests` and `images` now in the window."""
    found = []
    if rpm is not None:
        found.append(LimitStatus("requests", rpm, rpm - requests, WINDOW))
    if ipm is not None:
        found.append(LimitStatus("images", ipm, ipm - images, WINDOW))
    return found


def _images_free_at(log: deque[tuple[float, int]], excess: int, now: float) -> float:
    """Seconds until enough images leave the window for `n` more to fit."""
    freed = 0
    for at, count in log:
        freed += count
        if freed >= excess:
            return at + WINDOW - now
    return WINDOW
