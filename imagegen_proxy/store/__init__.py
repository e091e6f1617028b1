"""The store: projects and client keys kept in a database, changed while the proxy runs.

SQLite (`sqlite:///path/to/proxy.db`, embedded, one host) or PostgreSQL
(`postgresql://user@host/db`, several hosts), through SQLAlchemy's asyncio engine (aiosqlite,
asyncpg); the schema is versioned with Alembic (`upgrade()`). Keys are kept as SHA-256
digests only: a new key is shown once, when it is made. Needs the `store` extra.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import os
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from sqlalchemy import Connection, delete, event, insert, select, update
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from ..config import POLICY_BOUNDS, Policy
from ..governance.auth import Principal, Project
from .schema import api_keys, project_rate_limits, projects, service_accounts, settings

logger = logging.getLogger("imagegen_proxy")

KEY_PREFIX = "sk-igp-"
MAX_LIFETIME = 100 * 365 * 86400  # seconds: the longest a key may be made to last
_MIGRATIONS = os.path.join(os.path.dirname(__file__), "migrations")


class StoreError(ValueError):
    """A request the store cannot carry out (an unknown or duplicate name), said for people."""


@dataclass(frozen=True, slots=True)
class ProjectRecord:
    id: str
    name: str
    created_at: int
    archived_at: int | None
    policy: Policy


@dataclass(frozen=True, slots=True)
class KeyRecord:
    id: str
    name: str
    project_id: str | None
    redacted: str
    created_at: int
    expires_at: int | None
    revoked_at: int | None
    policy: Policy

    def state(self, now: float) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= now:
            return "expired"
        return "active"


def engine_url(url: str) -> str:
    """`sqlite:///…` and `postgresql://…` with the asyncio driver each needs."""
    for plain, driver in (
        ("sqlite://", "sqlite+aiosqlite://"),
        ("postgresql://", "postgresql+asyncpg://"),
    ):
        if url.startswith(plain):
            return driver + url.removeprefix(plain)
    return url


class Store:
    """Projects and keys in the database at `url`. `clock` (Unix seconds) may be injected."""

    def __init__(self, url: str, *, clock: Callable[[], float] = time.time) -> None:
        self.engine: AsyncEngine = create_async_engine(engine_url(url))
        self._clock = clock
        self._ready: asyncio.Future[None] | None = None
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine.sync_engine, "connect", _sqlite_pragmas)

    def now(self) -> int:
        """Unix seconds, from the store's clock."""
        return int(self._clock())

    def expiry(self, seconds: float | None) -> int | None:
        """When something that lasts `seconds` from now ends, in whole Unix seconds: never
        before `seconds` have passed. As the Admin API, from a second to 100 years."""
        if seconds is None:
            return None
        if not (math.isfinite(seconds) and 1 <= seconds <= MAX_LIFETIME):
            raise StoreError(
                f"A key's lifetime must be from 1 second to {MAX_LIFETIME} seconds (100 years)."
            )
        return math.ceil(self._clock() + seconds)

    def new_id(self, prefix: str) -> str:
        """`prefix` and 24 hex digits, the first 12 the time in milliseconds: lists ordered
        by (created_at, id) keep the order things were made within a second."""
        return f"{prefix}{int(self._clock() * 1000):012x}{secrets.token_hex(6)}"

    async def ready(self) -> None:
        """Upgrade the schema once, before first use; a failure is tried again next time.
        The proxy's first request calls it (Django's server sends no lifespan)."""
        if self._ready is None:
            self._ready = asyncio.ensure_future(self.upgrade())
        try:
            await asyncio.shield(self._ready)
        except Exception:
            self._ready = None
            raise

    async def upgrade(self, revision: str = "head") -> None:
        """Bring the schema to `revision`, the newest by default (Alembic's `upgrade`)."""
        async with self.engine.begin() as connection:
            await connection.run_sync(_upgrade, revision)

    async def aclose(self) -> None:
        await self.engine.dispose()

    # --- projects ----------------------------------------------------------------------

    async def create_project(self, name: str, policy: Policy | None = None) -> ProjectRecord:
        if any(p.name == name and p.archived_at is None for p in await self.projects()):
            raise StoreError(f"a project named {name!r} exists already")
        row = {
            "id": self.new_id("proj_"),
            "name": name,
            "created_at": int(self._clock()),
            "archived_at": None,
            "policy": dump_policy(policy),
        }
        async with self.engine.begin() as connection:
            await connection.execute(insert(projects).values(**row))
        return project_record(row)

    async def projects(self) -> list[ProjectRecord]:
        async with self.engine.connect() as connection:
            rows = await connection.execute(select(projects).order_by(projects.c.created_at))
            return [project_record(row._mapping) for row in rows]

    async def project(self, ref: str) -> ProjectRecord:
        """The project with id `ref`, or the active one named `ref`."""
        every = await self.projects()
        found = [p for p in every if p.id == ref] or [
            p for p in every if p.name == ref and p.archived_at is None
        ]
        if not found:
            raise StoreError(f"no project {ref!r}")
        return found[0]

    async def archive_project(self, ref: str) -> ProjectRecord:
        """Archive a project: its keys stop working."""
        project = await self.project(ref)
        now = int(self._clock())
        async with self.engine.begin() as connection:
            await connection.execute(
                update(projects).where(projects.c.id == project.id).values(archived_at=now)
            )
        return await self.project(project.id)

    # --- keys --------------------------------------------------------------------------

    async def create_key(
        self,
        name: str,
        *,
        project: str | None = None,
        policy: Policy | None = None,
        expires_in: float | None = None,
        secret: str | None = None,
    ) -> tuple[KeyRecord, str]:
        """A new key: its record, and the key itself, which nothing keeps. `secret` imports
        a key that exists already (one moving from `[[keys]]`) instead of making one."""
        if any(k.name == name and k.revoked_at is None for k in await self.keys()):
            raise StoreError(f"a key named {name!r} exists already")
        project_id = None if project is None else (await self.project(project)).id
        secret, fields = new_secret(secret)
        now = int(self._clock())
        row = {
            "id": self.new_id("key_"),
            "name": name,
            "project_id": project_id,
            "created_at": now,
            "expires_at": self.expiry(expires_in),
            "revoked_at": None,
            "policy": dump_policy(policy),
            **fields,
        }
        async with self.engine.begin() as connection:
            await connection.execute(insert(api_keys).values(**row))
        return key_record(row), secret

    async def keys(self) -> list[KeyRecord]:
        async with self.engine.connect() as connection:
            rows = await connection.execute(select(api_keys).order_by(api_keys.c.created_at))
            return [key_record(row._mapping) for row in rows]

    async def key(self, ref: str) -> KeyRecord:
        """The key with id `ref`, or the unrevoked one named `ref`."""
        every = await self.keys()
        found = [k for k in every if k.id == ref] or [
            k for k in every if k.name == ref and k.revoked_at is None
        ]
        if not found:
            raise StoreError(f"no key {ref!r}")
        return found[0]

    async def revoke_key(self, ref: str) -> KeyRecord:
        key = await self.key(ref)
        async with self.engine.begin() as connection:
            await connection.execute(
                update(api_keys)
                .where(api_keys.c.id == key.id)
                .values(revoked_at=int(self._clock()))
            )
        return await self.key(key.id)

    async def rotate_key(self, ref: str) -> tuple[KeyRecord, str]:
        """A new secret for the key (same id, name, project and limits): the old one stops
        working."""
        key = await self.key(ref)
        if key.revoked_at is not None:
            raise StoreError(f"key {ref!r} is revoked")
        secret, fields = new_secret()
        async with self.engine.begin() as connection:
            await connection.execute(
                update(api_keys).where(api_keys.c.id == key.id).values(**fields)
            )
        return await self.key(key.id), secret

    # --- the organization ---------------------------------------------------------------

    async def organization(self) -> Policy | None:
        """The limits every key is held to (the organization spend limit), if any."""
        query = select(settings.c.value).where(settings.c.name == "organization_policy")
        async with self.engine.connect() as connection:
            value = (await connection.execute(query)).scalar()
        return None if value is None else stored_policy(value, "the organization")

    async def set_organization(self, policy: Policy | None) -> None:
        async with self.engine.begin() as connection:
            await connection.execute(
                delete(settings).where(settings.c.name == "organization_policy")
            )
            if policy is not None:
                row = {"name": "organization_policy", "value": dump_policy(policy)}
                await connection.execute(insert(settings).values(**row))

    async def find(self, digest: bytes) -> Principal | None:
        """The principal of the key whose SHA-256 is `digest`, if it works now: not revoked,
        not expired, and its project (if any) not archived."""
        query = (
            select(
                api_keys,
                projects.c.name.label("project_name"),
                projects.c.archived_at,
                projects.c.policy.label("project_policy"),
                service_accounts.c.deleted_at,
            )
            .outerjoin(projects, api_keys.c.project_id == projects.c.id)
            .outerjoin(service_accounts, api_keys.c.service_account_id == service_accounts.c.id)
            .where(api_keys.c.digest == digest.hex())
        )
        async with self.engine.connect() as connection:
            row = (await connection.execute(query)).first()
            if row is None:
                return None
            found = row._mapping
            key = key_record(found)
            gone = found["archived_at"] is not None or found["deleted_at"] is not None
            if key.state(self._clock()) != "active" or gone:
                return None
            project = None
            if key.project_id is not None:
                limits = await connection.execute(
                    select(project_rate_limits).where(
                        project_rate_limits.c.project_id == key.project_id
                    )
                )
                project = Project(
                    found["project_name"],
                    stored_policy(found["project_policy"], f"project {key.project_id}"),
                    {limit.model: _rate_limit(limit._mapping) for limit in limits},
                    key.project_id,
                )
        return Principal(key.name, key.policy, project=project, id=key.id)


def new_secret(secret: str | None = None) -> tuple[str, dict[str, str]]:
    """A new key (or `secret`), and what the store keeps of it: its digest, and a redacted
    form for people."""
    secret = secret or KEY_PREFIX + secrets.token_urlsafe(32)
    digest = hashlib.sha256(secret.encode()).hexdigest()
    return secret, {"digest": digest, "redacted": f"{secret[:10]}...{secret[-4:]}"}


def stored_policy(value: Mapping[str, Any] | None, where: str) -> Policy:
    """A policy as the store kept it. One saved before limits were bounded (an infinite
    budget, a count past 2^53) is read with each such limit at its bound, and said, rather
    than failing every request and page of its keys."""
    try:
        return Policy.model_validate(value or {})
    except ValidationError as exc:
        fixed = dict(value or {})
        names = {str(error["loc"][0]) for error in exc.errors() if error["loc"]}
        if not names or not names <= POLICY_BOUNDS.keys():
            raise
        for name in names:
            fixed[name] = POLICY_BOUNDS[name]
        logger.warning(
            "%s: %s out of range in the store, read as the most allowed; set %s again",
            where,
            ", ".join(sorted(names)),
            "it" if len(names) == 1 else "them",
        )
        return Policy.model_validate(fixed)


def dump_policy(policy: Policy | None) -> dict[str, Any]:
    return (policy or Policy()).model_dump(mode="json", exclude_unset=True)


def project_record(row: Mapping[Any, Any]) -> ProjectRecord:
    return ProjectRecord(
        row["id"],
        row["name"],
        row["created_at"],
        row["archived_at"],
        stored_policy(row["policy"], f"project {row['id']}"),
    )


def key_record(row: Mapping[Any, Any]) -> KeyRecord:
    return KeyRecord(
        row["id"],
        row["name"],
        row["project_id"],
        row["redacted"],
        row["created_at"],
        row["expires_at"],
        row["revoked_at"],
        stored_policy(row["policy"], f"key {row['id']}"),
    )


def _rate_limit(row: Mapping[Any, Any]) -> Policy:
    return Policy(
        requests_per_minute=row["max_requests_per_1_minute"],
        images_per_minute=row["max_images_per_1_minute"],
    )


def _upgrade(connection: Connection, revision: str) -> None:
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", _MIGRATIONS)
    config.attributes["connection"] = connection
    command.upgrade(config, revision)


def _sqlite_pragmas(connection: Any, record: Any) -> None:
    # WAL: readers (every proxy process) never wait for a writer (the CLI, the admin API).
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()
