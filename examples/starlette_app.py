"""Wrapping an existing Starlette app: its own routes stay its own, image generation is proxied.

    python examples/starlette_app.py config.toml

Every request to an image-generation path (e.g. POST /v1/images/generations) is served by the
proxy; everything else (here `/` and `/v1/models`) reaches the app untouched.
"""

from __future__ import annotations

import sys

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from imagegen_proxy import ImageGenProxy, ProxyConfig


async def home(request: Request) -> JSONResponse:
    return JSONResponse({"app": "my internal platform", "images": "/v1/images/generations"})


async def models(request: Request) -> JSONResponse:
    return JSONResponse({"object": "list", "data": [{"id": "gpt-image-1", "object": "model"}]})


def build(config: ProxyConfig) -> Starlette:
    app = Starlette(routes=[Route("/", home), Route("/v1/models", models)])
    # Outermost, so that no BaseHTTPMiddleware buffers the streams or hides disconnects.
    app.add_middleware(ImageGenProxy, config=config)
    return app


if __name__ == "__main__":
    uvicorn.run(build(ProxyConfig.from_toml(sys.argv[1])), host="127.0.0.1", port=8000)
