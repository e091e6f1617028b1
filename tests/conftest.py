from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from double import UpstreamDouble
from postgres_server import create_database, postgres_server
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket
from support import serve

from imagegen_proxy import ImageGenProxy, ProxyConfig

UPSTREAM_KEY = "sk-upstream-secret-0123456789"
CLIENT_KEY = "sk-client-secret-9876543210"
API_VERSION = "2025-04-01-preview"


class HostApp:
    """The user's own app: a route, a websocket and a lifespan, to prove they are untouched."""

    def __init__(self) -> None:
        self.lifespan_events: list[str] = []

        async def hello(request: Any) -> PlainTextResponse:
            return PlainTextResponse(f"host says hello at {request.url.path}")

        async def echo(websocket: WebSocket) -> None:
            await websocket.accept()
            await websocket.send_text("echo: " + await websocket.receive_text())
            await websocket.close()

        @contextlib.asynccontextmanager
        async def lifespan(app: Any) -> AsyncIterator[None]:
            self.lifespan_events.append("startup")
            yield
            self.lifespan_events.append("shutdown")

        self.app = Starlette(
            routes=[
                Route("/hello", hello),
                Route("/v1/models", hello),
                Route("/{path:path}", hello, methods=["GET"]),
                WebSocketRoute("/ws", echo),
            ],
            lifespan=lifespan,
        )


@contextlib.contextmanager
def served_double() -> Iterator[UpstreamDouble]:
    """An upstream double on a loopback port of its own."""
    double = UpstreamDouble()
    with serve(double) as url:
        double.url = url
        yield double


@pytest.fixture
def upstream() -> Iterator[UpstreamDouble]:
    with served_double() as double:
        yield double


def proxy_config(
    upstream: UpstreamDouble,
    *,
    openai: bool | dict[str, Any] = True,
    azure: bool | dict[str, Any] = False,
    **sections: Any,
) -> ProxyConfig:
    """A config pointing at the double: `openai`/`azure` True, or a dict of extra keys."""
    config: dict[str, Any] = {"auth": {"open": True}, **sections}
    if openai:
        extra = openai if isinstance(openai, dict) else {}
        config["openai"] = {"base_url": upstream.url + "/v1", "api_key": UPSTREAM_KEY, **extra}
    if azure:
        extra = azure if isinstance(azure, dict) else {}
        config["azure"] = {
            "endpoint": upstream.url,
            "api_key": UPSTREAM_KEY,
            "api_version": API_VERSION,
            **extra,
        }
    return ProxyConfig.model_validate(config)


@pytest.fixture
def start_proxy(upstream: UpstreamDouble) -> Iterator[Callable[..., str]]:
    """Start a proxy in front of a HostApp, served on loopback; returns its base URL."""
    with contextlib.ExitStack() as stack:

        def start(
            host: HostApp | None = None,
            lifespan: str = "auto",
            hooks: dict[str, Any] | None = None,
            **options: Any,
        ) -> str:
            config = proxy_config(upstream, **options)
            proxy = ImageGenProxy((host or HostApp()).app, config, **(hooks or {}))
            return stack.enter_context(serve(proxy, lifespan=lifespan))

        yield start


@pytest.fixture
def proxy(start_proxy: Callable[..., str]) -> str:
    return start_proxy()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """One real PostgreSQL server for the whole run (tests/postgres_server.py)."""
    with postgres_server() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database of each kind: a SQLite file, or a new PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/proxy.db"
    return create_database(request.getfixturevalue("postgres_url"))


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def provider_proxy() -> Iterator[Callable[..., str]]:
    """Start a proxy whose pool is `members` (and `sections`); returns its base URL."""
    with contextlib.ExitStack() as stack:

        def start(
            members: list[dict[str, Any]], hooks: dict[str, Any] | None = None, **sections: Any
        ) -> str:
            config = ProxyConfig.model_validate(
                {"auth": {"open": True}, "upstreams": members} | sections
            )
            proxy = ImageGenProxy(HostApp().app, config, **(hooks or {}))
            return stack.enter_context(serve(proxy))

        yield start
