"""A pool of upstreams: which ones a request may go to, in what order, and which sit out.

Load balancing: among the upstreams of the best priority tier that serve the model and are
not cooling down, the one with the fewest generations in flight for its weight, ties
broken at random in proportion to the weights. The other candidates follow, then the next
tiers: the relay fails over to them only where that is safe (see `upstream.FAILURES`).

Circuit breaking is passive: no probe ever generates an image. An upstream that answered
429 sits out its `retry-after`; one that failed `failures_to_open` times in a row sits out
`cooldown_min` seconds, doubling up to `cooldown_max` while it keeps failing, and then
gets a single trial request. A cooldown belongs to the upstream and the credential it was
earned with: a client spending on its own upstream key cannot take the upstream away from
everyone else.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from ..config import PoolConfig
from ..wire.errors import ProxyError
from ..wire.request import ImageRequest
from .call import Call
from .kinds import makes
from .targets import Target

logger = logging.getLogger("imagegen_proxy")

# Answers that say "not now, here": another upstream may well take the request.
FAILOVER_STATUSES = frozenset({429, 500, 502, 503, 504})


@dataclass(slots=True)
class State:
    """What is known of one upstream for one credential. Times are the pool's clock."""

    failures: int = 0  # in a row
    until: float = 0.0  # sitting out until then
    backoff: float = 0.0  # the last cooldown after failures, doubled on the next
    trial: float = 0.0  # a trial request is out (until then, should its process die)

    @property
    def blank(self) -> bool:
        return not (self.failures or self.until or self.trial)

    def ready(self, now: float) -> bool:
        return now >= self.until and now >= self.trial

    def due(self, now: float) -> bool:
        """A cooldown has passed and no trial is out: the next request is the trial."""
        return bool(self.until) and self.ready(now)


# What happened to an upstream, as `advance` and the Redis mirror apply it: "trial" (a
# request starts on it after its cooldown), "left" (that trial was abandoned), or
# ("ended", status or None for no answer, retry-after seconds or None).
Event = str | tuple[str, int | None, float | None]


def advance(state: State, event: Event, now: float, config: PoolConfig) -> None:
    """The one rule of circuit breaking: how `event` changes `state`."""
    if isinstance(event, str):
        if event == "left":
            state.trial = 0.0
        elif state.due(now):  # "trial"
            state.trial = now + config.cooldown_max
        return
    _, status, wait = event
    state.trial = 0.0
    if status == 429:
        state.until = now + (wait if wait is not None else config.cooldown_min)
    elif status is None or status in FAILOVER_STATUSES:
        state.failures += 1
        if state.failures >= config.failures_to_open:
            state.backoff = min(config.cooldown_max, max(config.cooldown_min, state.backoff * 2))
            state.until = now + state.backoff
    else:
        state.failures, state.backoff, state.until = 0, 0.0, 0.0


class Mirror(Protocol):
    """Where a pool's changes are shared with other processes (`redis_pool.RedisMirror`)."""

    def start(self) -> None: ...

    def send(self, name: str, owner: str, event: Event) -> None: ...

    async def aclose(self) -> None: ...


def credential(api_key: str | None) -> str:
    """Who a cooldown belongs to: the configured key (""), or a digest of a client's own."""
    return "" if api_key is None else hashlib.sha256(api_key.encode()).hexdigest()[:16]


class Pool:
    """The upstreams' states as this process knows them, and the order a request tries
    them in. With a `mirror`, every change is also sent to the other processes, and what
    they learn arrives through `adopt`; requests never wait for that."""

    def __init__(
        self,
        targets: list[Target],
        config: PoolConfig | None,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.targets = targets
        self.config = config or PoolConfig()
        self.clock = clock
        self.mirror: Mirror | None = None
        self._rng = rng or random.Random()
        self._states: dict[tuple[str, str], State] = {}
        self.in_flight = {target.name: 0 for target in targets}

    def candidates(self, request: ImageRequest, api_key: str | None) -> list[Target]:
        """The upstreams to try, best first, at most `max_attempts`: 404 when none serves
        the model, 503 when every one that does is sitting out."""
        model = request.model
        serving = [
            target
            for target in self.targets
            if target.serves(model) and target.api.serves(request.operation)
        ]
        if not serving:
            raise ProxyError(
                404,
                f"The model {model!r} does not exist or is not served here.",
                param="model",
                code="model_not_found",
            )
        if self.mirror is not None:
            self.mirror.start()
        now = self.clock()
        owner = credential(api_key)
        states = self._states
        ready = [
            target
            for target in serving
            if (state := states.get((target.name, owner))) is None or state.ready(now)
        ]
        if not ready:
            soonest = min(self._back_at(target, owner) for target in serving)
            wait = max(1, math.ceil(soonest - now))
            raise ProxyError(
                503,
                f"Every upstream serving {model!r} is cooling down: try again in {wait} s.",
                type="server_error",
                code="upstreams_unavailable",
                headers=[("retry-after", str(wait))],
            )
        if len(ready) > 1:
            ready.sort(key=lambda target: (target.priority, self._load(target), self._draw(target)))
        return ready[: self.config.max_attempts]

    def models(self, known: Iterable[str]) -> list[str]:
        """The models the pool serves: those its upstreams name, with the `known` ones (the
        priced models) of its kind when an upstream serves every model."""
        served: set[str] = set()
        for target in self.targets:
            if target.models is None:
                served.update(model for model in known if makes(target.kind, model))
            else:
                served.update(target.models)
        return sorted(served)

    def _load(self, target: Target) -> float:
        return self.in_flight[target.name] / target.weight

    def _draw(self, target: Target) -> float:
        # Efraimidis-Spirakis: sorting by -u ** (1 / w) picks in proportion to the weights.
        return -float(self._rng.random() ** (1 / target.weight))

    def _back_at(self, target: Target, owner: str) -> float:
        state = self._states[(target.name, owner)]
        return max(state.until, state.trial)

    def _apply(self, target: Target, owner: str, event: Event) -> None:
        """Apply `event` here and, with a mirror, everywhere. A state back to blank is
        dropped, so only upstreams with something against them take memory."""
        key = (target.name, owner)
        state = self._states.get(key)
        if state is None:
            if isinstance(event, str) or event[1] not in _FAILED:
                return  # nothing known against it, and nothing to learn
            state = self._states[key] = State()
        advance(state, event, self.clock(), self.config)
        if state.blank:
            del self._states[key]
        if self.mirror is not None:
            self.mirror.send(target.name, owner, event)

    def adopt(self, name: str, owner: str, state: State) -> None:
        """What another process (or the mirror, for this one) made of an upstream."""
        if state.blank:
            self._states.pop((name, owner), None)
        else:
            self._states[(name, owner)] = state

    def started(self, target: Target, api_key: str | None) -> bool:
        """An attempt on `target` starts. True when it is the upstream's trial after a
        cooldown: other requests wait for it (`left` must then say if it is abandoned)."""
        self.in_flight[target.name] += 1
        owner = credential(api_key)
        state = self._states.get((target.name, owner))
        if state is None or not state.due(self.clock()):
            return False
        self._apply(target, owner, "trial")
        return True

    def ended(
        self, target: Target, api_key: str | None, status: int | None, retry_after: float | None
    ) -> None:
        """An attempt on `target` ended: with the upstream's `status`, or None when it
        failed to answer (connect error, reset)."""
        self.in_flight[target.name] -= 1
        self._apply(target, credential(api_key), ("ended", status, retry_after))

    def left(self, target: Target, api_key: str | None, trial: bool) -> None:
        """An attempt on `target` was abandoned before its answer (the client left): its
        slot and the trial it held, if it did, are given back; nothing is learned."""
        self.in_flight[target.name] -= 1
        if trial:
            self._apply(target, credential(api_key), "left")

    def state(self, target: Target) -> tuple[str, float | None]:
        """How `target` stands for the configured credential, for /healthz: "up"; "cooling"
        after a 429 or "open" after failures, with the seconds left; "trial" while the
        request after a cooldown is out."""
        state = self._states.get((target.name, ""))
        now = self.clock()
        if state is None:
            return "up", None
        if now < state.until:
            opened = state.failures >= self.config.failures_to_open
            return ("open" if opened else "cooling"), state.until - now
        if now < state.trial:
            return "trial", None
        return "up", None


_FAILED = FAILOVER_STATUSES | {None}


class Tries:
    """One request's `relay.Attempts`: its candidates, how to build the request for each,
    and the pool (None without one) to tell how each try went."""

    __slots__ = ("_build", "_key", "_pool", "_trial", "failovers", "targets")

    def __init__(
        self,
        targets: list[Target],
        build: Callable[[Target], Call],
        pool: Pool | None,
        api_key: str | None,
    ) -> None:
        self.targets = targets
        self._build, self._pool, self._key = build, pool, api_key
        self._trial = False  # the current attempt is its upstream's trial
        self.failovers: list[tuple[str, str, str]] = []  # (from, to, reason)

    def build(self, target: Target) -> Call:
        return self._build(target)

    def started(self, target: Target, call: Call) -> None:
        if self._pool is not None:
            self._trial = self._pool.started(target, self._key)

    def ended(self, target: Target, status: int | None, retry_after: float | None) -> None:
        if self._pool is not None:
            self._pool.ended(target, self._key, status, retry_after)

    def left(self, target: Target) -> None:
        if self._pool is not None:
            self._pool.left(target, self._key, self._trial)

    def failed_over(self, source: Target, to: Target, reason: str) -> None:
        logger.warning("upstream %s failed (%s): trying %s", source.name, reason, to.name)
        self.failovers.append((source.name, to.name, reason))
