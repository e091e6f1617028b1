"""What a configuration builds for the middleware: its store, authenticator, limiter, pool
and idempotency registry, each in the form its settings ask for (memory, or Redis)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from .config import ConfigError, ProxyConfig
from .governance.auth import Authenticator, KeyTable, OpenAccess
from .governance.memory_limiter import MemoryLimiter
from .governance.ratelimit import RateLimiter
from .retries.idempotency import Idempotency
from .upstream.pool import Pool
from .upstream.targets import Upstreams

if TYPE_CHECKING:
    from opentelemetry.trace import TracerProvider

    from .observe.metrics import Metrics
    from .observe.tracing import Tracing
    from .storage import ImageStore
    from .store import Store
    from .store.ledger import LedgerWriter


def store_for(config: ProxyConfig) -> Store | None:
    if config.store.url is None:
        return None
    from .store import Store

    return Store(config.store.url)


def image_store_for(config: ProxyConfig) -> ImageStore | None:
    """Where images are kept (`[storage]`), or None: storage off."""
    if config.storage.url is None:
        return None
    from .storage import image_store

    return image_store(config.storage)


def authenticator_for(config: ProxyConfig, store: Store | None) -> Authenticator:
    if config.auth.open:
        return OpenAccess()
    table = KeyTable(config.keys, config.projects)
    if store is not None:
        from .store.keys import StoreKeys

        return StoreKeys(table, store, cache_seconds=config.store.cache_seconds)
    if not config.keys:
        raise ConfigError(
            'no client keys: add [[keys]] entries (name = "team-a", key_env = "TEAM_A_KEY"), '
            "a [store], or set [auth] open = true to serve without keys"
        )
    return table


def idempotency_for(config: ProxyConfig) -> Idempotency | None:
    """Repeats deduplicated in this process; with Redis limits, across processes too."""
    settings = config.idempotency
    if not settings.enabled:
        return None
    registry = Idempotency(settings)
    if config.limits.storage != "memory":
        from .retries.redis_idempotency import SharedMarkers

        longest = max((m.total_timeout for m in config.members()), default=900.0)
        registry.shared = SharedMarkers(
            config.limits.storage, ttl=settings.ttl, running=longest + settings.grace
        )
    return registry


def pool_for(config: ProxyConfig, upstreams: Upstreams) -> Pool:
    """The pool; with Redis limits, its cooldowns are shared through the same Redis."""
    if config.limits.storage == "memory":
        return Pool(upstreams.targets, config.pool)
    from .upstream.redis_pool import RedisMirror

    pool = Pool(upstreams.targets, config.pool, clock=time.time)
    RedisMirror(pool, config.limits.storage)
    return pool


def rate_limiter_for(config: ProxyConfig, store: Store | None) -> RateLimiter:
    """The limiter `[limits] storage` names; with a store, its budgets start from the
    ledger, so that a restart or a switch to Redis gives none back."""
    limiter: RateLimiter
    if config.limits.storage == "memory":
        limiter = MemoryLimiter()
    else:
        from .governance.redis_limiter import RedisLimiter

        limiter = RedisLimiter(
            config.limits.storage,
            on_storage_error=config.limits.on_storage_error,
            lease_seconds=config.limits.concurrency_lease_seconds,
        )
    if store is None:
        return limiter
    from .store.seeding import LedgerSeeded

    return LedgerSeeded(limiter, store, on_error=config.limits.on_storage_error)


def ledger_for(store: Store | None) -> LedgerWriter | None:
    if store is None:
        return None
    from .store.ledger import LedgerWriter

    return LedgerWriter(store)


def metrics_for(config: ProxyConfig, pool: Pool | None) -> Metrics | None:
    if not config.metrics.enabled:
        return None
    from .observe.metrics import Metrics

    metrics = Metrics.shared()
    if pool is not None:
        metrics.upstream_states.watch(pool)
    return metrics


def tracing_for(config: ProxyConfig, provider: TracerProvider | None = None) -> Tracing | None:
    """Traces (`[tracing]`, or an app's own tracer `provider`), or None: off."""
    if provider is None and not config.tracing.enabled:
        return None
    try:
        from .observe.tracing import start_tracing
    except ImportError:
        raise ConfigError(
            "[tracing] needs OpenTelemetry: pip install 'imagegen-proxy[tracing]'"
        ) from None
    return start_tracing(config, provider)
