"""OpenAI-shaped errors: the one exception the pipeline raises, and how it goes on the wire."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from ..types import Scope, Send


class ProxyError(Exception):
    """An answer the proxy gives itself, in OpenAI's error envelope.

    Raised anywhere before the response has started; the middleware turns it into
    `{"error": {"message", "type", "param", "code"}}` with `status` and `headers`.
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: Iterable[tuple[str, str]] = (),
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = list(headers)

    def envelope(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class ClientGone(Exception):
    """The client disconnected; there is nobody left to answer."""


def expect_method(scope: Scope, method: str) -> None:
    """Refuse (405) a request whose method is not `method`."""
    if scope["method"] != method:
        raise ProxyError(
            405,
            f"Method {scope['method']} not allowed: use {method}.",
            code="method_not_allowed",
            headers=[("allow", method)],
        )


def server_error(status: int, message: str, code: str, *, retry: bool = True) -> ProxyError:
    """A 5xx in OpenAI's `server_error` type; `retry=False` tells the SDK not to retry it."""
    headers = [] if retry else [("x-should-retry", "false")]
    return ProxyError(status, message, type="server_error", code=code, headers=headers)


async def send_error(send: Send, error: ProxyError, request_id: str | None = None) -> int:
    """Send `error` as the whole response; return the body's size."""
    body = json.dumps(error.envelope()).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    if request_id is not None:
        headers.append((b"x-request-id", request_id.encode()))
    headers += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in error.headers]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
    return len(body)


def too_large(limit: int) -> ProxyError:
    """413 for a request body over `limit` bytes."""
    return ProxyError(
        413,
        f"Request body too large: the limit is {limit} bytes.",
        code="request_too_large",
    )


def gif_refusal(param: str, why: str) -> ProxyError:
    """400 for a parameter an animated GIF cannot be made with (see `check_animation`)."""
    return ProxyError(
        400,
        f"'{param}' cannot be used with output_format 'gif': {why}.",
        param=param,
        code="unsupported_parameter_combination",
    )
