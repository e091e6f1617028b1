"""Client keys from the configuration and from the store, behind one `Authenticator`."""

from __future__ import annotations

import logging

from cachetools import TTLCache

from ..auth import Credentials, KeyTable, Principal, presented_digest, unauthorized
from ..errors import ProxyError
from . import Store

logger = logging.getLogger("imagegen_proxy")


class StoreKeys:
    """The `[[keys]]` of the configuration first, then the store's keys.

    What the store says of a key (found, or not) is kept for `cache_seconds`: the hot path
    does not wait on the database for a key it has seen, and a revoked key, an expired one
    or an archived project's is refused on every process within that time. The schema is
    brought up to date on first use (`Store.ready`).
    """

    def __init__(self, table: KeyTable, store: Store, *, cache_seconds: float = 1.0) -> None:
        self.table = table
        self.store = store
        self._seen: TTLCache[bytes, Principal | None] = TTLCache(100_000, cache_seconds)

    async def authenticate(self, credentials: Credentials) -> Principal:
        digest = presented_digest(credentials)
        principal = self.table.find(digest, credentials.username)
        if principal is not None:
            return principal
        try:
            principal = self._seen[digest]
        except KeyError:
            principal = await self._ask(digest)
        if principal is None:
            raise unauthorized("Incorrect API key provided.")
        return principal

    async def _ask(self, digest: bytes) -> Principal | None:
        try:
            await self.store.ready()
            principal = await self.store.find(digest)
        except Exception as exc:
            logger.warning("key store failed: %s", type(exc).__name__)
            raise ProxyError(
                503,
                "The key store is unavailable; try again shortly.",
                type="server_error",
                code="store_unavailable",
            ) from None
        self._seen[digest] = principal
        return principal
