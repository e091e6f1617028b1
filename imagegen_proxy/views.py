"""The proxy's own answers beside the image endpoints: `GET /v1/imagegen/budget` (a key's
own limits and spending), `GET /v1/models` (what the caller's key may use) and
`GET /v1/imagegen/files/...` (the images a `file://` store keeps, by signed URL)."""

from __future__ import annotations

import json
import time
from typing import Any
from urllib.parse import parse_qs

from .governance.auth import Authenticator, may_use, read_credentials
from .governance.ratelimit import RateLimiter
from .storage import FileStore, StorageError
from .types import Scope, Send
from .wire.errors import ProxyError, expect_method, send_error
from .wire.routing import FILES_PATH


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
