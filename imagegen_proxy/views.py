"""The proxy's own answers beside the image endpoints: `GET /v1/imagegen/budget` (a key's
own limits and spending) and `GET /v1/models` (what the caller's key may use)."""

from __future__ import annotations

import json
import time
from typing import Any

from .governance.auth import Authenticator, may_use, read_credentials
from .governance.ratelimit import RateLimiter
from .types import Scope, Send
from .wire.errors import ProxyError, expect_method, send_error


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
