"""Client keys from the configuration and from the store, behind one `Authenticator`."""

from __future__ import annotations

import dataclasses
import logging

from cachetools import TTLCache

from ..config import Policy
from ..governance.auth import Credentials, KeyTable, Principal, presented_digest, unauthorized
from ..wire.errors import ProxyError
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
        self._org: TTLCache[None, Policy | None] = TTLCache(1, cache_seconds)
        self._known: Policy | None = None

    async def authenticate(self, credentials: Credentials) -> Principal:
        digest = presented_digest(credentials)
        principal = self.table.find(digest, credentials.username)
        if principal is None:
            try:
                principal = self._seen[digest]
            except KeyError:
                principal = await self._ask(digest)
        if principal is None:
            raise unauthorized("Incorrect API key provided.")
        organization = await self._organization()
        if organization is not None:
            principal = dataclasses.replace(principal, organization=organization)
        return principal

    async def _organization(self) -> Policy | None:
        """The organization's limits, every key's (kept as long as what is said of keys).
        While the store cannot be reached, the last ones it gave hold: the configuration's
        keys go on working without it."""
        try:
            return self._org[None]
        except KeyError:
            pass
        try:
            await self.store.ready()
            self._known = await self.store.organization()
        except Exception as exc:
            logger.warning("key store failed: %s", type(exc).__name__)
            return self._known
        self._org[None] = self._known
        return self._known

    async def _ask(self, digest: bytes) -> Principal | None:
        try:
            await self.store.ready()
            principal = await self.store.find(digest)
        except Exception as exc:
            logger.warning("key store failed: %s", type(exc).__name__)
            raise _unavailable() from None
        self._seen[digest] = principal
        return principal


def _unavailable() -> ProxyError:
    return ProxyError(
        503,
        "The key store is unavailable; try again shortly.",
        type="server_error",
        code="store_unavailable",
    )
