"""The Admin API's projects: made, listed, retrieved, modified (name and limits), archived."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.routing import BaseRoute, Route

from ...config import Policy
from ...store import ProjectRecord
from ...store.admin import Admin
from .shared import (
    PROJECT,
    Body,
    Endpoints,
    ListQuery,
    Name,
    Resource,
    limits_field,
    listing,
    parsed_body,
    parsed_query,
    project_id,
)


class _ProjectCreate(Body):
    name: Name
    limits: Policy | None = None


class _ProjectModify(Body):
    name: Name | None = None
    limits: Policy | None = None  # the fields given change; a null removes one


class _ProjectsQuery(ListQuery):
    include_archived: bool = False


def _project(project: ProjectRecord) -> dict[str, Any]:
    return {
        "id": project.id,
        "object": "organization.project",
        "name": project.name,
        "created_at": project.created_at,
        "archived_at": project.archived_at,
        "status": "active" if project.archived_at is None else "archived",
        "limits": limits_field(project.policy),
    }


class _Endpoints(Endpoints):
    async def create_project(self, request: Request) -> dict[str, Any]:
        body = await parsed_body(request, _ProjectCreate)
        return _project(await self.admin.create_project(body.name, body.limits))

    async def list_projects(self, request: Request) -> dict[str, Any]:
        query = parsed_query(request, _ProjectsQuery)
        page = await self.admin.projects(
            query.limit, after=query.after, include_archived=query.include_archived
        )
        return listing(page, _project)

    async def retrieve_project(self, request: Request) -> dict[str, Any]:
        return _project(await self.admin.project(project_id(request)))

    async def modify_project(self, request: Request) -> dict[str, Any]:
        body = await parsed_body(request, _ProjectModify)
        limits = None if body.limits is None else body.limits.model_dump(exclude_unset=True)
        project = await self.admin.modify_project(
            project_id(request), name=body.name, limits=limits
        )
        return _project(project)

    async def archive_project(self, request: Request) -> dict[str, Any]:
        return _project(await self.admin.archive_project(project_id(request)))


def routes(admin: Admin) -> list[BaseRoute]:
    api = _Endpoints(admin)
    return [
        Route("/projects", Resource(GET=api.list_projects, POST=api.create_project)),
        Route(PROJECT, Resource(GET=api.retrieve_project, POST=api.modify_project)),
        Route(PROJECT + "/archive", Resource(POST=api.archive_project)),
    ]
