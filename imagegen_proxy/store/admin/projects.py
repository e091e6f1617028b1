"""Projects in the store, as the Admin API changes them: made, listed, renamed, archived, and
their policy (model permissions, spend limit, limits)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

from sqlalchemy import select, update

from ...config import Policy
from .. import ProjectRecord, Store, StoreError, dump_policy, project_record
from ..schema import projects
from .common import NotFound, Page, checked_id, paginate


class Projects:
    """The Admin API's operations on projects, and what its other parts stand on: the store,
    and the models the gateway serves."""

    def __init__(self, store: Store, models: Sequence[str] = ()) -> None:
        self.store = store
        self.models = models  # what the gateway serves: each has a rate limit to list

    def _now(self) -> int:
        return self.store.now()

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
            query = select(projects).where(projects.c.id == checked_id(project_id, "project"))
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


def _changed(policy: Policy, changes: Mapping[str, Any]) -> dict[str, Any]:
    """`policy` with `changes` made (None removes a field), as the store keeps it."""
    fields = {**policy.model_dump(exclude_unset=True), **changes}
    return dump_policy(Policy.model_validate({k: v for k, v in fields.items() if v is not None}))
