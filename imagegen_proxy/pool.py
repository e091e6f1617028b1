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
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import httpx

from .config import PoolConfig
from .errors import ProxyError
from .request import ImageRequest
from .upstream import Target

logger = logging.getLogger("imagegen_proxy")

# Answers that say "not now, here": another upstream may well take the request.
FAILOVER_STATUSES = frozenset({429, 500, 502, 503, 504})


@dataclass(slots=True)
class _State:
    failures: int = 0  # in a row
    until: float = 0.0  # cooling down until then (time.monotonic())
    backoff: float = 0.0  # the last cooldown after failures, doubled on the next
    trial: bool = False  # a trial request is out after a cooldown


def credential(api_key: str | None) -> str:
    """Who a cooldown belongs to: the configured key (""), or a digest of a client's own."""
    return "" if api_key is None else hashlib.sha256(api_key.encode()).hexdigest()[:16]


class Pool:
    """The upstreams' states in this process, and the order a request tries them in."""

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
        self._rng = rng or random.Random()
        self._states: dict[tuple[str, str], _State] = {}
        self.in_flight = {target.name: 0 for target in targets}

    def candidates(self, request: ImageRequest, api_key: str | None) -> list[Target]:
        """The upstreams to try, best first, at most `max_attempts`: 404 when none serves
        the model, 503 when every one that does is cooling down."""
        model = request.model
        serving = [
            target
            for target in self.targets
            if target.serves(model)
            and (request.operation != "variation" or target.kind == "openai")
        ]
        if not serving:
            raise ProxyError(
                404,
                f"The model {model!r} does not exist or is not served here.",
                param="model",
                code="model_not_found",
            )
        now = self.clock()
        owner = credential(api_key)
        ready = [target for target in serving if self._ready(target, owner, now)]
        if not ready:
            soonest = min(self._state(target, owner).until for target in serving)
            wait = max(1, round(soonest - now + 0.5))
            raise ProxyError(
                503,
                f"Every upstream serving {model!r} is cooling down: try again in {wait} s.",
                type="server_error",
                code="upstreams_unavailable",
                headers=[("retry-after", str(wait))],
            )
        ready.sort(key=lambda target: (target.priority, self._load(target), self._draw(target)))
        return ready[: self.config.max_attempts]

    def models(self, known: Iterable[str]) -> list[str]:
        """The models the pool serves: those its upstreams name, with `known` ones (the
        priced models) when an upstream serves every model."""
        served: set[str] = set()
        for target in self.targets:
            if target.models is None:
                served.update(known)
            else:
                served.update(target.models)
        return sorted(served)

    def _load(self, target: Target) -> float:
        return self.in_flight[target.name] / target.weight

    def _draw(self, target: Target) -> float:
        # Efraimidis-Spirakis: sorting by -u ** (1 / w) picks in proportion to the weights.
        return -float(self._rng.random() ** (1 / target.weight))

    def _state(self, target: Target, owner: str) -> _State:
        key = (target.name, owner)
        state = self._states.get(key)
        if state is None:
            state = self._states[key] = _State()
        return state

    def _ready(self, target: Target, owner: str, now: float) -> bool:
        state = self._states.get((target.name, owner))
        return state is None or (now >= state.until and not state.trial)

    def started(self, target: Target, api_key: str | None) -> None:
        self.in_flight[target.name] += 1
        state = self._states.get((target.name, credential(api_key)))
        if state is not None and state.until and self.clock() >= state.until:
            state.trial = True  # the one request after a cooldown: others wait for it

    def ended(
        self, target: Target, api_key: str | None, status: int | None, retry_after: float | None
    ) -> None:
        """An attempt on `target` ended: with the upstream's `status`, or None when it
        failed to answer (connect error, reset)."""
        self.in_flight[target.name] -= 1
        state = self._state(target, credential(api_key))
        state.trial = False
        now = self.clock()
        if status == 429:
            wait = retry_after if retry_after is not None else self.config.cooldown_min
            state.until = now + wait
        elif status is None or status in FAILOVER_STATUSES:
            state.failures += 1
            if state.failures >= self.config.failures_to_open:
                state.backoff = min(
                    self.config.cooldown_max,
                    max(self.config.cooldown_min, state.backoff * 2),
                )
                state.until = now + state.backoff
        else:
            state.failures, state.backoff, state.until = 0, 0.0, 0.0

    def left(self, target: Target, api_key: str | None) -> None:
        """An attempt on `target` was abandoned before its answer (the client left): its
        slot and any trial it held are given back, and nothing is learned."""
        self.in_flight[target.name] -= 1
        state = self._states.get((target.name, credential(api_key)))
        if state is not None:
            state.trial = False

    def state(self, target: Target) -> tuple[str, float | None]:
        """The configured credential's view of `target`: "up", "cooling" (until when, in
        seconds from now), for /healthz."""
        state = self._states.get((target.name, ""))
        now = self.clock()
        if state is None or now >= state.until:
            return "up", None
        return "cooling", state.until - now


def retry_after(value: str | None) -> float | None:
    """An upstream's `retry-after` in seconds (a number of seconds; dates are ignored)."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if 0 <= seconds <= 3600 else None


class Tries:
    """One request's `relay.Attempts`: its candidates, how to build the request for each,
    and the pool (None without one) to tell how each try went."""

    __slots__ = ("_build", "_key", "_pool", "failovers", "targets")

    def __init__(
        self,
        targets: list[Target],
        build: Callable[[Target], httpx.Request],
        pool: Pool | None,
        api_key: str | None,
    ) -> None:
        self.targets = targets
        self._build, self._pool, self._key = build, pool, api_key
        self.failovers: list[tuple[str, str, str]] = []  # (from, to, reason)

    def build(self, target: Target) -> httpx.Request:
        return self._build(target)

    def started(self, target: Target) -> None:
        if self._pool is not None:
            self._pool.started(target, self._key)

    def ended(self, target: Target, status: int | None, retry_after: float | None) -> None:
        if self._pool is not None:
            self._pool.ended(target, self._key, status, retry_after)

    def left(self, target: Target) -> None:
        if self._pool is not None:
            self._pool.left(target, self._key)

    def failed_over(self, source: Target, to: Target, reason: str) -> None:
        logger.warning("upstream %s failed (%s): trying %s", source.name, reason, to.name)
        self.failovers.append((source.name, to.name, reason))
