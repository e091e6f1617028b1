"""Limits: the `RateLimiter` hook, its decisions, and the rules both built-in limiters share.

A request must fit every limit of its key and, when the key belongs to a project, every
limit of the project: each is a *subject* with a policy. "N per minute" is exact: no more
than N in any 60 seconds (a sliding log, not a token bucket that admits extra). Quotas count
per UTC day; budgets per UTC calendar day, week, month, or in total. A budget is hard: the
request's worst-case cost is reserved before anything goes upstream, and settled to the
actual cost when the generation ends. The answer tells the client the real time until a
slot frees, so the SDK's own retries wait just long enough.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple, Protocol

from ..config import BudgetPeriod, Policy
from ..wire.errors import ProxyError
from ..wire.request import ImageRequest
from ..wire.usage import Usage
from .auth import Principal
from .pricing import usd

WINDOW = 60.0
# Awaited once when an admitted generation ends: with what it spent when it counts as spent
# (its images, tokens and cost), or None when it does not (nothing reached the upstream,
# or the upstream answered an error): then its images and its reservation go back.
Release = Callable[[Usage | None], Awaitable[None]]
# A total budget never renews: a refusal's retry-after says "not soon".
_NEVER = 365 * 86400.0


class Subject(NamedTuple):
    """One holder of limits: a key, or the project its key belongs to."""

    id: str  # where its counts live: the key's name, or "project:" + the project's
    label: str  # for messages: "key 'a'" or "project 'growth'"
    policy: Policy


def subjects(principal: Principal, model: str | None = None) -> list[Subject]:
    """Who holds limits over a request for `model`: the key, its project, and the
    project's limits for that model alone (OpenAI's project rate limits)."""
    found = [Subject(principal.name, f"key '{principal.name}'", principal.policy)]
    project = principal.project
    if project is not None:
        label = f"project '{project.name}'"
        found.append(Subject(f"project:{project.name}", label, project.policy))
        alone = None if model is None else project.per_model.get(model)
        if alone is not None:
            label = f"project '{project.name}' for {model}"
            found.append(Subject(f"project:{project.name}:model:{model}", label, alone))
    if principal.organization is not None:
        found.append(Subject("organization:", "organization", principal.organization))
    return found


@dataclass(frozen=True, slots=True)
class LimitStatus:
    """One limit as the `x-ratelimit-*-{name}` headers report it."""

    name: str  # "requests" or "images"
    limit: int
    remaining: int
    reset: float  # seconds until the window is back to its full limit


@dataclass(frozen=True, slots=True)
class BudgetStatus:
    """A budget as the `x-budget-*` headers report it, after this request's reservation."""

    limit: int  # micro-USD
    remaining: int
    reset: datetime | None  # the period's end; None for a total budget


@dataclass(slots=True)
class Decision:
    """A limiter's answer. When `allowed`, `release(spent)` must be awaited exactly once,
    when the generation ends (see `Release`)."""

    allowed: bool
    limits: list[LimitStatus] = field(default_factory=list)
    retry_after: float = 0.0
    code: str = "rate_limit_exceeded"  # or "insufficient_quota"
    message: str = ""
    retry: bool = True  # False: waiting will not help (x-should-retry: false)
    release: Release | None = None
    limit: str = ""  # the limit that refused: "requests_per_minute", "budget_usd", ...
    budget: BudgetStatus | None = None  # the tighter of the key's and its project's

    def headers(self) -> list[tuple[str, str]]:
        headers = []
        for status in self.limits:
            names = _LIMIT_HEADERS[status.name]
            headers += [
                (names[0], str(status.limit)),
                (names[1], str(status.remaining)),
                (names[2], _WINDOW_RESET if status.reset == WINDOW else duration(status.reset)),
            ]
        budget = self.budget
        if budget is not None:
            headers += [
                ("x-budget-limit-usd", usd(budget.limit)),
                ("x-budget-remaining-usd", usd(max(0, budget.remaining))),
            ]
            if budget.reset is not None:
                headers.append(("x-budget-reset", rfc3339(budget.reset)))
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


@dataclass(frozen=True, slots=True)
class Standing:
    """Where one subject stands now: today's spending, and its budget period's."""

    subject: Subject
    today: Usage
    committed: int  # micro-USD spent or reserved in the budget's current period

    def json(self, now: float) -> dict[str, Any]:
        """For the client's own view (`GET /v1/imagegen/budget`)."""
        policy = self.subject.policy
        limits = policy.model_dump(exclude_none=True, exclude={"budget_usd", "budget_period"})
        if "models" in limits:
            limits["models"] = sorted(limits["models"])
        budget = None
        if policy.budget_micros is not None:
            _, ends = budget_period(policy.budget_period, now)
            budget = {
                "limit_usd": policy.budget_micros / 1_000_000,
                "period": policy.budget_period,
                "spent_usd": self.committed / 1_000_000,  # reservations in flight included
                "remaining_usd": max(0, policy.budget_micros - self.committed) / 1_000_000,
                "resets_at": None if ends is None else rfc3339(ends),
            }
        name = self.subject.id.removeprefix("project:")
        today = {"requests": self.today.requests, "images": self.today.images}
        today["tokens"] = self.today.tokens
        return {"name": name, "limits": limits, "today": today, "budget": budget}


class RateLimiter(Protocol):
    """Admits or refuses a request for a principal, counting it (and reserving
    `reservation` micro-USD against its budgets) when admitted."""

    async def acquire(
        self, principal: Principal, request: ImageRequest, reservation: int
    ) -> Decision: ...

    async def standing(self, principal: Principal) -> list[Standing]:
        """Where the principal and its project stand (for the client's own view)."""
        return []

    async def aclose(self) -> None:
        """Release what the limiter holds (connections); called on shutdown."""


def settled(spent: Usage) -> tuple[int, int]:
    """The tokens and micro-USD a release counts: never below zero, whatever a hook or an
    upstream reported, so that no release credits a budget or a quota."""
    return max(0, spent.tokens), max(0, spent.cost_micros)


def duration(seconds: float) -> str:
    """OpenAI's reset format: "250ms", "12s", "1m3s"."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    whole = math.ceil(seconds)
    return f"{whole // 60}m{whole % 60}s" if whole >= 60 else f"{whole}s"


def rfc3339(moment: datetime) -> str:
    text = _RFC3339.get(moment)
    if text is None:  # a budget period's end: the same for every request of the period
        text = moment.isoformat().replace("+00:00", "Z")
        if len(_RFC3339) >= 64:
            _RFC3339.clear()
        _RFC3339[moment] = text
    return text


_RFC3339: dict[datetime, str] = {}


_LIMIT_HEADERS = {
    name: tuple(f"x-ratelimit-{what}-{name}" for what in ("limit", "remaining", "reset"))
    for name in ("requests", "images")
}
_WINDOW_RESET = duration(WINDOW)


def utc_day(now: float) -> tuple[str, float]:
    """Today's UTC date and the seconds until tomorrow."""
    name, start, end = _DAY
    if not start <= now < end:  # a new day (or a test's clock): once a day, not per request
        today = datetime.fromtimestamp(now, UTC)
        midnight = datetime(today.year, today.month, today.day, tzinfo=UTC)
        start = midnight.timestamp()
        name, end = today.date().isoformat(), start + 86400.0
        _DAY[:] = name, start, end
    return name, end - now


# Today, as (name, start, end) in epoch seconds: every request asks, the answer changes daily.
_DAY: list[Any] = ["", 0.0, 0.0]
# Each period's last answer, with the epoch seconds it holds for.
_PERIODS: dict[str, tuple[float, float, str, datetime | None]] = {}


def budget_period(period: BudgetPeriod, now: float) -> tuple[str, datetime | None]:
    """The calendar period (UTC) `now` falls in, as an id, and when it ends."""
    known = _PERIODS.get(period)
    if known is not None and known[0] <= now < known[1]:
        return known[2], known[3]
    name, end = _budget_period(period, now)
    day = datetime.fromtimestamp(now, UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    _PERIODS[period] = (day.timestamp(), math.inf if end is None else end.timestamp(), name, end)
    return name, end


def _budget_period(period: BudgetPeriod, now: float) -> tuple[str, datetime | None]:
    moment = datetime.fromtimestamp(now, UTC)
    day = datetime(moment.year, moment.month, moment.day, tzinfo=UTC)
    if period == "day":
        return day.date().isoformat(), day + timedelta(days=1)
    if period == "week":  # ISO weeks: Monday to Sunday
        year, week, weekday = moment.isocalendar()
        return f"{year}-W{week:02d}", day + timedelta(days=8 - weekday)
    if period == "month":
        following = datetime(moment.year + moment.month // 12, moment.month % 12 + 1, 1, tzinfo=UTC)
        return f"{moment.year}-{moment.month:02d}", following
    return "total", None


def period_start(period: BudgetPeriod, now: float) -> int:
    """When the calendar period (UTC) `now` falls in began, in Unix seconds (0: in total)."""
    moment = datetime.fromtimestamp(now, UTC)
    day = datetime(moment.year, moment.month, moment.day, tzinfo=UTC)
    if period == "day":
        start = day
    elif period == "week":
        start = day - timedelta(days=moment.isoweekday() - 1)
    elif period == "month":
        start = day.replace(day=1)
    else:
        return 0
    return int(start.timestamp())


def seconds_until(moment: datetime | None, now: float) -> float:
    return _NEVER if moment is None else max(0.0, moment.timestamp() - now)


def quota_refusal(subject: Subject, what: str, limit: int, until_tomorrow: float) -> Decision:
    return Decision(
        False,
        retry_after=until_tomorrow,
        code="insufficient_quota",
        retry=False,
        message=f"Daily quota of {limit} {what} of the {subject.label} is spent; "
        "it renews at 00:00 UTC.",
        limit=f"{what}_per_day",
    )


def budget_refusal(subject: Subject, committed: int, reservation: int, now: float) -> Decision:
    policy = subject.policy
    assert policy.budget_micros is not None
    _, ends = budget_period(policy.budget_period, now)
    renews = "It does not renew." if ends is None else f"It renews at {rfc3339(ends)}."
    this = "in total" if ends is None else f"this {policy.budget_period}"
    return Decision(
        False,
        retry_after=seconds_until(ends, now),
        code="insufficient_quota",
        retry=False,
        message=f"The budget of the {subject.label} (${usd(policy.budget_micros)} {this}) "
        f"cannot cover this request: ${usd(committed)} is spent or reserved, and it may "
        f"cost up to ${usd(reservation)}. {renews}",
        limit="budget_usd",
        # The budget that refused, not the tighter one: the client needs this one's figures.
        budget=BudgetStatus(policy.budget_micros, policy.budget_micros - committed, ends),
    )


def with_budgets(refusal: Decision, committed: list[tuple[Subject, int]], now: float) -> Decision:
    """A refusal for another limit still reports the tightest budget over the request, as
    it stands (nothing reserved for the refused request): `committed` holds each budgeted
    subject's micro-USD spent or reserved in its current period."""
    if refusal.budget is None:
        for subject, spent in committed:
            limit, period = subject.policy.budget_micros, subject.policy.budget_period
            assert limit is not None
            status = BudgetStatus(limit, limit - spent, budget_period(period, now)[1])
            refusal.budget = _tighter(refusal.budget, status)
    return refusal


def _tighter(known: BudgetStatus | None, status: BudgetStatus) -> BudgetStatus:
    return status if known is None or status.remaining < known.remaining else known


def rate_refusal(
    subject: Subject, name: str, limit: int, retry_after: float, remaining: int = 0
) -> Decision:
    return Decision(
        False,
        [LimitStatus(name, limit, remaining, retry_after)],
        retry_after=retry_after,
        message=f"Rate limit of {limit} {name} per minute of the {subject.label} reached: "
        f"retry in {math.ceil(retry_after * 1000)} ms.",
        limit=f"{name}_per_minute",
    )


def too_many_images(subject: Subject, n: int, limit: int) -> Decision:
    return Decision(
        False,
        retry_after=WINDOW,
        retry=False,
        message=f"n={n} can never fit the limit of {limit} images per minute of the "
        f"{subject.label}.",
        limit="images_per_minute",
    )


def concurrency_refusal(subject: Subject, limit: int) -> Decision:
    return Decision(
        False,
        retry_after=1.0,
        message=f"Too many generations in flight: at most {limit} at a time for the "
        f"{subject.label}.",
        limit="max_concurrent",
    )


@dataclass(slots=True)
class Admitted:
    """What one subject's counts were once a request was admitted: for the headers."""

    subject: Subject
    requests: int  # in the window, this request included
    images: int
    committed: int  # micro-USD spent or reserved in the budget's period, this one included
    budget_reset: datetime | None = None


def admitted(found: list[Admitted], release: Release) -> Decision:
    """The decision for an admitted request: each rate limit reported once (the key's
    before its project's), and the tighter budget."""
    limits: dict[str, LimitStatus] = {}
    budget: BudgetStatus | None = None
    for one in found:
        policy = one.subject.policy
        rpm, ipm = policy.requests_per_minute, policy.images_per_minute
        if rpm is not None and "requests" not in limits:
            limits["requests"] = LimitStatus("requests", rpm, rpm - one.requests, WINDOW)
        if ipm is not None and "images" not in limits:
            limits["images"] = LimitStatus("images", ipm, ipm - one.images, WINDOW)
        limit = policy.budget_micros
        if limit is not None:
            budget = _tighter(budget, BudgetStatus(limit, limit - one.committed, one.budget_reset))
    return Decision(True, list(limits.values()), release=release, budget=budget)


class UsageObserver(Protocol):
    """Told what each generation spent, once it has ended: every generation that counts as
    spent (see `Generation.charged`), even when its client left before the answer."""

    async def record(self, principal: Principal, request: ImageRequest, usage: Usage) -> None: ...
