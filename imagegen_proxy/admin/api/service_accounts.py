"""The Admin API's service accounts of a project (each with a key, unless asked not to) and
the project's API keys."""

from __future__ import annotations

from typing import Any, Literal, Self

from pydantic import Field, model_validator
from starlette.requests import Request
from starlette.routing import BaseRoute, Route

from ...config import Policy
from ...store import KeyRecord
from ...store.admin import Admin, Page, ProjectKeyRecord, ServiceAccountRecord
from .shared import (
    PROJECT,
    AccountName,
    Body,
    Endpoints,
    ListQuery,
    Resource,
    deleted,
    limits_field,
    listing,
    parsed_body,
    parsed_query,
    project_id,
)


class _ServiceAccountCreate(Body):
    name: AccountName
    create_service_account_only: bool | None = None
    expires_in_seconds: int | None = Field(None, ge=1, le=100 * 365 * 86400)
    limits: Policy | None = None  # the key's own

    @model_validator(mode="after")
    def _key_options_need_a_key(self) -> Self:
        if self.create_service_account_only and (
            self.expires_in_seconds is not None or self.limits is not None
        ):
            raise ValueError(
                "expires_in_seconds and limits apply to the account's key: they cannot be "
                "used with create_service_account_only"
            )
        return self


class _KeysQuery(ListQuery):
    owner_project_access: Literal["active", "inactive", "any"] | None = None


def _service_account(account: ServiceAccountRecord) -> dict[str, Any]:
    return {
        "id": account.id,
        "object": "organization.project.service_account",
        "name": account.name,
        "role": account.role,
        "created_at": account.created_at,
        "limits": limits_field(account.policy),
    }


def _new_key(key: KeyRecord, secret: str) -> dict[str, Any]:
    return {
        "id": key.id,
        "object": "organization.project.service_account.api_key",
        "name": key.name,
        "value": secret,
        "created_at": key.created_at,
        "expires_at": key.expires_at,
    }


def _project_key(found: ProjectKeyRecord) -> dict[str, Any]:
    owner: dict[str, Any] = {}  # a key made by the CLI has no owner OpenAI could name
    if found.owner is not None:
        account = found.owner
        owner = {
            "type": "service_account",
            "service_account": {
                "id": account.id,
                "name": account.name,
                "role": account.role,
                "created_at": account.created_at,
            },
        }
    return {
        "id": found.key.id,
        "object": "organization.project.api_key",
        "name": found.key.name,
        "redacted_value": found.key.redacted,
        "created_at": found.key.created_at,
        "expires_at": found.key.expires_at,
        "last_used_at": found.last_used_at,
        "owner": owner,
        "owner_project_access": "active",
    }


class _Endpoints(Endpoints):
    async def create_service_account(self, request: Request) -> dict[str, Any]:
        body = await parsed_body(request, _ServiceAccountCreate)
        account, key, secret = await self.admin.create_service_account(
            project_id(request),
            body.name,
            with_key=not body.create_service_account_only,
            expires_in=body.expires_in_seconds,
            policy=body.limits,
        )
        new_key = None if key is None or secret is None else _new_key(key, secret)
        return _service_account(account) | {"api_key": new_key}

    async def list_service_accounts(self, request: Request) -> dict[str, Any]:
        query = parsed_query(request, ListQuery)
        page = await self.admin.service_accounts(
            project_id(request), query.limit, after=query.after
        )
        return listing(page, _service_account)

    async def retrieve_service_account(self, request: Request) -> dict[str, Any]:
        account_id = request.path_params["service_account_id"]
        return _service_account(await self.admin.service_account(project_id(request), account_id))

    async def delete_service_account(self, request: Request) -> dict[str, Any]:
        account_id = request.path_params["service_account_id"]
        await self.admin.delete_service_account(project_id(request), account_id)
        return deleted("organization.project.service_account", account_id)

    async def list_keys(self, request: Request) -> dict[str, Any]:
        query = parsed_query(request, _KeysQuery)
        page = await self.admin.project_keys(project_id(request), query.limit, after=query.after)
        if query.owner_project_access == "inactive":  # every listed key's owner has access
            page = Page([], False)
        return listing(page, _project_key)

    async def retrieve_key(self, request: Request) -> dict[str, Any]:
        key_id = request.path_params["api_key_id"]
        return _project_key(await self.admin.project_key(project_id(request), key_id))

    async def delete_key(self, request: Request) -> dict[str, Any]:
        key_id = request.path_params["api_key_id"]
        await self.admin.delete_project_key(project_id(request), key_id)
        return deleted("organization.project.api_key", key_id)


def routes(admin: Admin) -> list[BaseRoute]:
    api = _Endpoints(admin)
    return [
        Route(
            PROJECT + "/service_accounts",
            Resource(GET=api.list_service_accounts, POST=api.create_service_account),
        ),
        Route(
            PROJECT + "/service_accounts/{service_account_id}",
            Resource(GET=api.retrieve_service_account, DELETE=api.delete_service_account),
        ),
        Route(PROJECT + "/api_keys", Resource(GET=api.list_keys)),
        Route(
            PROJECT + "/api_keys/{api_key_id}",
            Resource(GET=api.retrieve_key, DELETE=api.delete_key),
        ),
    ]
