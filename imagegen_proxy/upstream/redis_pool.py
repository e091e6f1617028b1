"""Cooldowns shared by every proxy process through Redis (`pip install 'imagegen-proxy[redis]'`).

Each process keeps its pool's states in memory and reads only those on a request: a
request never waits for Redis. Every change a process makes (`pool.Event`) is sent here
in the background, applied to the shared state with `pool.advance` (one rule, in an
optimistic transaction, so failures counted by several processes add up), and the
result is published; every process, this one included, adopts what is published. A
process that starts, or comes back after losing Redis, loads every shared state first.

While Redis is away each process goes on with its own states, and the next change
after Redis returns is shared again. Times in Redis are epoch seconds: the processes'
clocks must roughly agree (NTP), as they must for budgets.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import TYPE_CHECKING, Any

from ..redis_support import Outage, redis_client
from .pool import Event, Pool, State, advance

if TYPE_CHECKING:
    from redis.asyncio import Redis

logger = logging.getLogger("imagegen_proxy")

_MAX_PENDING = 1000  # changes on their way to Redis; beyond, new ones are shared no more
_KEEP = 3600.0  # seconds a state outlives its cooldown: "failures in a row" go stale
_FIELDS = ("failures", "until", "backoff", "trial")


class RedisMirror:
    """A `pool.Mirror` through Redis: `start()` (on the serving loop) loads the shared
    states into `pool` and follows the changes until `aclose()`."""

    def __init__(
        self,
        pool: Pool,
        url: str,
        *,
        prefix: str = "imagegen_proxy",
        client: Redis | None = None,
    ) -> None:
        self.pool = pool
        self._client = client or redis_client(url, "Shared cooldowns", health_check_interval=30)
        # The subscription's own client, which never reconnects by itself: redis-py would
        # resubscribe silently, and what was published meanwhile would be missed. A lost
        # connection must reach `_listen`, which reloads every shared state on its return.
        self._follower = client or redis_client(
            url, "Shared cooldowns", health_check_interval=30, retry=_no_retry()
        )
        self._owns_client = client is None
        self._prefix = f"{prefix}:pool:"
        self._channel = f"{prefix}:pool"
        self._pending: set[asyncio.Task[None]] = set()
        self._listener: asyncio.Task[None] | None = None
        self._listening = asyncio.Event()  # set while subscribed and loaded
        self._lost = asyncio.Event()  # set from a lost subscription until it is back
        self._outage = Outage("shared cooldowns", "cooldowns stay per process")
        self.shared = 0  # changes this process published
        self.heard = 0  # changes published by any process (this one too) and adopted
        self._news = asyncio.Event()  # set (and replaced) on each change heard
        pool.mirror = self

    def start(self) -> None:
        """Follow the shared states from now on (idempotent; needs a running loop)."""
        if self._listener is None:
            self._listener = asyncio.get_running_loop().create_task(self._listen())

    async def listening(self) -> None:
        """Wait until the shared states are loaded and followed."""
        self.start()
        await self._listening.wait()

    async def lost(self) -> None:
        """Wait until the subscription is known to be lost (Redis went away)."""
        self.start()
        await self._lost.wait()

    def send(self, name: str, owner: str, event: Event) -> None:
        self.start()
        if len(self._pending) >= _MAX_PENDING:
            logger.warning("too many cooldown changes wait for Redis: this one stays local")
            return
        task = asyncio.get_running_loop().create_task(self._share(name, owner, event))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def settled(self) -> None:
        """Wait until every change sent so far is in Redis (or failed to get there)."""
        while self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)

    async def hear(self, count: int) -> None:
        """Wait until `count` changes have been heard in all."""
        while self.heard < count:
            await self._news.wait()

    async def aclose(self) -> None:
        await self.settled()
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
            self._listener = None
        if self._owns_client:
            await self._client.aclose()
            await self._follower.aclose()

    def _key(self, name: str, owner: str) -> str:
        return f"{self._prefix}{owner}:{name}"

    async def _share(self, name: str, owner: str, event: Event) -> None:
        """Apply `event` to the shared state, atomically, and publish the result."""
        from redis.exceptions import WatchError

        key = self._key(name, owner)
        try:
            async with self._client.pipeline(transaction=True) as pipe:
                while True:
                    try:
                        await pipe.watch(key)
                        state = _decode(await pipe.hgetall(key))
                        now = self.pool.clock()
                        advance(state, event, now, self.pool.config)
                        pipe.multi()  # type: ignore[no-untyped-call]
                        if state.blank:
                            pipe.delete(key)
                        else:
                            fields: dict[Any, str | float] = {"name": name, "owner": owner}
                            fields.update(_encode(state))
                            pipe.hset(key, mapping=fields)
                            back = max(state.until, state.trial) - now
                            pipe.pexpire(key, int((max(back, 0.0) + _KEEP) * 1000))
                        pipe.publish(self._channel, json.dumps([name, owner, _encode(state)]))
                        await pipe.execute()
                        self.shared += 1
                        break
                    except WatchError:
                        continue  # another process changed it meanwhile: apply to theirs
        except Exception as exc:
            self._outage.failed(exc)
        else:
            self._outage.over()

    async def _listen(self) -> None:
        """Subscribe, load every shared state, then adopt each published change; after a
        failure, again with backoff."""
        wait = 0.5
        while True:
            try:
                async with self._follower.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.subscribe(self._channel)
                    await self._load()  # after subscribing: no change falls in between
                    self._lost.clear()
                    self._listening.set()
                    self._outage.over()
                    wait = 0.5
                    while True:
                        message = await pubsub.get_message(timeout=5.0)
                        if message is not None and message["type"] == "message":
                            self._adopt(message["data"])
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._listening.clear()
                self._lost.set()
                self._outage.failed(exc)
                await asyncio.sleep(wait)
                wait = min(wait * 2, 30.0)

    async def _load(self) -> None:
        names = {target.name for target in self.pool.targets}
        async for key in self._client.scan_iter(match=f"{self._prefix}*", count=500):
            found = await self._client.hgetall(key)
            name, owner = _text(found.get(b"name")), _text(found.get(b"owner"))
            if name in names:
                self.pool.adopt(name, owner, _decode(found))

    def _adopt(self, data: bytes | str) -> None:
        try:
            name, owner, fields = json.loads(data)
            state = State(**{field: fields[field] for field in _FIELDS})
        except (ValueError, TypeError, KeyError):
            logger.warning("ignored a malformed shared cooldown: %.200r", data)
            return
        if any(target.name == name for target in self.pool.targets):
            self.pool.adopt(name, owner, state)
        self.heard += 1
        self._news.set()
        self._news = asyncio.Event()


def _no_retry() -> Any:
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    return Retry(NoBackoff(), 0)


def _decode(found: dict[Any, Any]) -> State:
    def number(field: str) -> float:
        value = found.get(field.encode(), found.get(field))
        return float(value) if value is not None else 0.0

    return State(
        failures=int(number("failures")),
        until=number("until"),
        backoff=number("backoff"),
        trial=number("trial"),
    )


def _encode(state: State) -> dict[str, float]:
    return {field: getattr(state, field) for field in _FIELDS}


def _text(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else value
