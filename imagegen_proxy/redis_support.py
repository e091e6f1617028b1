"""What the Redis-backed features share: a client with short timeouts, and an outage
logged once (and its end), however many requests run into it."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from redis.asyncio import Redis

logger = logging.getLogger("imagegen_proxy")


def redis_client(url: str, feature: str, **options: Any) -> Redis:
    """A client for `url`: a Redis that hangs fails within 2 s, so that `feature` falls
    back quickly."""
    try:
        from redis.asyncio import Redis
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"{feature} needs the redis package: pip install 'imagegen-proxy[redis]'"
        ) from None
    return Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0, **options)


class Outage:
    """Says once that `feature` lost Redis and what happens meanwhile, and once that it is
    back."""

    def __init__(self, feature: str, meanwhile: str) -> None:
        self.feature, self.meanwhile = feature, meanwhile
        self.on = False

    def failed(self, exc: Exception) -> None:
        if not self.on:
            self.on = True
            logger.warning(
                "%s: Redis failed (%s: %s); %s until it answers",
                self.feature,
                type(exc).__name__,
                exc,
                self.meanwhile,
            )

    def over(self) -> None:
        if self.on:
            self.on = False
            logger.warning("%s: Redis answers again", self.feature)
