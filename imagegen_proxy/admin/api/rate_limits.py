"""The Admin API's rate limits of a project, one per model: listed and updated."""

from __future__ import annotations

from typing import Any

from pydantic import Field
from starlette.requests import Request
from starlette.routing import BaseRoute, Route

from ...store.admin import Admin, RateLimitRecord, model_of
from .shared import (
    PROJECT,
    Body,
    Endpoints,
    ListQuery,
    Resource,
    listing,
    parsed_body,
    parsed_query,
    project_id,
)


class _RateLimitUpdate(Body):
    max_requests_per_1_minute: int | None = Field(None, ge=1, le=2**53)  # null: unlimited
    max_images_per_1_minute: int | None = Field(None, ge=1, le=2**53)  # as any Policy count


class _RateLimitsQuery(ListQuery):
    before: str | None = None


def _rate_limit(limit: RateLimitRecord) -> dict[str, Any]:
    return {
        "id": limit.id,
        "object": "project.rate_limit",
        "model": limit.model,
        "max_requests_per_1_minute": limit.max_requests_per_1_minute,
        "max_images_per_1_minute": limit.max_images_per_1_minute,
        "max_tokens_per_1_minute": None,  # the gateway counts no tokens per minute
    }


class _Endpoints(Endpoints):
    async def list_rate_limits(self, request: Request) -> dict[str, Any]:
        query = parsed_query(request, _RateLimitsQuery)
        page = await self.admin.rate_limits(
            project_id(request), query.limit, after=query.after, before=query.before
        )
        return listing(page, _rate_limit)

    async def update_rate_limit(self, request: Request) -> dict[str, Any]:
        model = model_of(request.path_params["rate_limit_id"])
        body = await parsed_body(request, _RateLimitUpdate)
        changes = body.model_dump(exclude_unset=True)
        return _rate_limit(await self.admin.update_rate_limit(project_id(request), model, changes))


def routes(admin: Admin) -> list[BaseRoute]:
    api = _Endpoints(admin)
    return [
        Route(PROJECT + "/rate_limits", Resource(GET=api.list_rate_limits)),
        Route(PROJECT + "/rate_limits/{rate_limit_id}", Resource(POST=api.update_rate_limit)),
    ]
