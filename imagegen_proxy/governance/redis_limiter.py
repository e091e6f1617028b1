"""Limits shared by every proxy process through Redis (`pip install 'imagegen-proxy[redis]'`).

One Lua script checks every limit of the key and of its project and, only when all pass,
counts the request in all of them and reserves its worst-case cost against their budgets:
atomic, so a burst spread over many processes admits exactly N (and spends no more than a
budget), and a request refused on images is not counted against requests. Windows run on
Redis's own clock, so the proxies' clocks need not agree; days and budget periods are the
calendar's, from the proxy's clock, as the counters' names.

A key and its project are counted in one script, so their counters must live on one Redis
node (Redis Cluster is not supported).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

from ..config import BudgetPeriod
from ..wire.errors import ProxyError
from ..wire.request import ImageRequest
from ..wire.usage import Usage
from .auth import Principal
from .ratelimit import (
    WINDOW,
    Admitted,
    Decision,
    RateLimiter,
    Release,
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

if TYPE_CHECKING:
    from redis.asyncio import Redis

logger = logging.getLogger("imagegen_proxy")

# Per subject, 6 KEYS: requests log, images log, leases in flight, today's spending (a
# hash), images sum, the budget period's micro-USD spent or reserved; and 7 ARGV: requests/
# min, images/min, max concurrent, images/day, tokens/day, budget (-1: no limit), budget
# ttl s. Before them, ARGV: n, window ms, lease ms, request id, day ttl s, reservation,
# subjects. The reply says which subject refused (0-based), or each one's counts.
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local n, window, lease = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local id, dayttl = ARGV[4], tonumber(ARGV[5])
local reserve, count = tonumber(ARGV[6]), tonumber(ARGV[7])
local seen = {}
for s = 0, count - 1 do
  local k, a = s * 6, 7 + s * 7
  local rpm, ipm, conc = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  local ipd, tpd, budget = tonumber(ARGV[a + 4]), tonumber(ARGV[a + 5]), tonumber(ARGV[a + 6])
  if tpd >= 0 and tonumber(redis.call('HGET', KEYS[k + 4], 'tokens') or '0') >= tpd then
    return {'quota', s, 'tokens', tpd}
  end
  if ipd >= 0 and tonumber(redis.call('HGET', KEYS[k + 4], 'images') or '0') + n > ipd then
    return {'quota', s, 'images', ipd}
  end
  local committed = 0
  if budget >= 0 then
    committed = tonumber(redis.call('GET', KEYS[k + 6]) or '0')
    if committed + reserve > budget then return {'budget', s, committed} end
  end
  if conc >= 0 then
    redis.call('ZREMRANGEBYSCORE', KEYS[k + 3], '-inf', now)
    if redis.call('ZCARD', KEYS[k + 3]) >= conc then return {'concurrent', s, conc} end
  end
  local requests = 0
  if rpm >= 0 then
    redis.call('ZREMRANGEBYSCORE', KEYS[k + 1], '-inf', now - window)
    requests = redis.call('ZCARD', KEYS[k + 1])
    if requests >= rpm then
      local at = redis.call('ZRANGE', KEYS[k + 1], requests - rpm, requests - rpm, 'WITHSCORES')
      return {'requests', s, rpm, tonumber(at[2]) + window - now, 0}
    end
  end
  local images = 0
  if ipm >= 0 then
    if n > ipm then return {'too_many', s, ipm} end
    -- A running sum: each entry is subtracted once, when it leaves the window.
    local expired = redis.call('ZRANGEBYSCORE', KEYS[k + 2], '-inf', now - window)
    if #expired > 0 then
      local gone = 0
      for i = 1, #expired do gone = gone + tonumber(string.match(expired[i], ':(%d+)$')) end
      redis.call('ZREMRANGEBYSCORE', KEYS[k + 2], '-inf', now - window)
      images = redis.call('DECRBY', KEYS[k + 5], gone)
    else
      images = tonumber(redis.call('GET', KEYS[k + 5]) or '0')
    end
    if images + n > ipm then
      local log = redis.call('ZRANGE', KEYS[k + 2], 0, -1, 'WITHSCORES')
      local freed = 0
      for i = 1, #log, 2 do
        freed = freed + tonumber(string.match(log[i], ':(%d+)$'))
        if freed >= images + n - ipm then
          return {'images', s, ipm, tonumber(log[i + 1]) + window - now, ipm - images}
        end
      end
    end
  end
  seen[#seen + 1] = requests
  seen[#seen + 1] = images
  seen[#seen + 1] = committed
end
for s = 0, count - 1 do
  local k, a = s * 6, 7 + s * 7
  if tonumber(ARGV[a + 1]) >= 0 then
    redis.call('ZADD', KEYS[k + 1], now, id)
    redis.call('PEXPIRE', KEYS[k + 1], window)
  end
  if tonumber(ARGV[a + 2]) >= 0 then
    redis.call('ZADD', KEYS[k + 2], now, id .. ':' .. n)
    redis.call('INCRBY', KEYS[k + 5], n)
    redis.call('PEXPIRE', KEYS[k + 2], window)
    redis.call('PEXPIRE', KEYS[k + 5], window)
  end
  if tonumber(ARGV[a + 3]) >= 0 then
    redis.call('ZADD', KEYS[k + 3], now + lease, id)
    redis.call('PEXPIRE', KEYS[k + 3], lease)
  end
  redis.call('HINCRBY', KEYS[k + 4], 'requests', 1)
  redis.call('HINCRBY', KEYS[k + 4], 'images', n)
  redis.call('EXPIRE', KEYS[k + 4], dayttl)
  if tonumber(ARGV[a + 6]) >= 0 then
    seen[s * 3 + 3] = redis.call('INCRBY', KEYS[k + 6], reserve)
    local ttl = tonumber(ARGV[a + 7])
    if ttl > 0 then redis.call('EXPIRE', KEYS[k + 6], ttl) end
  end
end
return {'ok', unpack(seen)}
"""

# Per subject, 3 KEYS: leases in flight, the admitting day's spending, the admitting budget
# period's (or a key never written, without a budget). ARGV: request id, n, charged (1/0),
# tokens, cost - reservation (charged) or -reservation (not), subjects.
_RELEASE = """
for s = 0, tonumber(ARGV[6]) - 1 do
  local k = s * 3
  redis.call('ZREM', KEYS[k + 1], ARGV[1])
  if ARGV[3] == '0' then
    redis.call('HINCRBY', KEYS[k + 2], 'images', -tonumber(ARGV[2]))
  elseif ARGV[4] ~= '0' then
    redis.call('HINCRBY', KEYS[k + 2], 'tokens', ARGV[4])
  end
  if ARGV[5] ~= '0' and redis.call('EXISTS', KEYS[k + 3]) == 1 then
    redis.call('INCRBY', KEYS[k + 3], ARGV[5])
  end
end
"""

_DAY_TTL = 3 * 86400
# A period's counter outlives the period a little, for the settlements still on their way.
_PERIOD_TTL = {"day": 3 * 86400, "week": 15 * 86400, "month": 65 * 86400, "total": 0}


class RedisLimiter(RateLimiter):
    """The `RateLimiter` whose counts live in Redis. `clock` (epoch seconds) names the day
    and the budget period; it may be injected for tests."""

    def __init__(
        self,
        url: str,
        *,
        on_storage_error: Literal["deny", "allow"] = "deny",
        lease_seconds: float = 3600.0,
        prefix: str = "imagegen_proxy",
        max_connections: int = 64,
        client: Redis | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        try:
            from redis.asyncio import BlockingConnectionPool, Redis
        except ImportError:  # pragma: no cover - depends on the environment
            raise ImportError(
                "Redis limits need the redis package: pip install 'imagegen-proxy[redis]'"
            ) from None
        if client is None:
            # A blocking pool: thousands of concurrent requests queue for one of a few
            # connections (the default pool fails at once when it runs out). Short
            # timeouts: a hung Redis must fail over to on_storage_error quickly.
            pool = BlockingConnectionPool.from_url(
                url,
                max_connections=max_connections,
                timeout=2.0,
                socket_timeout=2.0,
                socket_connect_timeout=2.0,
            )
            client = Redis(connection_pool=pool)
        self._redis = client
        self._acquire = self._redis.register_script(_ACQUIRE)
        self._release = self._redis.register_script(_RELEASE)
        self._on_error = on_storage_error
        self._lease_ms = int(lease_seconds * 1000)
        self._prefix = prefix
        self._clock = clock

    def _keys(self, subject: Subject, day: str, period: str) -> list[str]:
        # One hash tag per subject: all of its keys live in the same cluster slot.
        base = f"{self._prefix}:{{{subject.id}}}"
        return [
            f"{base}:requests",
            f"{base}:images",
            f"{base}:leases",
            f"{base}:day:{day}",
            f"{base}:images-sum",
            f"{base}:budget:{period}",
        ]

    async def acquire(
        self, principal: Principal, request: ImageRequest, reservation: int = 0
    ) -> Decision:
        n, now = request.images, self._clock()
        day, until_tomorrow = utc_day(now)
        found = subjects(principal, request.model)
        keys: list[str] = []
        args: list[Any] = []
        resets = []
        for subject in found:
            policy = subject.policy
            period, reset = budget_period(policy.budget_period, now)
            budgeted = policy.budget_micros is not None
            keys += self._keys(subject, day, period if budgeted else "none")
            resets.append(reset if budgeted else None)
            limits = [
                policy.requests_per_minute,
                policy.images_per_minute,
                policy.max_concurrent,
                policy.images_per_day,
                policy.tokens_per_day,
                policy.budget_micros,
            ]
            args += [-1 if v is None else v for v in limits]
            args.append(_PERIOD_TTL[policy.budget_period])
        request_id = uuid.uuid4().hex
        head: list[Any] = [n, int(WINDOW * 1000), self._lease_ms, request_id, _DAY_TTL]
        head += [reservation, len(found)]
        try:
            reply = await self._acquire(keys, head + args)
        except Exception as exc:  # any storage failure goes through the same policy
            return self._storage_failed(exc)
        verdict = _text(reply[0])
        if verdict == "ok":
            counts = [int(value) for value in reply[1:]]
            each = [
                Admitted(subject, requests + 1, images + n, committed, reset)
                for subject, reset, requests, images, committed in zip(
                    found, resets, counts[0::3], counts[1::3], counts[2::3], strict=True
                )
            ]
            return admitted(each, self._releaser(keys, len(found), request_id, n, reservation))
        refusal = self._refusal(found[int(reply[1])], reply, n, reservation, now, until_tomorrow)
        held = [(i, s) for i, s in enumerate(found) if s.policy.budget_micros is not None]
        if refusal.budget is None and held:
            try:  # off the hot path: only a refusal pays this round trip
                values = await self._redis.mget([keys[6 * i + 5] for i, _ in held])
            except Exception as exc:  # the refusal stands; only its budget headers are lost
                logger.warning("could not read budgets in Redis: %s", type(exc).__name__)
            else:
                spent = [(s, int(v or 0)) for (_, s), v in zip(held, values, strict=True)]
                with_budgets(refusal, spent, now)
        return refusal

    @staticmethod
    def _refusal(
        subject: Subject,
        reply: list[Any],
        n: int,
        reservation: int,
        now: float,
        until_tomorrow: float,
    ) -> Decision:
        verdict = _text(reply[0])
        if verdict == "quota":
            return quota_refusal(subject, _text(reply[2]), int(reply[3]), until_tomorrow)
        if verdict == "budget":
            return budget_refusal(subject, int(reply[2]), reservation, now)
        if verdict == "concurrent":
            return concurrency_refusal(subject, int(reply[2]))
        if verdict == "too_many":
            return too_many_images(subject, n, int(reply[2]))
        limit, retry = int(reply[2]), int(reply[3]) / 1000
        return rate_refusal(subject, verdict, limit, retry, int(reply[4]))

    def _releaser(
        self, keys: list[str], count: int, request_id: str, n: int, reservation: int
    ) -> Release:
        # Per subject: its leases, its day's hash, its budget period's counter.
        touched = [keys[6 * i + j] for i in range(count) for j in (2, 3, 5)]

        async def release(spent: Usage | None) -> None:
            args: list[Any]
            if spent is None:
                args = [request_id, n, 0, 0, -reservation, count]
            else:
                tokens, cost = settled(spent)
                args = [request_id, n, 1, tokens, cost - reservation, count]
            try:
                await self._release(touched, args)
            except Exception as exc:
                # A concurrency lease expires by itself after lease_seconds; the rest stays
                # counted as admitted: never under what was spent.
                logger.warning("could not settle a generation in Redis: %s", type(exc).__name__)

        return release

    def _storage_failed(self, exc: Exception) -> Decision:
        logger.warning("rate-limit storage failed (%s): %s", self._on_error, type(exc).__name__)
        if self._on_error == "allow":
            return Decision(True)
        raise ProxyError(
            503,
            "The rate-limit storage is unavailable; try again shortly.",
            type="server_error",
            code="limits_unavailable",
        )

    async def seed(self, name: str, period: str, micros: int, kind: BudgetPeriod) -> None:
        """Start the key's (or "project:NAME"'s) budget `period` at `micros` spent, unless
        Redis already counts in it (SET NX: what any process counted stands)."""
        ttl = _PERIOD_TTL[kind] or None
        await self._redis.set(f"{self._prefix}:{{{name}}}:budget:{period}", micros, nx=True, ex=ttl)

    async def spent(self, name: str) -> Usage:
        """What the key (or "project:NAME") spent today, across every process."""
        day, _ = utc_day(self._clock())
        values = await self._redis.hgetall(f"{self._prefix}:{{{name}}}:day:{day}")
        count = {_text(k): int(v) for k, v in values.items()}
        return _day_usage(count)

    async def committed(self, name: str, period: str) -> int:
        """Micro-USD the key (or "project:NAME") spent or reserved in `period` (an id of
        `ratelimit.budget_period`), across every process."""
        value = await self._redis.get(f"{self._prefix}:{{{name}}}:budget:{period}")
        return int(value or 0)

    async def standing(self, principal: Principal) -> list[Standing]:
        now = self._clock()
        day, _ = utc_day(now)
        found = []
        for subject in subjects(principal):
            period = budget_period(subject.policy.budget_period, now)[0]
            keys = self._keys(subject, day, period)
            values = await self._redis.hgetall(keys[3])
            count = {_text(k): int(v) for k, v in values.items()}
            today = _day_usage(count)
            found.append(Standing(subject, today, int(await self._redis.get(keys[5]) or 0)))
        return found

    async def in_flight(self, name: str) -> int:
        leases = f"{self._prefix}:{{{name}}}:leases"
        return int(await self._redis.zcount(leases, f"({int(time.time() * 1000)}", "+inf"))

    async def aclose(self) -> None:
        await self._redis.aclose()


def _day_usage(count: dict[str, int]) -> Usage:
    return Usage(
        requests=count.get("requests", 0),
        images=count.get("images", 0),
        tokens=count.get("tokens", 0),
    )


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
