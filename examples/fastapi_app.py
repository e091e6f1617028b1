"""Wrapping a FastAPI app: its routes, websocket, lifespan, exception handlers and middleware
keep working; image generation is served by the proxy, even under the app's catch-all route.

    IMAGEGEN_PROXY_CONFIG=proxy.toml uvicorn examples.fastapi_app:app
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import JSONResponse
from starlette.middleware.gzip import GZipMiddleware

from imagegen_proxy import ImageGenProxy, ProxyConfig

state: dict[str, Any] = {"started": False, "stopped": False}


class TeapotError(Exception):
    pass


def build(config: ProxyConfig) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state["started"] = True
        yield
        state["stopped"] = True

    app = FastAPI(lifespan=lifespan)

    @app.get("/status")
    async def status() -> dict[str, Any]:
        return {"ok": True, "started": state["started"]}

    @app.get("/teapot")
    async def teapot() -> None:
        raise TeapotError

    @app.exception_handler(TeapotError)
    async def on_teapot(request: Request, exc: TeapotError) -> JSONResponse:
        return JSONResponse({"detail": "I'm a teapot"}, status_code=418)

    @app.websocket("/ws")
    async def echo(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text("echo: " + await websocket.receive_text())
        await websocket.close()

    @app.api_route("/{path:path}", methods=["GET", "POST"])
    async def catch_all(path: str) -> dict[str, str]:
        return {"caught": path}

    app.add_middleware(GZipMiddleware)
    # Added last, so outermost: nothing buffers the proxy's streams or hides disconnects.
    app.add_middleware(ImageGenProxy, config=config)
    return app


def _from_environment() -> FastAPI | None:
    path = os.environ.get("IMAGEGEN_PROXY_CONFIG")
    return build(ProxyConfig.from_toml(path)) if path else None


app = _from_environment()
