"""Prometheus metrics (the `metrics` extra: prometheus-client), and the app that serves them.

With several worker processes, set `PROMETHEUS_MULTIPROC_DIR` (the `imagegen-proxy` command
does it for `--workers`): each process writes its values there and `metrics_app()` adds them
up, whichever process answers the scrape.
"""

from __future__ import annotations

import atexit
import os
import re
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ..config import ConfigError
from ..generation import Generation
from ..types import ASGIApp, Receive, Scope, Send

if TYPE_CHECKING:
    from ..upstream.pool import Pool

try:
    import prometheus_client
    from prometheus_client import multiprocess
except ImportError:  # pragma: no cover - exercised by users without the extra
    prometheus_client = None  # type: ignore[assignment]

# Generations take seconds to minutes: buckets from 100 ms up to the 10-minute read timeout.
BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 15, 20, 30, 45, 60, 90, 120, 180, 300, 600)
_LABEL = re.compile(r"[\w.:/@+-]{1,64}", re.ASCII)
_UNSAFE = re.compile(r"[^\w.:/@+-]+", re.ASCII)


def _require() -> None:
    if prometheus_client is None:
        raise ConfigError(
            "[metrics] enabled needs prometheus-client: pip install 'imagegen-proxy[metrics]'"
        )


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class _Bounded:
    """Label values taken from what clients send (models) or name (keys): made safe, at
    most `limit` distinct ones, then "other", so that no client can grow the metrics
    without bound."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.seen: set[str] = set()

    def __call__(self, value: str | None) -> str:
        if not value:
            return ""
        if value in self.seen:
            return value
        label = value if _LABEL.fullmatch(value) else _safe(value)
        if label in self.seen:
            return label
        if len(self.seen) >= self.limit or not label:
            return "other"
        self.seen.add(label)
        return label


def _safe(value: str) -> str:
    """`value` as a label: each run of other characters one "_", at most 64 characters
    (a key made through the admin API is named "checkout-bot (svc_acct_…)": its label is
    `checkout-bot_svc_acct_…`, its own, not a merged "other")."""
    return _UNSAFE.sub("_", value).strip("_")[:64]


class Metrics:
    """The proxy's metrics, registered once per process (in prometheus-client's default
    registry, so a host app's own `/metrics` shows them too)."""

    _instance: Metrics | None = None

    @classmethod
    def shared(cls) -> Metrics:
        _require()
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance

    def __init__(self) -> None:
        p = prometheus_client
        self.requests = p.Counter(
            "imagegen_proxy_requests",
            "Image requests answered, by path form, operation (generation, edit, variation), "
            "key, model and status.",
            ["form", "operation", "key", "model", "status"],
        )
        self.images = p.Counter(
            "imagegen_proxy_images",
            "Images charged (n of each request that reached the upstream and got no error).",
            ["key", "project", "model", "operation"],
        )
        self.cost = p.Counter(
            "imagegen_proxy_cost_usd",
            "What generations cost, in USD, from the price table and the upstream's usage.",
            ["key", "project", "model"],
        )
        self.ttfb = p.Histogram(
            "imagegen_proxy_upstream_ttfb_seconds",
            "Time from sending the upstream request to its response headers.",
            ["upstream"],
            buckets=BUCKETS,
        )
        self.upstream_time = p.Histogram(
            "imagegen_proxy_upstream_duration_seconds",
            "Time from sending the upstream request to its last byte relayed.",
            ["upstream"],
            buckets=BUCKETS,
        )
        self.bytes = p.Counter(
            "imagegen_proxy_relayed_bytes",
            "Response body bytes sent to clients.",
            ["key"],
        )
        self.in_flight = p.Gauge(
            "imagegen_proxy_in_flight",
            "Generations in flight (admitted, not yet ended).",
            ["key"],
            multiprocess_mode="livesum",
        )
        self.limited = p.Counter(
            "imagegen_proxy_limited",
            "Requests refused by a rate limit or quota, by the limit that refused them.",
            ["key", "limit"],
        )
        self.upstream_errors = p.Counter(
            "imagegen_proxy_upstream_errors",
            "Upstream failures: connect, timeout, pool, protocol, status (non-2xx), "
            "mid_stream (after the answer started), too_large (over max_response_bytes).",
            ["upstream", "kind"],
        )
        self.over_reservation = p.Counter(
            "imagegen_proxy_usage_over_reservation",
            "Generations whose usage cost more than the worst case reserved for them (an "
            "out-of-date price table, or an upstream's wrong usage), by model.",
            ["model"],
        )
        self.failovers = p.Counter(
            "imagegen_proxy_failovers",
            "Requests moved from one upstream of a pool to the next, by why (connect, "
            "protocol, or the upstream's status).",
            ["from", "to", "reason"],
        )
        self.upstream_states = UpstreamStates()
        p.REGISTRY.register(self.upstream_states)
        self._models = _Bounded(100)
        self._keys = _Bounded(10_000)
        if multiprocess_dir():
            atexit.register(self.process_ending)

    def process_ending(self) -> None:
        """In multiprocess mode, take this process's live gauges (`in_flight`) out of the
        sum. Called on lifespan shutdown: uvicorn's workers end by re-raising the signal
        that stopped them, so `atexit` alone would not run."""
        directory = multiprocess_dir()
        if directory:
            multiprocess.mark_process_dead(os.getpid(), directory)  # type: ignore[no-untyped-call]

    def started(self, generation: Generation) -> None:
        self.in_flight.labels(self._keys(generation.key)).inc()

    def ended(self, generation: Generation) -> None:
        key = self._keys(generation.key)
        model = self._models(generation.model)
        if generation.admitted:
            self.in_flight.labels(key).dec()
        self.requests.labels(
            generation.form, generation.operation, key, model, str(generation.status)
        ).inc()
        project = self._keys(generation.project)
        if generation.images:
            self.images.labels(key, project, model, generation.operation).inc(generation.images)
        if generation.cost_micros:
            self.cost.labels(key, project, model).inc(generation.cost_micros / 1_000_000)
            if generation.over_reservation:
                self.over_reservation.labels(model).inc()
        if generation.bytes_out:
            self.bytes.labels(key).inc(generation.bytes_out)
        if generation.limit:
            self.limited.labels(key, generation.limit).inc()
        for source, to, reason in generation.failovers:
            self.failovers.labels(source, to, reason).inc()
        upstream = generation.upstream
        if upstream is None:
            return
        if generation.ttfb is not None:
            self.ttfb.labels(upstream).observe(generation.ttfb)
        if generation.upstream_time is not None:
            self.upstream_time.labels(upstream).observe(generation.upstream_time)
        if generation.outcome == "upstream_error" and generation.error in _KINDS:
            self.upstream_errors.labels(upstream, generation.error).inc()


# The values of imagegen_proxy_upstream_state, from pool.Pool.state.
STATES = {"up": 0, "trial": 1, "cooling": 2, "open": 3}


class UpstreamStates:
    """`imagegen_proxy_upstream_state{upstream}`, read from the pools at each scrape (a
    cooldown ends by the clock, not by an event). With several processes the one that
    answers the scrape reports what it knows: with Redis, every process knows the same."""

    def __init__(self) -> None:
        self._pools: list[weakref.ref[Pool]] = []

    def watch(self, pool: Pool) -> None:
        self._pools.append(weakref.ref(pool))

    def describe(self) -> list[Any]:
        return [self._family()]

    def collect(self) -> Iterator[Any]:
        states: dict[str, int] = {}
        for ref in list(self._pools):
            pool = ref()
            if pool is None:
                self._pools.remove(ref)
                continue
            for target in pool.targets:  # the latest proxy's view of a name wins
                states[target.name] = STATES[pool.state(target)[0]]
        family = self._family()
        for name, value in states.items():
            family.add_metric([name], value)
        yield family

    @staticmethod
    def _family() -> Any:
        return prometheus_client.metrics_core.GaugeMetricFamily(
            "imagegen_proxy_upstream_state",
            "Each pooled upstream's state for the configured key: 0 up, 1 trial (the one "
            "request after a cooldown is out), 2 cooling (after a 429), 3 open (after "
            "failures in a row).",
            labels=["upstream"],
        )


_KINDS = frozenset({"connect", "timeout", "pool", "protocol", "status", "mid_stream", "too_large"})


class MetricsApp:
    """An ASGI app answering Prometheus scrapes (a class, so that Starlette's `Route` and
    `Mount` both take it as an app, not as an endpoint function)."""

    def __init__(self) -> None:
        _require()
        self._app: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._app is None:
            # At the first scrape, not when made: `--workers` turns multiprocess mode on
            # (PROMETHEUS_MULTIPROC_DIR) after the ops listener's app exists.
            self._app = prometheus_client.make_asgi_app(_registry())
        await self._app(scope, receive, send)


def _registry() -> Any:
    if not multiprocess_dir():
        return prometheus_client.REGISTRY
    # Not the default registry: it would export this process's values twice.
    registry = prometheus_client.CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    registry.register(Metrics.shared().upstream_states)
    return registry


def metrics_app() -> ASGIApp:
    """The scrape endpoint, to route where the host app wants, e.g.
    `Route("/metrics", metrics_app())`. In multiprocess mode it adds up every process's
    values, whichever process answers."""
    return MetricsApp()
