"""`ImageGenProxy`: the pure-ASGI middleware that serves the image-generation paths."""

from __future__ import annotations

import logging

import httpx

from .config import ConfigError, ProxyConfig
from .errors import ClientGone, ProxyError, send_error
from .relay import forward
from .request import check_content_type, parse_request, read_body
from .routing import Router, check_route
from .types import ASGIApp, Message, Receive, Scope, Send
from .upstream import Upstreams, create_client

logger = logging.getLogger("imagegen_proxy")


class ImageGenProxy:
    """Serves `POST .../images/generations` in front of `app`; everything else goes to `app`.

    `http_client` replaces the default upstream client (the proxy then never closes it).
    Without one, the client is created on first use (Django never sends lifespan) and
    closed on lifespan shutdown, when the server sends it, or by `aclose()`.
    """

    def __init__(
        self,
        app: ASGIApp,
        config: ProxyConfig,
        *,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        if not config.auth.open:
            raise ConfigError(
                "client keys are not configured: set [auth] open = true to serve without them"
            )
        self.app = app
        self.config = config
        self.router = Router(config.proxy.mount_prefix)
        self.upstreams = Upstreams(config)
        self._max_body = config.proxy.max_body_bytes
        self._client = http_client
        self._owns_client = http_client is None

    @property
    def http_client(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = create_client(self.config.proxy)
        return self._client

    async def aclose(self) -> None:
        """Close the upstream client this proxy created (a later request makes a new one)."""
        client, self._client = self._client, None
        if client is not None and self._owns_client:
            await client.aclose()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = self.router.match(scope) if scope["type"] == "http" else None
        if route is None:
            if scope["type"] == "lifespan":
                send = self._closing_on_shutdown(send)
            await self.app(scope, receive, send)
            return
        try:
            if scope["method"] != "POST":
                raise ProxyError(
                    405,
                    f"Method {scope['method']} not allowed: use POST.",
                    code="method_not_allowed",
                    headers=[("allow", "POST")],
                )
            check_route(route)
            check_content_type(scope)
            body = await read_body(scope, receive, self._max_body)
            request = parse_request(route, body)
            upstream_request = self.upstreams.build(request, scope)
            await forward(self.http_client, upstream_request, receive, send, request.images)
        except ProxyError as error:
            await send_error(send, error)
        except ClientGone:
            pass
        except Exception:
            # forward() answers its own failures once the response has started, so
            # anything that reaches here happened before: a 500 can still be sent.
            logger.exception("internal error while proxying %s", scope["path"])
            await send_error(
                send,
                ProxyError(
                    500,
                    "The proxy failed to handle the request.",
                    type="server_error",
                    code="internal_error",
                ),
            )

    def _closing_on_shutdown(self, send: Send) -> Send:
        async def send_closing(message: Message) -> None:
            if message["type"] in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
                await self.aclose()
            await send(message)

        return send_closing
