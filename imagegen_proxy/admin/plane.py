"""The admin plane: OpenAI's Admin API (the part that governs image keys), over the store.

`GET|POST .../v1/organization/...` (and without `/v1`, under the mount prefix) is what the
SDK's `OpenAI(admin_api_key=...).admin.organization` calls. Only the `[admin]` key opens it,
as `Authorization: Bearer`: a client key is refused with 401, as the admin key is on the
generation paths.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount

from ..governance.auth import is_admin, unauthorized
from ..types import Receive, Scope, Send
from ..wire.errors import ProxyError, send_error

if TYPE_CHECKING:
    from ..store import Store

ADMIN_PREFIXES = ("/v1/organization", "/organization")


class AdminPlane:
    """The admin key's check in front of the Admin API's routes (an ASGI app)."""

    def __init__(
        self,
        mount_prefix: str,
        admin_digest: bytes | None,
        store: Store | None,
        *,
        open: bool = False,
        models: Sequence[str] = (),
    ) -> None:
        self._digest = admin_digest
        self._open = open
        self._app: Starlette | None = None
        self._store = store
        if store is not None:
            from .api import admin_routes
            from .usage import usage_routes

            routes = [*admin_routes(store, models), *usage_routes(store)]
            mounts = [Mount(mount_prefix + prefix, routes=routes) for prefix in ADMIN_PREFIXES]
            self._app = Starlette(routes=mounts, exception_handlers={HTTPException: _not_found})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not (self._open or is_admin(scope, self._digest)):
            hint = "" if self._digest is not None else " (set [admin] key to use it)"
            await send_error(send, unauthorized(f"The admin API needs the admin key{hint}."))
            return
        if self._app is None:
            error = ProxyError(
                404,
                "The admin API needs a [store]: keys and projects live there.",
                code="not_found",
            )
            await send_error(send, error)
            return
        assert self._store is not None
        try:
            await self._store.ready()
        except Exception:
            error = ProxyError(
                503,
                "The store is unavailable; try again shortly.",
                type="server_error",
                code="store_unavailable",
            )
            await send_error(send, error)
            return
        await self._app(scope, receive, send)


async def _not_found(request: Request, exc: Exception) -> Response:
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    error = ProxyError(
        status,
        f"Invalid URL ({request.method} {request.url.path})",
        code="not_found" if status == 404 else "method_not_allowed",
    )
    return JSONResponse(error.envelope(), status_code=status)
