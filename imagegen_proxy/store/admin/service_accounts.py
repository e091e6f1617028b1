"""Service accounts and a project's keys in the store, as the Admin API makes, lists and
deletes them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, and_, insert, select, update

from ...config import Policy
from .. import KeyRecord, dump_policy, key_record, new_secret, stored_policy
from ..schema import api_keys, service_accounts
from .common import NotFound, Page, checked_id, paginate
from .projects import Projects


@dataclass(frozen=True, slots=True)
class ServiceAccountRecord:
    id: str
    project_id: str
    name: str
    role: str
    created_at: int
    deleted_at: int | None
    policy: Policy  # its key's own limits


@dataclass(frozen=True, slots=True)
class ProjectKeyRecord:
    key: KeyRecord
    last_used_at: int | None
    owner: ServiceAccountRecord | None  # None: a key made by the CLI, owned by no account

    @property
    def id(self) -> str:
        return self.key.id


class ServiceAccounts(Projects):
    """The Admin API's operations on a project's service accounts and keys."""

    # --- service accounts --------------------------------------------------------------

    async def create_service_account(
        self,
        project_id: str,
        name: str,
        *,
        with_key: bool = True,
        expires_in: int | None = None,
        policy: Policy | None = None,
    ) -> tuple[ServiceAccountRecord, KeyRecord | None, str | None]:
        """A service account and (`with_key`) a key it owns: the account, the key's record,
        and the key itself, which nothing keeps."""
        project = await self._active(project_id)
        now = self._now()
        account = {
            "id": self.store.new_id("svc_acct_"),
            "project_id": project.id,
            "name": name,
            "role": "member" if with_key else "none",
            "created_at": now,
            "deleted_at": None,
        }
        key: dict[str, Any] | None = None
        secret = None
        if with_key:
            secret, fields = new_secret()
            key = {
                "id": self.store.new_id("key_"),
                # Limits are counted by key name: the account's id keeps it unique.
                "name": f"{name} ({account['id']})",
                "project_id": project.id,
                "created_at": now,
                "expires_at": self.store.expiry(expires_in),
                "revoked_at": None,
                "policy": dump_policy(policy),
                "service_account_id": account["id"],
                **fields,
            }
        async with self.store.engine.begin() as connection:
            await connection.execute(insert(service_accounts).values(**account))
            if key is not None:
                await connection.execute(insert(api_keys).values(**key))
        created = _account({**account, "policy": dump_policy(policy) if with_key else None})
        return created, None if key is None else key_record(key), secret

    async def service_accounts(
        self, project_id: str, limit: int, *, after: str | None = None
    ) -> Page[ServiceAccountRecord]:
        await self.project(project_id)
        found = await self._accounts(service_accounts.c.project_id == project_id)
        return paginate(found, limit, after=after)

    async def service_account(self, project_id: str, account_id: str) -> ServiceAccountRecord:
        await self.project(project_id)
        found = await self._accounts(
            service_accounts.c.project_id == project_id,
            service_accounts.c.id == checked_id(account_id, "service account"),
        )
        if not found:
            raise NotFound("service account", account_id)
        return found[0]

    async def delete_service_account(self, project_id: str, account_id: str) -> None:
        """Mark the account deleted and revoke its keys."""
        await self._active(project_id)  # an archived project has no service accounts
        await self.service_account(project_id, account_id)
        now = self._now()
        async with self.store.engine.begin() as connection:
            await connection.execute(
                update(service_accounts)
                .where(service_accounts.c.id == account_id)
                .values(deleted_at=now)
            )
            await connection.execute(
                update(api_keys)
                .where(api_keys.c.service_account_id == account_id, api_keys.c.revoked_at.is_(None))
                .values(revoked_at=now)
            )

    async def _accounts(self, *where: ColumnElement[bool]) -> list[ServiceAccountRecord]:
        """The undeleted accounts, each with the limits of its newest unrevoked key."""
        owned = and_(
            api_keys.c.service_account_id == service_accounts.c.id, api_keys.c.revoked_at.is_(None)
        )
        query = (
            select(service_accounts, api_keys.c.policy)
            .outerjoin(api_keys, owned)
            .where(service_accounts.c.deleted_at.is_(None), *where)
            .order_by(service_accounts.c.created_at, service_accounts.c.id, api_keys.c.created_at)
        )
        found: dict[str, ServiceAccountRecord] = {}
        async with self.store.engine.connect() as connection:
            for row in await connection.execute(query):
                found[row.id] = _account(row._mapping)  # the newest key comes last
        return list(found.values())

    # --- a project's keys --------------------------------------------------------------

    async def project_keys(
        self, project_id: str, limit: int, *, after: str | None = None
    ) -> Page[ProjectKeyRecord]:
        """The project's unrevoked keys (expired ones too, until deleted)."""
        await self.project(project_id)
        found = await self._keys(api_keys.c.project_id == project_id)
        return paginate(found, limit, after=after)

    async def project_key(self, project_id: str, key_id: str) -> ProjectKeyRecord:
        await self.project(project_id)
        key_id = checked_id(key_id, "API key")
        found = await self._keys(api_keys.c.project_id == project_id, api_keys.c.id == key_id)
        if not found:
            raise NotFound("API key", key_id)
        return found[0]

    async def delete_project_key(self, project_id: str, key_id: str) -> None:
        """Revoke the key (one of a service account's too: the account stays)."""
        key = await self.project_key(project_id, key_id)
        await self.store.revoke_key(key.id)

    async def _keys(self, *where: ColumnElement[bool]) -> list[ProjectKeyRecord]:
        owner = service_accounts.c
        query = (
            select(
                api_keys,
                owner.name.label("owner_name"),
                owner.role.label("owner_role"),
                owner.created_at.label("owner_created_at"),
            )
            .outerjoin(service_accounts, api_keys.c.service_account_id == owner.id)
            .where(api_keys.c.revoked_at.is_(None), *where)
            .order_by(api_keys.c.created_at, api_keys.c.id)
        )
        async with self.store.engine.connect() as connection:
            rows = [row._mapping for row in await connection.execute(query)]
        return [_project_key(row) for row in rows]


def _account(row: Mapping[Any, Any]) -> ServiceAccountRecord:
    return ServiceAccountRecord(
        row["id"],
        row["project_id"],
        row["name"],
        row["role"],
        row["created_at"],
        row["deleted_at"],
        stored_policy(row["policy"], f"service account {row['id']}"),
    )


def _project_key(row: Mapping[Any, Any]) -> ProjectKeyRecord:
    key = key_record(row)
    owner = None
    if row["service_account_id"] is not None:
        owner = ServiceAccountRecord(
            row["service_account_id"],
            row["project_id"],
            row["owner_name"],
            row["owner_role"],
            row["owner_created_at"],
            None,
            key.policy,
        )
    return ProjectKeyRecord(key, row["last_used_at"], owner)
