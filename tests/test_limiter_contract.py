"""One contract, two limiters: `MemoryLimiter` and `RedisLimiter` (a real redis-server) must
agree on every rule of budgets, projects and settlement, so the two cannot drift."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from redis_server import redis_server

from imagegen_proxy.config import Policy
from imagegen_proxy.governance.auth import Principal, Project
from imagegen_proxy.governance.memory_limiter import MemoryLimiter
from imagegen_proxy.governance.ratelimit import Decision, RateLimiter, budget_period
from imagegen_proxy.governance.redis_limiter import RedisLimiter
from imagegen_proxy.wire.request import ImageGenerationBody, ImageRequest
from imagegen_proxy.wire.usage import Usage

RESERVE = 300_000  # micro-USD: $0.30 reserved per request
REQUEST = ImageRequest(form="openai", body=ImageGenerationBody(prompt="p", model="gpt-image-1"))


class Clock:
    def __init__(self, moment: datetime) -> None:
        self.now = moment.timestamp()

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with redis_server() as (url, _):
        yield url


Make = Callable[[Clock], RateLimiter]


@pytest.fixture(params=["memory", "redis"])
def make(request: pytest.FixtureRequest) -> Make:
    """A limiter of each kind; the Redis ones count under this test's own prefix."""
    if request.param == "memory":
        return lambda clock: MemoryLimiter(clock)
    url = request.getfixturevalue("redis_url")
    prefix = f"contract:{request.node.name}"
    return lambda clock: RedisLimiter(url, prefix=prefix, clock=clock)


def run(make: Make, test: Callable[[RateLimiter, Clock], Awaitable[None]]) -> None:
    """Run `test` with a fresh limiter on a clock set to 2026-11-30 12:00 UTC."""

    async def main() -> None:
        clock = Clock(datetime(2026, 11, 30, 12, tzinfo=UTC))
        limiter = make(clock)
        try:
            await test(limiter, clock)
        finally:
            await limiter.aclose()

    asyncio.run(main())


def key(name: str = "bot", project: Project | None = None, **policy: Any) -> Principal:
    return Principal(name, Policy(**policy), project=project)


async def admit(limiter: RateLimiter, who: Principal, reserve: int = RESERVE) -> Decision:
    return await limiter.acquire(who, REQUEST, reserve)


def test_a_budget_admits_until_the_next_reservation_would_not_fit(make: Make) -> None:
    async def test(limiter: RateLimiter, clock: Clock) -> None:
        bot = key(budget_usd=1.0, budget_period="day")
        admitted = [await admit(limiter, bot) for _ in range(3)]
        assert all(decision.allowed for decision in admitted)
        refused = await admit(limiter, bot)
        assert not refused.allowed
        assert (refused.code, refused.limit, refused.retry) == (
            "insufficient_quota",
            "budget_usd",
            False,
        )
        assert "key 'bot'" in refused.message and "$1.00" in refused.message
        error = refused.refusal()
        assert error.status == 429 and ("x-should-retry", "false") in error.headers
        assert refused.retry_after == 12 * 3600  # until midnight UTC
        assert (await admit(limiter, bot, 100_000)).allowed  # a cheaper one still fits

    run(make, test)


def test_settling_keeps_the_actual_cost_and_gives_back_the_rest(make: Make) -> None:
    async def test(limiter: RateLimiter, clock: Clock) -> None:
        bot = key(budget_usd=1.0)
        first = await admit(limiter, bot)
        assert first.release is not None
        await first.release(Usage(requests=1, images=1, cost_micros=100_000))
        # 0.10 spent: 0.90 left, three more reservations of 0.30 fit, not four.
        decisions = [await admit(limiter, bot) for _ in range(4)]
        assert [d.allowed for d in decisions] == [True, True, True, False]

    run(make, test)


def test_a_generation_that_was_not_charged_gives_everything_back(make: Make) -> None:
    async def test(limiter: RateLimiter, clock: Clock) -> None:
        bot = key(budget_usd=0.3, images_per_day=1)
        first = await admit(limiter, bot)
        assert first.release is not None and not (await admit(limiter, bot)).allowed
        await first.release(None)
        assert (await admit(limiter, bot)).allowed

    run(make, test)


def test_concurrent_requests_never_spend_past_a_budget(make: Make) -> None:
    async def test(limiter: RateLimiter, clock: Clock) -> None:
        bot = key(budget_usd=7 * RESERVE / 1_000_000 + 0.1)  # fits 7 reservations
        decisions = await asyncio.gather(*(admit(limiter, bot) for _ in range(50)))
        assert sum(decision.allowed for decision in decisions) == 7

    run(make, test)


def test_a_request_must_fit_the_budget_of_its_key_and_of_its_project(make: Make) -> None:
    async def test(limiter: RateLimiter, clock: Clock) -> None:
        growth = Project("growth", Policy(budget_usd=0.6))
        rich = key("rich", growth, budget_usd=100.0)
        poor = key("poor", growth, budget_usd=0.3)
        assert (await admit(limiter, poor)).allowed
        refused = await admit(limiter, poor)
        assert not refused.allowed and "key 'poor'" in refused.message
        assert (await admit(limiter, rich)).allowed
        refused = await admit(limiter, rich)  # the project's 0.60 is reserved now
        assert not refused.allowed and "project 'growth'" in refused.message

    run(make, test)


def test_the_keys_of_a_project_share_its_rate_limits(make: Make) -> None:
    async def test(limiter: RateLimiter, clock: Clock) -> None:
        growth = Project("growth", Policy(requests_per_minute=2))
        a, b = key("a", growth), key("b", growth)
        assert (await admit(limiter, a, 0)).allowed and (await admit(limiter, b, 0)).allowed
        refused = await admit(limiter, a, 0)
        assert not refused.allowed and refused.limit == "requests_per_minute"
        assert "project 'growth'" in refused.message

    run(make, test)


def test_a_refusal_by_the_project_counts_nothing_against_the_key(make: Make) -> None:
    async def test(limiter: RateLimiter, clock: Clock) -> None:
        growth = Project("growth", Policy(budget_usd=0.3))
        bot = key("bot", growth, requests_per_minute=2)
        assert (await admit(limiter, bot)).allowed
        assert not (await admit(limiter, bot)).allowed  # the project's budget
        assert (await admit(limiter, bot, 0)).allowed  # the key's 2nd request, not its 3rd

    run(make, test)


def test_a_budget_period_rolls_over_on_the_calendar(make: Make) -> None:
    async def test(limiter: RateLimiter, clock: Clock) -> None:
        bot = key(budget_usd=0.3, budget_period="month")
        assert (await admit(limiter, bot)).allowed
        refused = await admit(limiter, bot)
        assert not refused.allowed and "2026-12-01T00:00:00Z" in refused.message
        clock.now = datetime(2026, 12, 1, 0, 0, 1, tzinfo=UTC).timestamp()
        assert (await admit(limiter, bot)).allowed

    run(make, test)


def test_a_total_budget_never_renews(make: Make) -> None:
    async def test(limiter: RateLimiter, clock: Clock) -> None:
        bot = key(budget_usd=0.3, budget_period="total")
        assert (await admit(limiter, bot)).allowed
        clock.now += 400 * 86400
        refused = await admit(limiter, bot)
        assert not refused.allowed and "does not renew" in refused.message

    run(make, test)


def test_the_budget_headers_report_the_tighter_of_key_and_project(make: Make) -> None:
    async def test(limiter: RateLimiter, clock: Clock) -> None:
        growth = Project("growth", Policy(budget_usd=500.0, budget_period="month"))
        bot = key("bot", growth, budget_usd=1.0, budget_period="day")
        headers = dict((await admit(limiter, bot)).headers())
        assert headers["x-budget-limit-usd"] == "1.00"
        assert headers["x-budget-remaining-usd"] == "0.70"
        assert headers["x-budget-reset"] == "2026-12-01T00:00:00Z"

    run(make, test)


def test_a_budget_refusal_reports_the_budget_that_refused(make: Make) -> None:
    async def test(limiter: RateLimiter, clock: Clock) -> None:
        bot = key(budget_usd=1.0, budget_period="day")
        for _ in range(3):
            assert (await admit(limiter, bot)).allowed
        headers = dict((await admit(limiter, bot)).refusal().headers)
        assert headers["x-budget-limit-usd"] == "1.00"
        assert headers["x-budget-remaining-usd"] == "0.10"  # 0.90 reserved; 0.30 would not fit
        assert headers["x-budget-reset"] == "2026-12-01T00:00:00Z"

    run(make, test)


def test_a_project_budget_refusal_reports_the_projects_budget(make: Make) -> None:
    async def test(limiter: RateLimiter, clock: Clock) -> None:
        growth = Project("growth", Policy(budget_usd=0.6, budget_period="month"))
        bot = key("bot", growth, budget_usd=100.0, budget_period="day")
        for _ in range(2):
            assert (await admit(limiter, bot)).allowed
        refused = await admit(limiter, bot)
        assert not refused.allowed and "project 'growth'" in refused.message
        headers = dict(refused.refusal().headers)
        assert headers["x-budget-limit-usd"] == "0.60"
        assert headers["x-budget-remaining-usd"] == "0.00"
        assert headers["x-budget-reset"] == "2026-12-01T00:00:00Z"

    run(make, test)


def test_an_organization_spend_limit_refusal_reports_its_budget(make: Make) -> None:
    async def test(limiter: RateLimiter, clock: Clock) -> None:
        organization = Policy(budget_usd=0.3, budget_period="month")
        bot = Principal("bot", Policy(), organization=organization)
        assert (await admit(limiter, bot)).allowed
        refused = await admit(limiter, bot)
        assert not refused.allowed and refused.limit == "budget_usd"
        headers = dict(refused.refusal().headers)
        assert headers["x-budget-limit-usd"] == "0.30"
        assert headers["x-budget-remaining-usd"] == "0.00"
        assert headers["x-budget-reset"] == "2026-12-01T00:00:00Z"

    run(make, test)


def test_a_rate_limit_refusal_still_reports_the_tightest_budget(make: Make) -> None:
    async def test(limiter: RateLimiter, clock: Clock) -> None:
        growth = Project("growth", Policy(budget_usd=0.5, budget_period="month"))
        bot = key("bot", growth, budget_usd=2.0, requests_per_minute=1)
        assert (await admit(limiter, bot)).allowed
        refused = await admit(limiter, bot)
        assert not refused.allowed and refused.limit == "requests_per_minute"
        headers = dict(refused.refusal().headers)
        assert headers["x-ratelimit-remaining-requests"] == "0"
        assert headers["x-budget-limit-usd"] == "0.50"  # the project's: 0.20 left of it
        assert headers["x-budget-remaining-usd"] == "0.20"
        assert headers["x-budget-reset"] == "2026-12-01T00:00:00Z"

    run(make, test)


def test_negative_usage_never_credits_a_budget_or_a_quota(make: Make) -> None:
    async def test(limiter: RateLimiter, clock: Clock) -> None:
        bot = key(budget_usd=0.6, tokens_per_day=100)
        first = await admit(limiter, bot)
        assert first.release is not None
        credit = Usage(requests=1, images=1, tokens=-5_000_000, cost_micros=-200_000_000)
        await first.release(credit)
        # Charged nothing, not credited $200: one reservation of 0.30 fits beside it... twice.
        decisions = [await admit(limiter, bot) for _ in range(3)]
        assert [d.allowed for d in decisions] == [True, True, False]
        [mine] = [one.json(clock.now) for one in await limiter.standing(bot)]
        assert mine["today"]["tokens"] == 0

    run(make, test)


def test_usage_above_the_reservation_is_charged_in_full(make: Make) -> None:
    async def test(limiter: RateLimiter, clock: Clock) -> None:
        bot = key(budget_usd=10.0)
        first = await admit(limiter, bot)
        assert first.release is not None
        # Reserved $0.30, billed $9.80: the budget holds what was billed, not the reservation.
        await first.release(Usage(requests=1, images=1, cost_micros=9_800_000))
        refused = await admit(limiter, bot)
        assert not refused.allowed and refused.limit == "budget_usd"
        headers = dict(refused.refusal().headers)
        assert headers["x-budget-remaining-usd"] == "0.20"

    run(make, test)


def test_tokens_settled_count_against_the_daily_token_quota(make: Make) -> None:
    async def test(limiter: RateLimiter, clock: Clock) -> None:
        bot = key(tokens_per_day=100)
        first = await admit(limiter, bot, 0)
        assert first.release is not None
        await first.release(Usage(requests=1, images=1, tokens=100))
        refused = await admit(limiter, bot, 0)
        assert not refused.allowed and refused.limit == "tokens_per_day"

    run(make, test)


def test_standing_reports_what_was_spent_this_period(make: Make) -> None:
    async def test(limiter: RateLimiter, clock: Clock) -> None:
        growth = Project("growth", Policy(budget_usd=5.0))
        bot = key("bot", growth, budget_usd=1.0, budget_period="day")
        decision = await admit(limiter, bot)
        assert decision.release is not None
        await decision.release(Usage(requests=1, images=1, tokens=7, cost_micros=250_000))
        mine, project = [one.json(clock.now) for one in await limiter.standing(bot)]
        assert mine["today"] == {"requests": 1, "images": 1, "tokens": 7}
        assert mine["budget"]["spent_usd"] == 0.25 and mine["budget"]["remaining_usd"] == 0.75
        assert project["name"] == "growth" and project["budget"]["period"] == "month"
        assert project["budget"]["resets_at"] == "2026-12-01T00:00:00Z"

    run(make, test)


def test_budget_periods_follow_the_utc_calendar() -> None:
    monday = datetime(2026, 11, 30, 12, tzinfo=UTC).timestamp()  # a Monday
    assert budget_period("day", monday) == ("2026-11-30", datetime(2026, 12, 1, tzinfo=UTC))
    assert budget_period("week", monday) == ("2026-W49", datetime(2026, 12, 7, tzinfo=UTC))
    assert budget_period("month", monday) == ("2026-11", datetime(2026, 12, 1, tzinfo=UTC))
    december = datetime(2026, 12, 31, 23, tzinfo=UTC).timestamp()
    assert budget_period("month", december) == ("2026-12", datetime(2027, 1, 1, tzinfo=UTC))
    assert budget_period("total", december) == ("total", None)


def test_a_projects_limits_for_one_model_apply_to_that_model_alone(make: Make) -> None:
    async def test(limiter: RateLimiter, clock: Clock) -> None:
        per_model = {"gpt-image-1": Policy(requests_per_minute=1)}
        bot = key("bot", Project("growth", Policy(), per_model))
        other = ImageRequest(form="openai", body=ImageGenerationBody(prompt="p", model="dall-e-3"))
        assert (await admit(limiter, bot, 0)).allowed
        refused = await admit(limiter, bot, 0)
        assert not refused.allowed and "project 'growth' for gpt-image-1" in refused.message
        assert (await limiter.acquire(bot, other, 0)).allowed

    run(make, test)


def test_a_seeded_budget_period_starts_where_the_ledger_left_it(make: Make) -> None:
    async def test(limiter: RateLimiter, clock: Clock) -> None:
        bot = key(budget_usd=1.0, budget_period="day")
        period = budget_period("day", clock())[0]
        await limiter.seed("bot", period, 500_000, "day")  # type: ignore[attr-defined]
        assert (await admit(limiter, bot)).allowed  # 0.80 of 1.00
        assert not (await admit(limiter, bot)).allowed  # 1.10 would not fit
        # A second seed (another process, a second read) never overrides what is counted.
        await limiter.seed("bot", period, 0, "day")  # type: ignore[attr-defined]
        assert not (await admit(limiter, bot)).allowed
        # The next period starts anew.
        clock.now += 86_400
        assert (await admit(limiter, bot)).allowed

    run(make, test)
