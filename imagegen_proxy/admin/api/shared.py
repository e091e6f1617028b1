"""OpenAI's Admin API over the store: projects, their service accounts, keys, rate limits,
model permissions and spend limit, in the shapes `OpenAI(admin_api_key=...).admin` parses.

`admin_routes(store)` are Starlette routes relative to `/organization`; whoever mounts them
checks the admin key. What the gateway adds to OpenAI's objects travels in one extra field,
`limits` (a `config.Policy`), which the SDK sends with `extra_body` and ignores in answers.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Annotated, Any, Literal, Self, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Route
from starlette.types import Receive, Scope, Send

from ...config import Policy
from ...store import KeyRecord, ProjectRecord, Store, StoreError
from ...store.admin import (
    Admin,
    BadCursor,
    NotFound,
    Page,
    ProjectKeyRecord,
    RateLimitRecord,
    ServiceAccountRecord,
    model_of,
)
from ...wire.errors import ProxyError

# --- what requests carry -----------------------------------------------------------------


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def _plain(value: str) -> str:
    if any(ord(c) < 0x20 for c in value):  # a NUL is an error in PostgreSQL
        raise ValueError("must not contain control characters")
    return value


# Text the store keeps, in columns of 200 characters. An account's key is named
# "<name> (<account id>)": 160 leaves it room.
_Name = Annotated[str, Field(min_length=1, max_length=200), AfterValidator(_plain)]
_AccountName = Annotated[str, Field(min_length=1, max_length=160), AfterValidator(_plain)]


class _ProjectCreate(_Body):
    name: _Name
    limits: Policy | None = None


class _ProjectModify(_Body):
    name: _Name | None = None
    limits: Policy | None = None  # the fields given change; a null removes one


class _ServiceAccountCreate(_Body):
    name: _AccountName
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


class _RateLimitUpdate(_Body):
    max_requests_per_1_minute: int | None = Field(None, ge=1, le=2**53)  # null: unlimited
    max_images_per_1_minute: int | None = Field(None, ge=1, le=2**53)  # as any Policy count


class _ModelPermissions(_Body):
    mode: Literal["allow_list", "deny_list"]
    model_ids: list[_Name]


class _SpendLimit(_Body):
    currency: Literal["USD"]
    interval: Literal["month"]
    threshold_amount: int = Field(ge=1, le=10**11)  # cents, up to a budget's $1e9


class _ListQuery(BaseModel):
    model_config = ConfigDict(frozen=True)  # query strings: "20" is 20, "true" is True

    limit: int = Field(20, ge=1, le=100)
    after: str | None = None


class _ProjectsQuery(_ListQuery):
    include_archived: bool = False


class _KeysQuery(_ListQuery):
    owner_project_access: Literal["active", "inactive", "any"] | None = None


class _RateLimitsQuery(_ListQuery):
    before: str | None = None


_M = TypeVar("_M", bound=BaseModel)


async def _body(request: Request, model: type[_M]) -> _M:
    return model.model_validate_json(await request.body())


def _query(request: Request, model: type[_M]) -> _M:
    return model.model_validate(dict(request.query_params))


# --- what answers carry --------------------------------------------------------------------


def _limits(policy: Policy) -> dict[str, Any]:
    fields = policy.model_dump(mode="json", exclude_unset=True)
    return {k: sorted(v) if isinstance(v, list) else v for k, v in fields.items()}


def _project(project: ProjectRecord) -> dict[str, Any]:
    return {
        "id": project.id,
        "object": "organization.project",
        "name": project.name,
        "created_at": project.created_at,
        "archived_at": project.archived_at,
        "status": "active" if project.archived_at is None else "archived",
        "limits": _limits(project.policy),
    }


def _service_account(account: ServiceAccountRecord) -> dict[str, Any]:
    return {
        "id": account.id,
        "object": "organization.project.service_account",
        "name": account.name,
        "role": account.role,
        "created_at": account.created_at,
        "limits": _limits(account.policy),
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


def _rate_limit(limit: RateLimitRecord) -> dict[str, Any]:
    return {
        "id": limit.id,
        "object": "project.rate_limit",
        "model": limit.model,
        "max_requests_per_1_minute": limit.max_requests_per_1_minute,
        "max_images_per_1_minute": limit.max_images_per_1_minute,
        "max_tokens_per_1_minute": None,  # the gateway counts no tokens per minute
    }


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


def _deleted(kind: str, id: str | None = None) -> dict[str, Any]:
    return {"object": f"{kind}.deleted", "deleted": True} | ({} if id is None else {"id": id})


def _list(page: Page[Any], render: Callable[[Any], dict[str, Any]]) -> dict[str, Any]:
    data = [render(item) for item in page.items]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": page.has_more,
    }


# --- the endpoints -------------------------------------------------------------------------


class _Endpoints:
    """One method per SDK call, each taking the request and returning the JSON answer."""

    def __init__(self, admin: Admin) -> None:
        self.admin = admin

    async def create_project(self, request: Request) -> dict[str, Any]:
        body = await _body(request, _ProjectCreate)
        return _project(await self.admin.create_project(body.name, body.limits))

    async def list_projects(self, request: Request) -> dict[str, Any]:
        query = _query(request, _ProjectsQuery)
        page = await self.admin.projects(
            query.limit, after=query.after, include_archived=query.include_archived
        )
        return _list(page, _project)

    async def retrieve_project(self, request: Request) -> dict[str, Any]:
        return _project(await self.admin.project(_project_id(request)))

    async def modify_project(self, request: Request) -> dict[str, Any]:
        body = await _body(request, _ProjectModify)
        limits = None if body.limits is None else body.limits.model_dump(exclude_unset=True)
        project = await self.admin.modify_project(
            _project_id(request), name=body.name, limits=limits
        )
        return _project(project)

    async def archive_project(self, request: Request) -> dict[str, Any]:
        return _project(await self.admin.archive_project(_project_id(request)))

    async def create_service_account(self, request: Request) -> dict[str, Any]:
        body = await _body(request, _ServiceAccountCreate)
        account, key, secret = await self.admin.create_service_account(
            _project_id(request),
            body.name,
            with_key=not body.create_service_account_only,
            expires_in=body.expires_in_seconds,
            policy=body.limits,
        )
        new_key = None if key is None or secret is None else _new_key(key, secret)
        return _service_account(account) | {"api_key": new_key}

    async def list_service_accounts(self, request: Request) -> dict[str, Any]:
        query = _query(request, _ListQuery)
        page = await self.admin.service_accounts(
            _project_id(request), query.limit, after=query.after
        )
        return _list(page, _service_account)

    async def retrieve_service_account(self, request: Request) -> dict[str, Any]:
        account_id = request.path_params["service_account_id"]
        return _service_account(await self.admin.service_account(_project_id(request), account_id))

    async def delete_service_account(self, request: Request) -> dict[str, Any]:
        account_id = request.path_params["service_account_id"]
        await self.admin.delete_service_account(_project_id(request), account_id)
        return _deleted("organization.project.service_account", account_id)

    async def list_keys(self, request: Request) -> dict[str, Any]:
        query = _query(request, _KeysQuery)
        page = await self.admin.project_keys(_project_id(request), query.limit, after=query.after)
        if query.owner_project_access == "inactive":  # every listed key's owner has access
            page = Page([], False)
        return _list(page, _project_key)

    async def retrieve_key(self, request: Request) -> dict[str, Any]:
        key_id = request.path_params["api_key_id"]
        return _project_key(await self.admin.project_key(_project_id(request), key_id))

    async def delete_key(self, request: Request) -> dict[str, Any]:
        key_id = request.path_params["api_key_id"]
        await self.admin.delete_project_key(_project_id(request), key_id)
        return _deleted("organization.project.api_key", key_id)

    async def list_rate_limits(self, request: Request) -> dict[str, Any]:
        query = _query(request, _RateLimitsQuery)
        page = await self.admin.rate_limits(
            _project_id(request), query.limit, after=query.after, before=query.before
        )
        return _list(page, _rate_limit)

    async def update_rate_limit(self, request: Request) -> dict[str, Any]:
        model = model_of(request.path_params["rate_limit_id"])
        body = await _body(request, _RateLimitUpdate)
        changes = body.model_dump(exclude_unset=True)
        return _rate_limit(await self.admin.update_rate_limit(_project_id(request), model, changes))

    async def retrieve_model_permissions(self, request: Request) -> dict[str, Any]:
        return _model_permissions((await self.admin.project(_project_id(request))).policy)

    async def update_model_permissions(self, request: Request) -> dict[str, Any]:
        body = await _body(request, _ModelPermissions)
        project = await self.admin.set_model_permissions(
            _project_id(request), body.mode, body.model_ids
        )
        return _model_permissions(project.policy)

    async def delete_model_permissions(self, request: Request) -> dict[str, Any]:
        await self.admin.delete_model_permissions(_project_id(request))
        return _deleted("project.model_permissions")

    async def retrieve_spend_limit(self, request: Request) -> dict[str, Any]:
        return _spend_limit((await self.admin.project(_project_id(request))).policy)

    async def update_spend_limit(self, request: Request) -> dict[str, Any]:
        body = await _body(request, _SpendLimit)
        project = await self.admin.set_spend_limit(_project_id(request), body.threshold_amount)
        return _spend_limit(project.policy)

    async def delete_spend_limit(self, request: Request) -> dict[str, Any]:
        await self.admin.delete_spend_limit(_project_id(request))
        return _deleted("project.spend_limit")

    async def retrieve_organization_spend_limit(self, request: Request) -> dict[str, Any]:
        return _spend_limit(await self.admin.store.organization() or Policy(), "organization")

    async def update_organization_spend_limit(self, request: Request) -> dict[str, Any]:
        body = await _body(request, _SpendLimit)
        policy = Policy(budget_usd=body.threshold_amount / 100, budget_period="month")
        await self.admin.store.set_organization(policy)
        return _spend_limit(policy, "organization")

    async def delete_organization_spend_limit(self, request: Request) -> dict[str, Any]:
        await self.admin.store.set_organization(None)
        return _deleted("organization.spend_limit")


def _project_id(request: Request) -> str:
    project_id: str = request.path_params["project_id"]
    return project_id


def admin_routes(store: Store, models: Sequence[str] = ()) -> list[BaseRoute]:
    """The Admin API's routes for `store`, relative to `/organization`; `models` are those
    the gateway serves (a project lists a rate limit for each)."""
    api = _Endpoints(Admin(store, models))
    project = "/projects/{project_id}"
    return [
        Route(
            "/spend_limit",
            _Resource(
                GET=api.retrieve_organization_spend_limit,
                POST=api.update_organization_spend_limit,
                DELETE=api.delete_organization_spend_limit,
            ),
        ),
        Route("/projects", _Resource(GET=api.list_projects, POST=api.create_project)),
        Route(project, _Resource(GET=api.retrieve_project, POST=api.modify_project)),
        Route(project + "/archive", _Resource(POST=api.archive_project)),
        Route(
            project + "/service_accounts",
            _Resource(GET=api.list_service_accounts, POST=api.create_service_account),
        ),
        Route(
            project + "/service_accounts/{service_account_id}",
            _Resource(GET=api.retrieve_service_account, DELETE=api.delete_service_account),
        ),
        Route(project + "/api_keys", _Resource(GET=api.list_keys)),
        Route(
            project + "/api_keys/{api_key_id}",
            _Resource(GET=api.retrieve_key, DELETE=api.delete_key),
        ),
        Route(project + "/rate_limits", _Resource(GET=api.list_rate_limits)),
        Route(project + "/rate_limits/{rate_limit_id}", _Resource(POST=api.update_rate_limit)),
        Route(
            project + "/model_permissions",
            _Resource(
                GET=api.retrieve_model_permissions,
                POST=api.update_model_permissions,
                DELETE=api.delete_model_permissions,
            ),
        ),
        Route(
            project + "/spend_limit",
            _Resource(
                GET=api.retrieve_spend_limit,
                POST=api.update_spend_limit,
                DELETE=api.delete_spend_limit,
            ),
        ),
    ]


_Handler = Callable[[Request], Awaitable[dict[str, Any]]]


class _Resource:
    """One path's handlers by method (an ASGI app, so Starlette routes every method here):
    the answer as JSON, or a refusal in OpenAI's envelope, a 405 included."""

    def __init__(self, **handlers: _Handler) -> None:
        self.handlers = handlers
        self.allow = ", ".join(handlers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        handler = self.handlers.get(request.method)
        try:
            if handler is None:
                raise ProxyError(
                    405,
                    f"Method {request.method} not allowed: use {self.allow}.",
                    code="method_not_allowed",
                    headers=[("allow", self.allow)],
                )
            response = JSONResponse(await handler(request))
        except (ProxyError, StoreError, ValidationError) as exc:
            error = _refusal(exc)
            headers = dict(error.headers)
            response = JSONResponse(error.envelope(), error.status, headers=headers)
        await response(scope, receive, send)


def _refusal(exc: ProxyError | StoreError | ValidationError) -> ProxyError:
    """The OpenAI-shaped answer to a request the API turns down."""
    if isinstance(exc, ProxyError):
        return exc
    if isinstance(exc, NotFound):
        return ProxyError(404, str(exc))
    if isinstance(exc, BadCursor):
        return ProxyError(400, str(exc), param=exc.param)
    if isinstance(exc, StoreError):
        return ProxyError(400, str(exc))
    return _invalid(exc.errors(include_url=False))


def _invalid(errors: Iterable[Any]) -> ProxyError:
    """The first of pydantic's `errors`, said the way OpenAI says it."""
    error = next(iter(errors))
    param = ".".join(str(part) for part in error["loc"]) or None
    kind = error["type"]
    if kind == "json_invalid":
        message = "We could not parse the JSON body of your request."
    elif kind == "missing":
        message = f"Missing required parameter: '{param}'."
    elif kind == "extra_forbidden":
        message = f"Unrecognized request argument supplied: {param}"
    else:
        reason = str(error["ctx"]["error"]) if kind == "value_error" else error["msg"]
        message = f"Invalid value for '{param}': {reason}." if param else reason
    return ProxyError(400, message, param=param)
