"""The proxy's own answers beside the image endpoints: `GET /v1/imagegen/budget` (a key's
own limits and spending), `GET /v1/models` (what the caller's key may use) and
`GET /v1/imagegen/files/...` (the images a `file://` store keeps, by signed URL)."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from .governance.auth import Authenticator, is_admin, may_use, read_credentials
from .governance.ratelimit import RateLimiter
from .storage import FileStore, ImageStore, StorageError
from .types import Scope, Send
from .wire.errors import ProxyError, expect_method, send_error
from .wire.routing import FILES_PATH, IMAGES_PATH

if TYPE_CHECKING:
    from .store import Store


async def budget_view(
    scope: Scope,
    send: Send,
    authenticator: Authenticator,
    limiter: RateLimiter,
    key_headers: frozenset[bytes],
) -> None:
    """`GET /v1/imagegen/budget`: a client's own limits, spending and budgets."""
    try:
        expect_method(scope, "GET")
        principal = await authenticator.authenticate(read_credentials(scope, key_headers))
        now = time.time()
        standing = [one.json(now) for one in await limiter.standing(principal)]
    except ProxyError as error:
        await send_error(send, error)
        return
    view = {
        "object": "imagegen.budget",
        "key": standing[0] if standing else {"name": principal.name},
        "project": standing[1] if len(standing) > 1 else None,
    }
    await send_json(send, view)


async def models_view(
    scope: Scope,
    send: Send,
    authenticator: Authenticator,
    key_headers: frozenset[bytes],
    listed: list[tuple[str, str | None]],
) -> None:
    """`GET /v1/models`: of the models `listed` (with their shutdown dates), those the
    caller's key may use, in OpenAI's list shape (the SDK's `client.models.list()`)."""
    try:
        expect_method(scope, "GET")
        principal = await authenticator.authenticate(read_credentials(scope, key_headers))
    except ProxyError as error:
        await send_error(send, error)
        return
    view = {
        "object": "list",
        "data": [
            {
                "id": model,
                "object": "model",
                "created": 0,
                "owned_by": "imagegen-proxy",
                "shutdown_date": shutdown,
            }
            for model, shutdown in listed
            if may_use(principal, model)
        ],
    }
    await send_json(send, view)


async def send_json(send: Send, view: dict[str, Any]) -> None:
    """A 200 answer of the proxy's own views."""
    body = json.dumps(view).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def files_view(scope: Scope, send: Send, store: FileStore, prefix: str) -> None:
    """`GET /v1/imagegen/files/{key}?expires=&signature=`: an image a `file://` store
    keeps, for whoever holds its signed URL until it expires. Anything else, a wrong or
    expired signature included, is a 404 that tells nothing of what exists."""
    try:
        expect_method(scope, "GET")
        key = scope["path"][len(prefix + FILES_PATH) :]
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        expires = query.get("expires", [""])[0]
        signature = query.get("signature", [""])[0]
        if not store.verify(key, expires, signature):
            raise ProxyError(404, "No such image, or its URL has expired.", code="not_found")
        chunks = store.read(key)
        first = await anext(chunks, b"")
    except StorageError:
        await send_error(send, ProxyError(404, "No such image.", code="not_found"))
        return
    except ProxyError as error:
        await send_error(send, error)
        return
    media = _MEDIA.get(key.rpartition(".")[2], "application/octet-stream")
    headers = [
        (b"content-type", media.encode()),
        (b"cache-control", b"private, max-age=3600"),
        (b"x-content-type-options", b"nosniff"),
    ]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": first, "more_body": True})
    async for chunk in chunks:
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": False})


_MEDIA = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp", "gif": "image/gif"}


async def kept_view(
    scope: Scope,
    send: Send,
    authenticator: Authenticator,
    key_headers: frozenset[bytes],
    store: Store | None,
    images: ImageStore,
    ttl: float,
    admin: bytes | None,
    prefix: str,
) -> None:
    """`GET /v1/imagegen/images/{request_id}`: a generation's kept images, their URLs issued
    anew (valid `ttl` seconds), for the key that made it or the admin key; to anyone else,
    a 404 that tells nothing of what exists. The ledger says what was kept: without a
    `[store]` there is none."""
    from .store.ledger.queries import latest

    try:
        expect_method(scope, "GET")
        request_id = scope["path"][len(prefix + IMAGES_PATH) :]
        admin_asks = is_admin(scope, admin)
        principal = None
        if not admin_asks:
            principal = await authenticator.authenticate(read_credentials(scope, key_headers))
        missing = ProxyError(404, f"No kept images for request {request_id!r}.", code="not_found")
        if store is None or not request_id or len(request_id) > 64:
            raise missing
        rows = await latest(store, limit=1, filters={"request_id": request_id})
        if not rows or not rows[0].objects:
            raise missing
        row = rows[0]
        if principal is not None and (row.key_name != principal.name or row.key_id != principal.id):
            raise missing
        try:
            urls = [await images.url(key, ttl) for key in row.objects or []]
        except StorageError:
            raise ProxyError(
                502,
                "The gateway's storage could not issue the URLs; try again later.",
                type="server_error",
                code="storage_unavailable",
            ) from None
    except ProxyError as error:
        await send_error(send, error)
        return
    view = {
        "object": "imagegen.images",
        "request_id": request_id,
        "created": row.at,
        "expires_at": int(time.time() + ttl),
        "data": [{"url": url} for url in urls],
    }
    await send_json(send, view)
