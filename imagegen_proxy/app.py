"""The bundled proxy: `ImageGenProxy` in front of a small app with `/healthz` (and the mock)."""

from __future__ import annotations

import logging
import os
import sys
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route

from .config import OpenAIUpstream, ProxyConfig
from .middleware import ImageGenProxy
from .mock import MockUpstream

MOCK_PATH = "/_mock"


def with_mock(config: ProxyConfig, self_url: str) -> ProxyConfig:
    """`config` with the embedded mock (served by the same app under /_mock) as its upstream.

    The mock needs no upstream key. Without `[[keys]]` the proxy is open: this mode is for
    trying things out; with them, clients need their keys as usual.
    """
    mock = OpenAIUpstream(base_url=f"{self_url}{MOCK_PATH}/v1")
    auth = config.auth if config.keys else config.auth.model_copy(update={"open": True})
    return config.model_copy(update={"openai": mock, "auth": auth})


def create_app(config: ProxyConfig, *, mock: bool = False) -> ImageGenProxy:
    """The app `imagegen-proxy` serves. `mock=True` also mounts the embedded mock upstream."""

    upstreams = describe_upstreams(config, mock)
    missing = [name for name, upstream in upstreams.items() if not upstream["complete"]]

    async def healthz(request: Request) -> Response:
        if missing:
            status = f"incomplete: no api key for {', '.join(missing)}"
            return JSONResponse({"status": status, "upstreams": upstreams}, status_code=503)
        return JSONResponse({"status": "ok", "upstreams": upstreams})

    async def not_found(request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        error = {
            "message": f"No route for {request.url.path}.",
            "type": "invalid_request_error",
            "param": None,
            "code": "not_found" if status == 404 else None,
        }
        return JSONResponse({"error": error}, status_code=status)

    routes: list[Any] = [Route("/healthz", healthz, methods=["GET"])]
    if config.server.openapi_path:
        document = openapi_document(config.proxy.mount_prefix)

        async def openapi(request: Request) -> Response:
            return JSONResponse(document)

        routes.append(Route(config.server.openapi_path, openapi, methods=["GET"]))
    if config.metrics.enabled:
        from .metrics import metrics_app

        routes.append(Route(config.metrics.path, metrics_app(), methods=["GET"]))
    if mock:
        routes.append(
            Mount(MOCK_PATH, app=MockUpstream(delay=config.mock.delay, pad_to=config.mock.pad_to))
        )
    host = Starlette(routes=routes, exception_handlers={HTTPException: not_found})
    return ImageGenProxy(host, config)


def openapi_document(mount_prefix: str = "") -> dict[str, Any]:
    """The OpenAPI 3.1 document of the proxy's paths (shipped as `openapi.yaml`)."""
    import yaml

    text = resources.files(__package__).joinpath("openapi.yaml").read_text(encoding="utf-8")
    document: dict[str, Any] = yaml.safe_load(text)
    document["servers"] = [{"url": mount_prefix or "/"}]
    return document


def describe_upstreams(config: ProxyConfig, mock: bool = False) -> dict[str, Any]:
    """What each upstream is and whether it has credentials (never the credentials)."""
    upstreams: dict[str, Any] = {}
    if config.openai is not None:
        upstreams["openai"] = {
            "base_url": "embedded mock" if mock else config.openai.base_url,
            "api_key": config.openai.api_key is not None,
            "complete": mock or config.openai.api_key is not None,
        }
    if config.azure is not None:
        upstreams["azure"] = {
            "endpoint": config.azure.endpoint,
            "api_version": config.azure.api_version,
            "api_key": config.azure.api_key is not None,
            "complete": config.azure.api_key is not None,
        }
    return upstreams


def from_environment() -> ImageGenProxy:
    """The app factory the `--workers` processes import: the command passes its resolved
    choices through the environment (`IMAGEGEN_PROXY_CONFIG`, `IMAGEGEN_PROXY_MOCK_URL`)."""
    path = os.environ.get("IMAGEGEN_PROXY_CONFIG")
    config = ProxyConfig.from_toml(path) if path else ProxyConfig()
    mock_url = os.environ.get("IMAGEGEN_PROXY_MOCK_URL")
    if mock_url:
        config = with_mock(config, mock_url)
    configure_logging(os.environ.get("IMAGEGEN_PROXY_LOG_LEVEL", "INFO"))
    return create_app(config, mock=bool(mock_url))


def configure_logging(level: str) -> None:
    """The command's logging: the proxy's messages at `level`, on stderr; access log lines
    (when `[access_log]` is enabled, whatever `level`) bare on stdout, one per line."""
    logging.basicConfig(format="%(levelname)s:     %(name)s: %(message)s")
    logging.getLogger("imagegen_proxy").setLevel(level.upper())
    access = logging.getLogger("imagegen_proxy.access")
    if not access.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        access.addHandler(handler)
    access.setLevel(logging.INFO)
    access.propagate = False


def resolved(config: ProxyConfig) -> dict[str, Any]:
    """The configuration as the proxy will use it, every secret masked."""
    data = config.model_dump(mode="json")
    storage = urlsplit(data["limits"]["storage"])
    if storage.password:
        netloc = storage.netloc.replace(f":{storage.password}@", ":**********@")
        data["limits"]["storage"] = storage._replace(netloc=netloc).geturl()
    for entry in data["keys"]:
        if entry.get("key_sha256"):
            entry["key_sha256"] = entry["key_sha256"][:8] + "…"
    return data
