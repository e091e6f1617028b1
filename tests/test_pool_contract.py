"""One contract, two ways to keep cooldowns: a pool on its own, and two pools (two
processes, as far as they know) sharing theirs through a real redis-server. What one of
them learns of an upstream, the other acts on, by the same rule."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass

import pytest
from redis_server import redis_server

from imagegen_proxy.config import PoolConfig, ProxyConfig
from imagegen_proxy.upstream.pool import Pool
from imagegen_proxy.upstream.redis_pool import RedisMirror
from imagegen_proxy.upstream.targets import Target, Upstreams
from imagegen_proxy.wire.errors import ProxyError
from imagegen_proxy.wire.request import ImageGenerationBody, ImageRequest

REQUEST = ImageRequest(form="openai", body=ImageGenerationBody(prompt="p", model="gpt-image-1"))
CONFIG = PoolConfig(failures_to_open=3, cooldown_min=1, cooldown_max=8)


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0  # epoch seconds, as shared cooldowns keep them

    def __call__(self) -> float:
        return self.now


@dataclass
class Pair:
    """Two processes' pools: `a` learns, `b` must act on it once `sync()` returns."""

    a: Pool
    b: Pool
    clock: Clock
    sync: Callable[[], Awaitable[None]]

    def target(self, name: str) -> Target:
        return next(target for target in self.a.targets if target.name == name)

    def ready(self, pool: Pool, api_key: str | None = None) -> list[str]:
        try:
            return sorted(target.name for target in pool.candidates(REQUEST, api_key))
        except ProxyError as error:
            assert error.status == 503
            return []

    async def fail(self, pool: Pool, name: str, status: int | None = 500, **ended: float) -> None:
        target = self.target(name)
        pool.started(target, None)
        pool.ended(target, None, status, ended.get("retry_after"))
        await self.sync()


def targets() -> list[Target]:
    members = [
        {"name": name, "kind": "openai", "base_url": "http://127.0.0.1:9/v1", "api_key": "k"}
        for name in ("x", "y")
    ]
    return Upstreams(ProxyConfig.model_validate({"upstreams": members})).targets


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with redis_server() as (url, _):
        yield url


Make = Callable[[PoolConfig], contextlib.AbstractAsyncContextManager[Pair]]


@pytest.fixture(params=["memory", "redis"])
def make(request: pytest.FixtureRequest) -> Make:
    """A pair of each kind; the Redis ones share under this test's own prefix."""

    @contextlib.asynccontextmanager
    async def alone(config: PoolConfig) -> AsyncIterator[Pair]:
        clock = Clock()
        pool = Pool(targets(), config, clock=clock)

        async def sync() -> None:
            pass

        yield Pair(pool, pool, clock, sync)

    if request.param == "memory":
        return alone
    url = request.getfixturevalue("redis_url")
    prefix = f"contract:{request.node.name}"

    @contextlib.asynccontextmanager
    async def shared(config: PoolConfig) -> AsyncIterator[Pair]:
        clock = Clock()
        pools = [Pool(targets(), config, clock=clock) for _ in range(2)]
        mirrors = [RedisMirror(pool, url, prefix=prefix) for pool in pools]
        for mirror in mirrors:
            await mirror.listening()

        async def sync() -> None:
            """Until both have heard every change either published: an event, polled."""
            for mirror in mirrors:
                await mirror.settled()
            shared = sum(mirror.shared for mirror in mirrors)
            async with asyncio.timeout(30):  # generous: a local Redis answers in ms
                for mirror in mirrors:
                    await mirror.hear(shared)

        try:
            yield Pair(pools[0], pools[1], clock, sync)
        finally:
            for mirror in mirrors:
                await mirror.aclose()

    return shared


def run(make: Make, test: Callable[[Pair], Awaitable[None]], config: PoolConfig = CONFIG) -> None:
    async def main() -> None:
        async with make(config) as pair:
            await test(pair)

    asyncio.run(main())


def test_a_429_sits_out_its_retry_after_for_everyone(make: Make) -> None:
    async def test(pair: Pair) -> None:
        await pair.fail(pair.a, "x", 429, retry_after=2.0)
        assert pair.ready(pair.b) == ["y"]
        assert pair.b.state(pair.target("x"))[0] == "cooling"
        pair.clock.now += 2
        assert pair.ready(pair.b) == ["x", "y"]

    run(make, test)


def test_failures_add_up_across_processes_and_open_with_backoff(make: Make) -> None:
    async def test(pair: Pair) -> None:
        await pair.fail(pair.a, "x", None)
        await pair.fail(pair.b, "x", 502)
        assert pair.ready(pair.a) == ["x", "y"]  # two in a row: not yet
        await pair.fail(pair.a, "x", 503)
        assert pair.ready(pair.b) == ["y"]
        assert pair.b.state(pair.target("x")) == ("open", 1.0)
        pair.clock.now += 1
        # The cooldown is over: one trial, and everyone else waits for it.
        assert pair.ready(pair.b) == ["x", "y"]
        assert pair.b.started(pair.target("x"), None) is True
        await pair.sync()
        assert pair.ready(pair.a) == ["y"]
        assert pair.a.state(pair.target("x"))[0] == "trial"
        pair.b.ended(pair.target("x"), None, 500, None)  # the trial failed: out twice as long
        await pair.sync()
        assert pair.a.state(pair.target("x")) == ("open", 2.0)
        pair.clock.now += 2
        assert pair.a.started(pair.target("x"), None) is True
        pair.a.ended(pair.target("x"), None, 200, None)
        await pair.sync()
        assert pair.b.state(pair.target("x")) == ("up", None)
        await pair.fail(pair.b, "x", 500)  # counting starts again from nothing
        assert pair.ready(pair.a) == ["x", "y"]

    run(make, test)


def test_the_backoff_stops_at_cooldown_max(make: Make) -> None:
    async def test(pair: Pair) -> None:
        waits = []
        for _ in range(7):
            while pair.a.state(pair.target("x"))[0] == "up":
                await pair.fail(pair.a, "x", None)
            _, seconds = pair.b.state(pair.target("x"))
            assert seconds is not None
            waits.append(seconds)
            pair.clock.now += seconds
        assert waits == [1, 2, 4, 8, 8, 8, 8]

    run(make, test)


def test_a_success_resets_the_count(make: Make) -> None:
    async def test(pair: Pair) -> None:
        for _ in range(2):
            await pair.fail(pair.a, "x", 500)
        await pair.fail(pair.b, "x", 200)
        for _ in range(2):
            await pair.fail(pair.a, "x", 500)
        assert pair.ready(pair.b) == ["x", "y"]

    run(make, test)


def test_an_abandoned_trial_is_given_back(make: Make) -> None:
    async def test(pair: Pair) -> None:
        await pair.fail(pair.a, "x", 429, retry_after=1.0)
        pair.clock.now += 1
        x = pair.target("x")
        trial = pair.a.started(x, None)
        await pair.sync()
        assert trial and pair.ready(pair.b) == ["y"]
        pair.a.left(x, None, trial)  # the client left before the answer
        await pair.sync()
        assert pair.ready(pair.b) == ["x", "y"]
        assert pair.a.in_flight["x"] == 0

    run(make, test)


def test_a_trial_whose_process_died_lapses_after_cooldown_max(make: Make) -> None:
    async def test(pair: Pair) -> None:
        await pair.fail(pair.a, "x", 429, retry_after=1.0)
        pair.clock.now += 1
        assert pair.a.started(pair.target("x"), None) is True  # and never ends
        await pair.sync()
        pair.clock.now += CONFIG.cooldown_max - 0.5
        assert pair.ready(pair.b) == ["y"]
        pair.clock.now += 0.5
        assert pair.ready(pair.b) == ["x", "y"]

    run(make, test)


def test_a_cooldown_belongs_to_the_credential_it_was_earned_with(make: Make) -> None:
    async def test(pair: Pair) -> None:
        x = pair.target("x")
        pair.a.started(x, "sk-own-key")
        pair.a.ended(x, "sk-own-key", 429, 30.0)
        await pair.sync()
        assert pair.ready(pair.b, "sk-own-key") == ["y"]
        assert pair.ready(pair.b) == ["x", "y"]  # everyone else keeps it
        assert pair.b.state(x) == ("up", None)

    run(make, test)


def test_all_out_is_503_with_the_soonest_return(make: Make) -> None:
    async def test(pair: Pair) -> None:
        await pair.fail(pair.a, "x", 429, retry_after=7.0)
        await pair.fail(pair.a, "y", 429, retry_after=3.0)
        with pytest.raises(ProxyError) as refused:
            pair.b.candidates(REQUEST, None)
        assert refused.value.status == 503
        assert refused.value.code == "upstreams_unavailable"
        assert dict(refused.value.headers)["retry-after"] == "3"

    run(make, test)


def test_states_back_to_blank_take_no_memory(make: Make) -> None:
    async def test(pair: Pair) -> None:
        await pair.fail(pair.a, "x", 500)
        await pair.fail(pair.a, "x", 200)
        for pool in (pair.a, pair.b):
            pool.started(pair.target("y"), "sk-own")
            pool.ended(pair.target("y"), "sk-own", 200, None)
        await pair.sync()
        assert pair.a._states == {} and pair.b._states == {}

    run(make, test)


# Only with Redis: what a process that starts late, or loses Redis, does.


def test_a_process_that_starts_later_loads_the_shared_cooldowns(redis_url: str) -> None:
    async def main() -> None:
        clock = Clock()
        first = Pool(targets(), CONFIG, clock=clock)
        mirror = RedisMirror(first, redis_url, prefix="late")
        await mirror.listening()
        first.started(first.targets[0], None)
        first.ended(first.targets[0], None, 429, 30.0)
        await mirror.settled()
        late = Pool(targets(), CONFIG, clock=clock)
        other = RedisMirror(late, redis_url, prefix="late")
        await other.listening()
        assert late.state(late.targets[0]) == ("cooling", 30.0)
        for each in (mirror, other):
            await each.aclose()

    asyncio.run(main())


def test_without_redis_each_process_keeps_its_own_and_shares_again_after(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> None:
        clock = Clock()
        with redis_server() as (url, process):
            port = int(url.rsplit(":", 1)[1].split("/")[0])
            pools = [Pool(targets(), CONFIG, clock=clock) for _ in range(2)]
            mirrors = [RedisMirror(pool, url, prefix="outage") for pool in pools]
            for mirror in mirrors:
                await mirror.listening()
            process.terminate()
            process.wait(10)
            async with asyncio.timeout(30):  # generous: each notices the closed socket at once
                for mirror in mirrors:
                    await mirror.lost()  # before Redis returns: else a change could slip by
            a, b = pools
            x = a.targets[0]
            a.started(x, None)
            a.ended(x, None, 429, 30.0)  # no exception: this process still knows
            await mirrors[0].settled()
            assert a.state(x)[0] == "cooling" and b.state(x)[0] == "up"
            assert "cooldowns stay per process until it answers" in caplog.text
        with redis_server(port):
            async with asyncio.timeout(30):  # generous: the first retry is after 0.5 s
                for mirror in mirrors:
                    await mirror.listening()  # resubscribed and reloaded, with backoff
            heard = mirrors[0].heard
            a.started(x, None)
            a.ended(x, None, 200, None)
            await mirrors[0].settled()
            b.started(x, None)
            b.ended(x, None, 429, 20.0)
            await mirrors[1].settled()
            async with asyncio.timeout(5):  # generous: a local Redis answers in ms
                await mirrors[0].hear(heard + 2)
            assert a.state(x) == ("cooling", 20.0)
            assert "Redis answers again" in caplog.text
        for mirror in mirrors:
            await mirror.aclose()

    with caplog.at_level(logging.WARNING, logger="imagegen_proxy"):
        asyncio.run(main())
