"""Limits shared by every proxy process through Redis (`pip install 'imagegen-proxy[redis]'`).

One Lua script checks every limit and, only when all pass, counts the request in all of
them: atomic, so a burst spread over many processes admits exactly N, and a request
refused on images is not counted against requests. Time is Redis's own clock, so the
proxies' clocks need not agree.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import TYPE_CHECKING, Any, Literal

from .auth import Principal
from .errors import ProxyError
from .ratelimit import (
    WINDOW,
    Decision,
    LimitStatus,
    concurrency_refusal,
    quota_refusal,
    rate_refusal,
    statuses,
    too_many_images,
    utc_day,
)
from .request import ImageRequest
from .usage import Usage

if TYPE_CHECKING:
    from redis.asyncio import Redis

logger = logging.getLogger("imagegen_proxy")

# KEYS: requests log, images log, leases in flight, today's spending (a hash), images sum.
# ARGV: n, window ms, requests/min, images/min, max concurrent, images/day, tokens/day
#       (-1: no limit), lease ms, request id, day ttl s.
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local n, window = tonumber(ARGV[1]), tonumber(ARGV[2])
local rpm, ipm, conc = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local ipd, tpd = tonumber(ARGV[6]), tonumber(ARGV[7])
local id = ARGV[9]
if tpd >= 0 and tonumber(redis.call('HGET', KEYS[4], 'tokens') or '0') >= tpd then
  return {'quota', 'tokens', tpd}
end
if ipd >= 0 and tonumber(redis.call('HGET', KEYS[4], 'images') or '0') + n > ipd then
  return {'quota', 'images', ipd}
end
if conc >= 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
  if redis.call('ZCARD', KEYS[3]) >= conc then return {'concurrent', conc} end
end
local requests = 0
if rpm >= 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
  requests = redis.call('ZCARD', KEYS[1])
  if requests >= rpm then
    local at = redis.call('ZRANGE', KEYS[1], requests - rpm, requests - rpm, 'WITHSCORES')
    return {'requests', rpm, tonumber(at[2]) + window - now, 0}
  end
end
local images = 0
if ipm >= 0 then
  if n > ipm then return {'too_many', ipm} end
  -- A running sum (KEYS[5]): each entry is subtracted once, when it leaves the window.
  local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now - window)
  if #expired > 0 then
    local gone = 0
    for i = 1, #expired do gone = gone + tonumber(string.match(expired[i], ':(%d+)$')) end
    redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - window)
    images = redis.call('DECRBY', KEYS[5], gone)
  else
    images = tonumber(redis.call('GET', KEYS[5]) or '0')
  end
  if images + n > ipm then
    local log = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
    local freed = 0
    for i = 1, #log, 2 do
      freed = freed + tonumber(string.match(log[i], ':(%d+)$'))
      if freed >= images + n - ipm then
        return {'images', ipm, tonumber(log[i + 1]) + window - now, ipm - images}
      end
    end
  end
end
if rpm >= 0 then
  redis.call('ZADD', KEYS[1], now, id)
  redis.call('PEXPIRE', KEYS[1], window)
end
if ipm >= 0 then
  redis.call('ZADD', KEYS[2], now, id .. ':' .. n)
  redis.call('INCRBY', KEYS[5], n)
  redis.call('PEXPIRE', KEYS[2], window)
  redis.call('PEXPIRE', KEYS[5], window)
end
if conc >= 0 then
  redis.call('ZADD', KEYS[3], now + tonumber(ARGV[8]), id)
  redis.call('PEXPIRE', KEYS[3], ARGV[8])
end
redis.call('HINCRBY', KEYS[4], 'requests', 1)
redis.call('HINCRBY', KEYS[4], 'images', n)
redis.call('EXPIRE', KEYS[4], ARGV[10])
return {'ok', requests, images}
"""

# KEYS: leases in flight, the admitting day's spending. ARGV: request id, n, charged (1/0).
_RELEASE = """
redis.call('ZREM', KEYS[1], ARGV[1])
if ARGV[3] == '0' then redis.call('HINCRBY', KEYS[2], 'images', -tonumber(ARGV[2])) end
"""

_DAY_TTL = 3 * 86400


class RedisLimiter:
    """The `RateLimiter` (and `UsageObserver`) whose counts live in Redis."""

    def __init__(
        self,
        url: str,
        *,
        on_storage_error: Literal["deny", "allow"] = "deny",
        lease_seconds: float = 3600.0,
        prefix: str = "imagegen_proxy",
        max_connections: int = 64,
        client: Redis | None = None,
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

    def _keys(self, name: str, day: str) -> list[str]:
        # One hash tag per principal: all of its keys live in the same cluster slot.
        base = f"{self._prefix}:{{{name}}}"
        return [
            f"{base}:requests",
            f"{base}:images",
            f"{base}:leases",
            f"{base}:day:{day}",
            f"{base}:images-sum",
        ]

    async def acquire(self, principal: Principal, request: ImageRequest) -> Decision:
        policy, n = principal.policy, request.images
        day, until_tomorrow = utc_day(time.time())
        keys = self._keys(principal.name, day)
        request_id = uuid.uuid4().hex
        limits = [
            policy.requests_per_minute,
            policy.images_per_minute,
            policy.max_concurrent,
            policy.images_per_day,
            policy.tokens_per_day,
        ]
        args = [n, int(WINDOW * 1000), *(-1 if v is None else v for v in limits)]
        try:
            reply = await self._acquire(keys, [*args, self._lease_ms, request_id, _DAY_TTL])
        except Exception as exc:  # any storage failure goes through the same policy
            return self._storage_failed(exc)
        verdict = _text(reply[0])
        if verdict == "ok":
            return Decision(
                True,
                statuses(
                    policy.requests_per_minute,
                    int(reply[1]) + 1,
                    policy.images_per_minute,
                    int(reply[2]) + n,
                ),
                release=self._releaser(keys, request_id, n, policy.max_concurrent is not None),
            )
        limit = int(reply[1] if verdict != "quota" else reply[2])
        if verdict == "quota":
            return quota_refusal(_text(reply[1]), limit, until_tomorrow)
        if verdict == "concurrent":
            return concurrency_refusal(limit)
        if verdict == "too_many":
            return too_many_images(n, limit)
        retry = int(reply[2]) / 1000
        return rate_refusal(
            verdict, limit, retry, [LimitStatus(verdict, limit, int(reply[3]), retry)]
        )

    def _releaser(self, keys: list[str], request_id: str, n: int, leased: bool) -> Any:
        async def release(charged: bool) -> None:
            if charged and not leased:
                return  # no slot to give back, nothing to refund: spare the round trip
            try:
                await self._release([keys[2], keys[3]], [request_id, n, int(charged)])
            except Exception as exc:
                # The lease expires by itself after lease_seconds.
                logger.warning("could not release a concurrency slot in Redis: %s", exc)

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

    async def record(self, principal: Principal, request: ImageRequest, usage: Usage) -> None:
        day, _ = utc_day(time.time())
        key = self._keys(principal.name, day)[3]
        try:
            await self._redis.hincrby(key, "tokens", usage.tokens)
            await self._redis.expire(key, _DAY_TTL)
        except Exception as exc:
            logger.warning("could not record usage in Redis: %s", type(exc).__name__)

    async def spent(self, name: str) -> Usage:
        """What `name` spent today, across every process."""
        day, _ = utc_day(time.time())
        values = await self._redis.hgetall(self._keys(name, day)[3])
        count = {_text(k): int(v) for k, v in values.items()}
        return Usage(count.get("requests", 0), count.get("images", 0), count.get("tokens", 0))

    async def in_flight(self, name: str) -> int:
        leases = self._keys(name, "")[2]
        return int(await self._redis.zcount(leases, f"({int(time.time() * 1000)}", "+inf"))

    async def aclose(self) -> None:
        await self._redis.aclose()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
