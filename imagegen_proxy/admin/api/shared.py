"""What the Admin API's resources share: the base of request bodies and list queries, the
text they take, reading them, the parts of answers (limits, a deletion, a list), and
`Resource`, one path's handlers by method, which answers a refusal in OpenAI's envelope."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import Annotated, Any, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import Receive, Scope, Send

from ...config import Policy
from ...store import StoreError
from ...store.admin import Admin, BadCursor, NotFound, Page
from ...wire.errors import ProxyError

PROJECT = "/projects/{project_id}"  # one project's path, where most routes start

# --- what requests carry -----------------------------------------------------------------


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def _plain(value: str) -> str:
    if any(ord(c) < 0x20 for c in value):  # a NUL is an error in PostgreSQL
        raise ValueError("must not contain control characters")
    return value


# Text the store keeps, in columns of 200 characters. An account's key is named
# "<name> (<account id>)": 160 leaves it room.
Name = Annotated[str, Field(min_length=1, max_length=200), AfterValidator(_plain)]
AccountName = Annotated[str, Field(min_length=1, max_length=160), AfterValidator(_plain)]


class ListQuery(BaseModel):
    model_config = ConfigDict(frozen=True)  # query strings: "20" is 20, "true" is True

    limit: int = Field(20, ge=1, le=100)
    after: str | None = None


_M = TypeVar("_M", bound=BaseModel)


async def parsed_body(request: Request, model: type[_M]) -> _M:
    return model.model_validate_json(await request.body())


def parsed_query(request: Request, model: type[_M]) -> _M:
    return model.model_validate(dict(request.query_params))


def project_id(request: Request) -> str:
    found: str = request.path_params["project_id"]
    return found


# --- what answers carry --------------------------------------------------------------------


def limits_field(policy: Policy) -> dict[str, Any]:
    """The `limits` of an answer: the policy's fields that are set, lists sorted."""
    fields = policy.model_dump(mode="json", exclude_unset=True)
    return {k: sorted(v) if isinstance(v, list) else v for k, v in fields.items()}


def deleted(kind: str, id: str | None = None) -> dict[str, Any]:
    return {"object": f"{kind}.deleted", "deleted": True} | ({} if id is None else {"id": id})


def listing(page: Page[Any], render: Callable[[Any], dict[str, Any]]) -> dict[str, Any]:
    """OpenAI's list object of `page`, each item rendered by `render`."""
    data = [render(item) for item in page.items]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": page.has_more,
    }


# --- the endpoints -------------------------------------------------------------------------


class Endpoints:
    """One method per SDK call, each taking the request and returning the JSON answer."""

    def __init__(self, admin: Admin) -> None:
        self.admin = admin


_Handler = Callable[[Request], Awaitable[dict[str, Any]]]


class Resource:
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
