"""What the Admin API changes in the store: service accounts and their keys, a project's keys,
its rate limits by model, and its policy (model permissions, spend limit, limits).

Lists come in pages of OpenAI's kind: in creation order, after (or before) an object's id.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Literal, Protocol, TypeVar

from sqlalchemy import ColumnElement, Insert, Table, and_, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite

from ...config import Policy
from .. import (
    KeyRecord,
    ProjectRecord,
    Store,
    StoreError,
    dump_policy,
    key_record,
    new_secret,
    project_record,
    stored_policy,
)
from ..schema import api_keys, project_rate_limits, projects, service_accounts

RATE_LIMIT_PREFIX = "rl-"  # OpenAI's rate limit ids: "rl-" and the model, "rl-gpt-image-1"


class NotFound(StoreError):
    """An id that names nothing there is."""

    def __init__(self, kind: str, id: str) -> None:
        super().__init__(f"No {kind} found with id '{id}'.")


class BadCursor(StoreError):
    """A page cursor (`param`: "after" or "before") that names nothing listed."""

    def __init__(self, param: str, value: str) -> None:
        super().__init__(f"No object with id '{value}' to page from.")
        self.param = param


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


@dataclass(frozen=True, slots=True)
class RateLimitRecord:
    model: str
    max_requests_per_1_minute: int | None
    max_images_per_1_minute: int | None

    @property
    def id(self) -> str:
        return RATE_LIMIT_PREFIX + self.model


class _Identified(Protocol):
    @property
    def id(self) -> str: ...


_T = TypeVar("_T", bound=_Identified)


@dataclass(frozen=True, slots=True)
class Page(Generic[_T]):
    items: list[_T]
    has_more: bool


def paginate(
    items: Sequence[_T], limit: int, *, after: str | None = None, before: str | None = None
) -> Page[_T]:
    """The `limit` items right after `after` (or, given `before`, right before it)."""
    ids = [item.id for item in items]
    start, end = 0, len(items)
    for param, cursor in (("after", after), ("before", before)):
        if cursor is not None and cursor not in ids:
            raise BadCursor(param, cursor)
    if after is not None:
        start = ids.index(after) + 1
    if before is not None:
        end = ids.index(before)
        first = max(start, end - limit)
        return Page(list(items[first:end]), first > start)
    return Page(list(items[start : start + limit]), start + limit < end)


def model_of(rate_limit_id: str) -> str:
    """The model a rate limit id ("rl-gpt-image-1") is for."""
    model = rate_limit_id.removeprefix(RATE_LIMIT_PREFIX)
    if model == rate_limit_id or _MODEL.fullmatch(model) is None:
        raise NotFound("rate limit", rate_limit_id)
    return model


# What the store's ids and model names can be. Anything else names nothing, and is not asked
# of the database, where some (a NUL, for PostgreSQL) would be an error instead of a "no".
_ID = re.compile(r"[A-Za-z0-9_-]{1,40}")
_MODEL = re.compile(r"[^\x00-\x1f]{1,200}")


def _id(value: str, kind: str) -> str:
    if _ID.fullmatch(value) is None:
        raise NotFound(kind, value)
    return value


class Admin:
    """The Admin API's operations on `store`'s tables."""

    def __init__(self, store: Store, models: Sequence[str] = ()) -> None:
        self.store = store
        self.models = models  # what the gateway serves: each has a rate limit to list

    def _now(self) -> int:
        return self.store.now()

    # --- projects ----------------------------------------------------------------------

    async def create_project(self, name: str, policy: Policy | None = None) -> ProjectRecord:
        return await self.store.create_project(name, policy)

    async def projects(
        self, limit: int, *, after: str | None = None, include_archived: bool = False
    ) -> Page[ProjectRecord]:
        query = select(projects).order_by(projects.c.created_at, projects.c.id)
        if not include_archived:
            query = query.where(projects.c.archived_at.is_(None))
        async with self.store.engine.connect() as connection:
            found = [project_record(row._mapping) for row in await connection.execute(query)]
        return paginate(found, limit, after=after)

    async def project(self, project_id: str) -> ProjectRecord:
        """The project with id `project_id` (never a name: the API speaks in ids)."""
        async with self.store.engine.connect() as connection:
            query = select(projects).where(projects.c.id == _id(project_id, "project"))
            row = (await connection.execute(query)).first()
        if row is None:
            raise NotFound("project", project_id)
        return project_record(row._mapping)

    async def _active(self, project_id: str) -> ProjectRecord:
        project = await self.project(project_id)
        if project.archived_at is not None:
            raise StoreError(f"Project '{project_id}' is archived and cannot be changed.")
        return project

    async def modify_project(
        self, project_id: str, *, name: str | None = None, limits: Mapping[str, Any] | None = None
    ) -> ProjectRecord:
        """Rename the project and change its policy's fields in `limits` (None removes one)."""
        project = await self._active(project_id)
        values: dict[str, Any] = {}
        if name is not None and name != project.name:
            await self._check_name_free(name)
            values["name"] = name
        if limits:
            values["policy"] = _changed(project.policy, limits)
        if values:
            async with self.store.engine.begin() as connection:
                await connection.execute(
                    update(projects).where(projects.c.id == project_id).values(**values)
                )
        return await self.project(project_id)

    async def _check_name_free(self, name: str) -> None:
        query = select(projects.c.id).where(
            projects.c.name == name, projects.c.archived_at.is_(None)
        )
        async with self.store.engine.connect() as connection:
            if (await connection.execute(query)).first() is not None:
                raise StoreError(f"a project named {name!r} exists already")

    async def archive_project(self, project_id: str) -> ProjectRecord:
        """Archive the project (its keys stop working); archiving it again changes nothing."""
        project = await self.project(project_id)
        if project.archived_at is not None:
            return project
        return await self.store.archive_project(project.id)

    async def set_model_permissions(
        self, project_id: str, mode: Literal["allow_list", "deny_list"], model_ids: Sequence[str]
    ) -> ProjectRecord:
        """Allow only `model_ids` (the policy's `models`), or all but them (`denied_models`)."""
        listed = frozenset(model_ids)
        if mode == "allow_list":
            return await self._change_policy(project_id, models=listed, denied_models=None)
        return await self._change_policy(project_id, models=None, denied_models=listed)

    async def delete_model_permissions(self, project_id: str) -> ProjectRecord:
        return await self._change_policy(project_id, models=None, denied_models=None)

    async def set_spend_limit(self, project_id: str, cents: int) -> ProjectRecord:
        """A monthly budget of `cents` for the project's keys together."""
        return await self._change_policy(project_id, budget_usd=cents / 100, budget_period="month")

    async def delete_spend_limit(self, project_id: str) -> ProjectRecord:
        return await self._change_policy(project_id, budget_usd=None, budget_period=None)

    async def _change_policy(self, project_id: str, **changes: Any) -> ProjectRecord:
        return await self.modify_project(project_id, limits=changes)

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
            service_accounts.c.id == _id(account_id, "service account"),
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
        key_id = _id(key_id, "API key")
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

    # --- rate limits by model ----------------------------------------------------------

    async def rate_limits(
        self, project_id: str, limit: int, *, after: str | None = None, before: str | None = None
    ) -> Page[RateLimitRecord]:
        """The project's rate limits, by model name: one for each model the gateway serves
        that the project may use (unlimited where nothing is set), and each one set."""
        project = await self.project(project_id)
        query = select(project_rate_limits).where(project_rate_limits.c.project_id == project_id)
        async with self.store.engine.connect() as connection:
            found = {
                row.model: _rate_limit(row._mapping) for row in await connection.execute(query)
            }
        for model in self.models:
            if model not in found and project.policy.allows(model):
                found[model] = RateLimitRecord(model, None, None)
        listed = [found[model] for model in sorted(found)]
        return paginate(listed, limit, after=after, before=before)

    async def rate_limits_set(self) -> dict[str, list[RateLimitRecord]]:
        """Every project's per-model rate limits that limit something, by project id, in
        one query (for the console)."""
        query = select(project_rate_limits).order_by(
            project_rate_limits.c.project_id, project_rate_limits.c.model
        )
        found: dict[str, list[RateLimitRecord]] = {}
        async with self.store.engine.connect() as connection:
            for row in await connection.execute(query):
                record = _rate_limit(row._mapping)
                if record.max_requests_per_1_minute or record.max_images_per_1_minute:
                    found.setdefault(row.project_id, []).append(record)
        return found

    async def update_rate_limit(
        self, project_id: str, model: str, changes: Mapping[str, int | None]
    ) -> RateLimitRecord:
        """Set the fields in `changes` (`max_requests_per_1_minute`,
        `max_images_per_1_minute`; None: unlimited) of `model`'s limit, made if need be."""
        await self._active(project_id)
        row = {
            "project_id": project_id,
            "model": model,
            "max_requests_per_1_minute": None,
            "max_images_per_1_minute": None,
            **changes,
        }
        async with self.store.engine.begin() as connection:
            await connection.execute(_upsert(self.store.engine.dialect.name, row, changes))
            found = await connection.execute(
                select(project_rate_limits).where(
                    project_rate_limits.c.project_id == project_id,
                    project_rate_limits.c.model == model,
                )
            )
            return _rate_limit(found.one()._mapping)


def _upsert(dialect: str, row: Mapping[str, Any], changes: Mapping[str, Any]) -> Insert:
    """Insert `row`, or set `changes` on the row with its primary key: one statement, so two
    admins setting the same model's limit at once do not collide."""
    insert_: Callable[[Table], postgresql.Insert | sqlite.Insert]
    insert_ = postgresql.insert if dialect == "postgresql" else sqlite.insert
    statement = insert_(project_rate_limits).values(**row)
    keys = [project_rate_limits.c.project_id, project_rate_limits.c.model]
    if changes:
        return statement.on_conflict_do_update(index_elements=keys, set_=dict(changes))
    return statement.on_conflict_do_nothing(index_elements=keys)


def _changed(policy: Policy, changes: Mapping[str, Any]) -> dict[str, Any]:
    """`policy` with `changes` made (None removes a field), as the store keeps it."""
    fields = {**policy.model_dump(exclude_unset=True), **changes}
    return dump_policy(Policy.model_validate({k: v for k, v in fields.items() if v is not None}))


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


def _rate_limit(row: Mapping[Any, Any]) -> RateLimitRecord:
    return RateLimitRecord(
        row["model"], row["max_requests_per_1_minute"], row["max_images_per_1_minute"]
    )
