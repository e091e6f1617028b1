"""OpenAI's usage and costs API over the ledger: `GET /organization/usage/images` and
`GET /organization/costs`, in the shapes `OpenAI(admin_api_key=...).admin.organization.usage`
parses.

`usage_routes(store)` are Starlette routes relative to `/organization`; whoever mounts them
checks the admin key. List parameters come as `group_by[]=a&group_by[]=b` (the SDK's form) or
`group_by=a&group_by=b`. What the proxy has no notion of is said plainly: `user_id` groups
are null, and a `user_ids` filter is refused.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from typing import Any, Literal, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from sqlalchemy.exc import SQLAlchemyError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from ..store import Store
from ..store.ledger import UsageQueryError, costs, usage_images
from ..wire.errors import ProxyError, expect_method, server_error

logger = logging.getLogger("imagegen_proxy")
_LATEST = 2**40  # Unix seconds, some 30,000 years on: a bound no database column overflows


class _Query(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    start_time: int = Field(ge=0, lt=_LATEST)
    end_time: int | None = Field(None, ge=0, lt=_LATEST)
    limit: int | None = None
    page: str | None = None
    project_ids: list[str] = []
    api_key_ids: list[str] = []
    user_ids: list[str] = []

    bucket_width: str  # each query's own choices
    group_by: Sequence[str]

    @field_validator("user_ids")
    @classmethod
    def _no_users(cls, value: list[str]) -> list[str]:
        if value:
            raise ValueError("this gateway has no users: filter by project_ids or api_key_ids")
        return value

    def arguments(self) -> dict[str, Any]:
        """The keyword arguments of the ledger's `usage_images` or `costs`."""
        return {
            "start": self.start_time,
            "end": self.end_time,
            "bucket_width": self.bucket_width,
            "group_by": self.group_by,
            "filters": self.filters(),
            "limit": self.limit,
            "page": self.page,
        }

    def filters(self) -> dict[str, list[str]]:
        return {"project_id": self.project_ids, "api_key_id": self.api_key_ids}


class ImagesQuery(_Query):
    """The query of `GET /organization/usage/images`."""

    bucket_width: Literal["1m", "1h", "1d"] = "1d"
    group_by: list[Literal["project_id", "user_id", "api_key_id", "model", "size", "source"]] = []
    models: list[str] = []
    sizes: list[str] = []
    sources: list[Literal["image.generation", "image.edit", "image.variation"]] = []

    def filters(self) -> dict[str, list[str]]:
        found: dict[str, list[str]] = {
            "model": self.models,
            "size": self.sizes,
            "source": list(self.sources),
        }
        return {**super().filters(), **found}


class CostsQuery(_Query):
    """The query of `GET /organization/costs`."""

    bucket_width: Literal["1d"] = "1d"
    group_by: list[Literal["project_id", "user_id", "line_item", "api_key_id", "api_source"]] = []
    line_items: list[str] = []

    def filters(self) -> dict[str, list[str]]:
        return {**super().filters(), "line_item": self.line_items}


def usage_routes(store: Store) -> list[BaseRoute]:
    """`/usage/images` and `/costs` (GET), to mount under `/organization`."""
    return [
        # Every method reaches the endpoint, so that a wrong one is refused in OpenAI's words.
        Route("/usage/images", _endpoint(store, ImagesQuery, usage_images), methods=_ANY),
        Route("/costs", _endpoint(store, CostsQuery, costs), methods=_ANY),
    ]


_ANY = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


def _endpoint(
    store: Store, model: type[_Query], report: Callable[..., Awaitable[dict[str, Any]]]
) -> Callable[[Request], Awaitable[Response]]:
    fields = model.model_fields.items()
    lists = {name for name, field in fields if get_origin(field.annotation) is list}

    async def endpoint(request: Request) -> Response:
        try:
            expect_method(request.scope, "GET")
            query = model.model_validate(_params(request, lists))
            page = await report(store, **query.arguments())
        except ProxyError as exc:
            return _refuse(exc)
        except ValidationError as exc:
            return _refuse(_invalid(exc))
        except UsageQueryError as exc:
            return _refuse(ProxyError(400, str(exc), param=exc.param, code="invalid_value"))
        except (SQLAlchemyError, OSError) as exc:
            logger.warning("usage query failed: %s", type(exc).__name__)
            return _refuse(
                server_error(503, "The usage store is unreachable.", "store_unavailable")
            )
        return JSONResponse(page)

    return endpoint


def _params(request: Request, lists: Collection[str]) -> Mapping[str, Any]:
    """The query string as the model reads it: `name[]` and repeated `name` make lists."""
    params = request.query_params
    names = dict.fromkeys(key.removesuffix("[]") for key in params)
    return {
        name: [*params.getlist(name), *params.getlist(name + "[]")]
        if name in lists
        else params[name]
        for name in names
        if name in params or name in lists
    }


def _invalid(exc: ValidationError) -> ProxyError:
    """The first of pydantic's complaints, said the way OpenAI says it."""
    error = exc.errors(include_url=False, include_input=False)[0]
    param = str(error["loc"][0]) if error["loc"] else None
    if error["type"] == "missing":
        message, code = f"Missing required parameter: '{param}'.", "missing_required_parameter"
    else:
        message = f"Invalid value for '{param}': {error['msg'].removeprefix('Value error, ')}."
        code = "invalid_value"
    return ProxyError(400, message, param=param, code=code)


def _refuse(error: ProxyError) -> Response:
    return JSONResponse(error.envelope(), error.status, headers=dict(error.headers))
