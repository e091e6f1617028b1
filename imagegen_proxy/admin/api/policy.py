"""The Admin API's view of a policy: a project's model permissions, and the spend limit of a
project or of the organization."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field
from starlette.requests import Request
from starlette.routing import BaseRoute, Route

from ...config import Policy
from ...store.admin import Admin
from .shared import PROJECT, Body, Endpoints, Name, Resource, deleted, parsed_body, project_id


class _ModelPermissions(Body):
    mode: Literal["allow_list", "deny_list"]
    model_ids: list[Name]


class _SpendLimit(Body):
    currency: Literal["USD"]
    interval: Literal["month"]
    threshold_amount: int = Field(ge=1, le=10**11)  # cents, up to a budget's $1e9


def _model_permissions(policy: Policy) -> dict[str, Any]:
    # Nothing set reads as a deny-list of nothing: every model allowed.
    if policy.models is not None:
        mode, listed = "allow_list", policy.models
    else:
        mode, listed = "deny_list", policy.denied_models or frozenset()
    return {"object": "project.model_permissions", "mode": mode, "model_ids": sorted(listed)}


def _spend_limit(policy: Policy, holder: str = "project") -> dict[str, Any]:
    budget = policy.budget_usd
    return {
        "object": f"{holder}.spend_limit",
        "threshold_amount": 0 if budget is None else round(budget * 100),
        "currency": "USD",
        "interval": policy.budget_period,
        "enforcement": {"status": "inactive" if budget is None else "enforcing"},
    }


class _Endpoints(Endpoints):
    async def retrieve_model_permissions(self, request: Request) -> dict[str, Any]:
        return _model_permissions((await self.admin.project(project_id(request))).policy)

    async def update_model_permissions(self, request: Request) -> dict[str, Any]:
        body = await parsed_body(request, _ModelPermissions)
        project = await self.admin.set_model_permissions(
            project_id(request), body.mode, body.model_ids
        )
        return _model_permissions(project.policy)

    async def delete_model_permissions(self, request: Request) -> dict[str, Any]:
        await self.admin.delete_model_permissions(project_id(request))
        return deleted("project.model_permissions")

    async def retrieve_spend_limit(self, request: Request) -> dict[str, Any]:
        return _spend_limit((await self.admin.project(project_id(request))).policy)

    async def update_spend_limit(self, request: Request) -> dict[str, Any]:
        body = await parsed_body(request, _SpendLimit)
        project = await self.admin.set_spend_limit(project_id(request), body.threshold_amount)
        return _spend_limit(project.policy)

    async def delete_spend_limit(self, request: Request) -> dict[str, Any]:
        await self.admin.delete_spend_limit(project_id(request))
        return deleted("project.spend_limit")

    async def retrieve_organization_spend_limit(self, request: Request) -> dict[str, Any]:
        return _spend_limit(await self.admin.store.organization() or Policy(), "organization")

    async def update_organization_spend_limit(self, request: Request) -> dict[str, Any]:
        body = await parsed_body(request, _SpendLimit)
        policy = Policy(budget_usd=body.threshold_amount / 100, budget_period="month")
        await self.admin.store.set_organization(policy)
        return _spend_limit(policy, "organization")

    async def delete_organization_spend_limit(self, request: Request) -> dict[str, Any]:
        await self.admin.store.set_organization(None)
        return deleted("organization.spend_limit")


def organization_routes(admin: Admin) -> list[BaseRoute]:
    api = _Endpoints(admin)
    return [
        Route(
            "/spend_limit",
            Resource(
                GET=api.retrieve_organization_spend_limit,
                POST=api.update_organization_spend_limit,
                DELETE=api.delete_organization_spend_limit,
            ),
        ),
    ]


def project_routes(admin: Admin) -> list[BaseRoute]:
    api = _Endpoints(admin)
    return [
        Route(
            PROJECT + "/model_permissions",
            Resource(
                GET=api.retrieve_model_permissions,
                POST=api.update_model_permissions,
                DELETE=api.delete_model_permissions,
            ),
        ),
        Route(
            PROJECT + "/spend_limit",
            Resource(
                GET=api.retrieve_spend_limit,
                POST=api.update_spend_limit,
                DELETE=api.delete_spend_limit,
            ),
        ),
    ]
