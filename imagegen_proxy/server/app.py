"""The bundled proxy: `ImageGenProxy` in front of a small app with `/healthz` (and the mock)."""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import SecretStr
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route

from ..config import ConfigError, OpenAIUpstream, ProxyConfig, mask_url
from ..governance.auth import is_admin
from ..middleware import ImageGenProxy
from ..mock import MockUpstream
from ..observe.access import LineHandler
from ..types import ASGIApp, Receive, Scope, Send
from ..upstream.pool import Pool
from ..wire.errors import ProxyError

MOCK_PATH = "/_mock"


def with_mock(config: ProxyConfig, self_url: str, key: str | None = None) -> ProxyConfig:
    """`config` with the embedded mock (served by the same app under /_mock) as its upstream.

    The mock wants `key` (by default `IMAGEGEN_PROXY_MOCK_KEY`, else a new random one) from
    the proxy, so that nobody reaches it around the proxy's keys. Without `[[keys]]` the
    proxy is open: this mode is for trying things out; with them, clients need their keys.
    """
    key = key or os.environ.get("IMAGEGEN_PROXY_MOCK_KEY") or secrets.token_urlsafe(24)
    mock = OpenAIUpstream(base_url=f"{self_url}{MOCK_PATH}/v1", api_key=SecretStr(key))
    keyed = config.keys or config.store.url
    auth = config.auth if keyed else config.auth.model_copy(update={"open": True})
    return config.model_copy(update={"openai": mock, "auth": auth})


def create_app(config: ProxyConfig, *, mock: bool = False) -> ImageGenProxy:
    """The app `imagegen-proxy` serves. `mock=True` also mounts the embedded mock upstream.

    `/healthz` answers every caller with its status alone; its details (the upstreams) and
    `/metrics` need the `[admin]` key, except in open mode, or come from `ops_app` on the
    `[server] ops_port` listener.
    """
    ops = _Ops(config, mock)
    admin = config.admin.digest
    pool: list[Pool | None] = [None]

    async def healthz(request: Request) -> Response:
        details = config.auth.open or is_admin(request.scope, admin)
        return ops.health(details, pool[0])

    routes: list[Any] = [Route("/healthz", healthz, methods=["GET"])]
    if config.server.openapi_path:
        document = openapi_document(config.proxy.mount_prefix)

        async def openapi(request: Request) -> Response:
            return JSONResponse(document)

        routes.append(Route(config.server.openapi_path, openapi, methods=["GET"]))
    if config.metrics.enabled:
        from ..observe.metrics import metrics_app

        scrape = metrics_app() if config.auth.open else _AdminOnly(metrics_app(), admin)
        routes.append(Route(config.metrics.path, scrape, methods=["GET"]))
    if mock:
        assert config.openai is not None and config.openai.api_key is not None
        upstream = MockUpstream(
            delay=config.mock.delay,
            pad_to=config.mock.pad_to,
            api_key=config.openai.api_key.get_secret_value(),
        )
        routes.append(Mount(MOCK_PATH, app=upstream))
    host = Starlette(routes=routes, exception_handlers={HTTPException: _not_found})
    if config.proxy.list_models is None:  # the bundled proxy's host serves no /v1/models
        settings = config.proxy.model_copy(update={"list_models": True})
        config = config.model_copy(update={"proxy": settings})
    proxy = ImageGenProxy(host, config)
    pool[0] = proxy.pool  # /healthz shows each upstream's state in this process
    if console_enabled(config):
        from ..console.app import console_app

        host.router.routes.append(Mount(config.console.path, app=console_app(proxy)))
    return proxy


def console_enabled(config: ProxyConfig) -> bool:
    """`[console] enabled`, or, unset, whether the console extra is installed."""
    wanted = config.console.enabled
    if wanted is False:
        return False
    try:
        import itsdangerous  # noqa: F401
        import jinja2  # noqa: F401
    except ImportError:
        if wanted:
            raise ConfigError(
                "[console] enabled needs the console extra: pip install 'imagegen-proxy[console]'"
            ) from None
        return False
    return True


def ops_app(
    config: ProxyConfig, *, mock: bool = False, pool: Pool | None = None, follow: bool = False
) -> Starlette:
    """The `[server] ops_port` listener's app: `/healthz` with its details and `/metrics`,
    without credentials. Bind it where only operators reach it.

    `pool`'s states are shown with the upstreams. `follow` starts its Redis mirror with
    this app (for a pool that serves nowhere else: `--workers`' supervisor)."""
    ops = _Ops(config, mock)
    mirror = pool.mirror if pool is not None and follow else None

    async def healthz(request: Request) -> Response:
        return ops.health(True, pool)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if mirror is not None:
            mirror.start()
        try:
            yield
        finally:
            if mirror is not None:
                await mirror.aclose()

    routes: list[Any] = [Route("/healthz", healthz, methods=["GET"])]
    if config.metrics.enabled:
        from ..observe.metrics import metrics_app

        routes.append(Route(config.metrics.path, metrics_app(), methods=["GET"]))
    return Starlette(
        routes=routes, exception_handlers={HTTPException: _not_found}, lifespan=lifespan
    )


class _Ops:
    """What `/healthz` says, computed once."""

    def __init__(self, config: ProxyConfig, mock: bool) -> None:
        self.upstreams = describe_upstreams(config, mock)
        missing = [name for name, found in self.upstreams.items() if not found["complete"]]
        self.summary = "incomplete" if missing else "ok"
        self.status = f"incomplete: no api key for {', '.join(missing)}" if missing else "ok"
        self.code = 503 if missing else 200

    def health(self, details: bool, pool: Pool | None = None) -> Response:
        if not details:
            return JSONResponse({"status": self.summary}, status_code=self.code)
        upstreams = self.upstreams
        if pool is not None:
            upstreams = {name: dict(about) for name, about in upstreams.items()}
            for target in pool.targets:
                state, seconds = pool.state(target)
                upstreams[target.name]["state"] = state
                if seconds is not None:
                    until = datetime.now(UTC) + timedelta(seconds=seconds)
                    upstreams[target.name]["until"] = until.isoformat(timespec="seconds")
                    upstreams[target.name]["cooling_seconds"] = round(seconds, 1)
        body = {"status": self.status, "upstreams": upstreams}
        return JSONResponse(body, status_code=self.code)


class _AdminOnly:
    """`app` for callers with the `[admin]` key; everyone else gets 401."""

    def __init__(self, app: ASGIApp, digest: bytes | None) -> None:
        self.app = app
        self.digest = digest

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if is_admin(scope, self.digest):
            await self.app(scope, receive, send)
            return
        hint = "set [admin] key" if self.digest is None else "send the [admin] key as Bearer"
        error = ProxyError(401, f"The admin key is required here ({hint}).", code="invalid_api_key")
        response = JSONResponse(error.envelope(), status_code=401)
        await response(scope, receive, send)


async def _not_found(request: Request, exc: Exception) -> Response:
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    error = {
        "message": f"No route for {request.url.path}.",
        "type": "invalid_request_error",
        "param": None,
        "code": "not_found" if status == 404 else None,
    }
    return JSONResponse({"error": error}, status_code=status)


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
    for member in config.members():
        has_key = member.api_key is not None
        where = member.described()
        if mock and member.kind == "openai":
            where = {"base_url": "embedded mock"}
        upstreams[member.name] = {
            **({"kind": member.kind} if config.upstreams else {}),
            **where,
            "api_key": has_key,
            "complete": (mock and member.kind == "openai") or member.has_credentials,
        }
    return upstreams


EMBEDDED_STORE = "imagegen-proxy.db"


def with_embedded_store(config: ProxyConfig, directory: Path, loopback: bool) -> ProxyConfig:
    """The no-config mode's store: a SQLite file in `directory`, created on first start,
    for the ledger and the admin API, which is open on loopback like the rest of that
    mode."""
    store = config.store.model_copy(update={"url": f"sqlite:///{directory / EMBEDDED_STORE}"})
    admin = config.admin.model_copy(update={"open": loopback})
    return config.model_copy(update={"store": store, "admin": admin})


SIGNING_KEY_ENV = "IMAGEGEN_PROXY_SIGNING_KEY"


def with_file_urls(config: ProxyConfig, url: str) -> ProxyConfig:
    """`config` whose `file://` store (if any) answers URLs of this proxy at `url` when it
    names no `public_url`, signed with a key every worker shares when it names none (made
    here, passed on in `IMAGEGEN_PROXY_SIGNING_KEY`)."""
    storage = config.storage
    if not storage.is_file:
        return config
    update: dict[str, Any] = {}
    if storage.public_url is None:
        update["public_url"] = url + config.proxy.mount_prefix.rstrip("/")
    if storage.signing_key_env is None:
        os.environ.setdefault(SIGNING_KEY_ENV, secrets.token_urlsafe(32))
        update["signing_key_env"] = SIGNING_KEY_ENV
    return config.model_copy(update={"storage": storage.model_copy(update=update)})


def from_environment() -> ImageGenProxy:
    """The app factory the `--workers` processes import: the command passes its resolved
    choices through the environment (`IMAGEGEN_PROXY_CONFIG`, `IMAGEGEN_PROXY_MOCK_URL`,
    `IMAGEGEN_PROXY_STORE`)."""
    path = os.environ.get("IMAGEGEN_PROXY_CONFIG")
    config = ProxyConfig.from_toml(path) if path else ProxyConfig()
    mock_url = os.environ.get("IMAGEGEN_PROXY_MOCK_URL")
    if mock_url:
        config = with_mock(config, mock_url)
    store = os.environ.get("IMAGEGEN_PROXY_STORE")
    if store:  # the no-config mode's embedded store, as the command resolved it
        open_admin = os.environ.get("IMAGEGEN_PROXY_ADMIN_OPEN") == "1"
        config = with_embedded_store(config, Path(store).parent, open_admin)
    public = os.environ.get("IMAGEGEN_PROXY_PUBLIC_URL")
    if public:
        config = with_file_urls(config, public)
    configure_logging(os.environ.get("IMAGEGEN_PROXY_LOG_LEVEL", "INFO"))
    return create_app(config, mock=bool(mock_url))


def configure_logging(level: str) -> None:
    """The command's logging: the proxy's messages at `level`, on stderr; access log lines
    (when `[access_log]` is enabled, whatever `level`) bare on stdout, one per line."""
    logging.basicConfig(format="%(levelname)s:     %(name)s: %(message)s")
    logging.getLogger("imagegen_proxy").setLevel(level.upper())
    access = logging.getLogger("imagegen_proxy.access")
    if not access.handlers:
        access.addHandler(LineHandler(sys.stdout))
    access.setLevel(logging.INFO)
    access.propagate = False


def resolved(config: ProxyConfig) -> dict[str, Any]:
    """The configuration as the proxy will use it, every secret masked."""
    data = config.model_dump(mode="json")
    data["limits"]["storage"] = mask_url(data["limits"]["storage"])
    if data["store"]["url"]:
        data["store"]["url"] = mask_url(data["store"]["url"])
    if data["admin"].get("key_sha256"):
        data["admin"]["key_sha256"] = data["admin"]["key_sha256"][:8] + "…"
    for entry in data["keys"]:
        if entry.get("key_sha256"):
            entry["key_sha256"] = entry["key_sha256"][:8] + "…"
    return data
