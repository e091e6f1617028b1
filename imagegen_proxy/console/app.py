"""The console's pages: Starlette routes rendering Jinja2 templates, over the proxy's own
store, pool and activity.

Signed in with the `[admin]` key (compared as a SHA-256 digest, in constant time), which
opens a session: a signed `HttpOnly`, `SameSite=Strict` cookie, limited to the console's
path and to `session_hours`. Every form that changes anything carries the session's CSRF
token, checked in constant time. In open mode (`[admin] open`, the no-config mode on
loopback) no sign-in is asked; the CSRF check still is. Pages are never cached, never
framed, and load nothing from elsewhere (a Content-Security-Policy says so).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING
from urllib.parse import quote, urlsplit

from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.applications import Starlette
from starlette.datastructures import FormData
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from ..config import StorageConfig
from ..types import ASGIApp, Message, Receive, Scope, Send
from .forms import redirect
from .throttle import SignInThrottle, retry_after
from .views import Pages

if TYPE_CHECKING:
    from ..middleware import ImageGenProxy

Handler = Callable[[Request, FormData | None], Awaitable[Response]]


def _headers(images: str = "") -> list[tuple[bytes, bytes]]:
    """The console's headers; `images`: the origin its kept images' URLs are on (a
    `[storage]` store's), the one other place a page may load from (thumbnails)."""
    img = f"'self' data: {images}".strip()
    policy = (
        f"default-src 'self'; img-src {img}; style-src 'self'; script-src 'self'; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    )
    return [
        (b"cache-control", b"no-store"),
        (b"x-frame-options", b"DENY"),
        (b"x-content-type-options", b"nosniff"),
        (b"referrer-policy", b"no-referrer"),
        (b"content-security-policy", policy.encode()),
    ]


def images_origin(storage: StorageConfig) -> str:
    """Where a `[storage]` store's URLs point: its public URL (`file://`), its endpoint, or
    AWS's S3 hosts."""
    if storage.url is None:
        return ""
    base = storage.public_url if storage.is_file else storage.endpoint_url
    if base is None:
        return "" if storage.is_file else "https://*.amazonaws.com"
    parts = urlsplit(base)
    return f"{parts.scheme}://{parts.netloc}"


def console_app(proxy: ImageGenProxy, *, path: str | None = None) -> ASGIApp:
    """The console of `proxy`, to mount at `path` (default `[console] path`): the bundled
    proxy mounts it itself; a host app can mount it where it likes."""
    config = proxy.config
    path = path or config.console.path
    templates = Jinja2Templates(
        env=Environment(
            loader=PackageLoader("imagegen_proxy.console", "templates"),
            autoescape=select_autoescape(default=True),
        )
    )
    pages = Pages(proxy, templates)
    admin = config.admin.digest
    open_ = config.admin.open
    throttle = SignInThrottle()

    def signed_in(request: Request) -> bool:
        return open_ or request.session.get("admin") is True

    def page(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        """Signed in, or to the sign-in page; a form post, only with the session's token."""

        async def endpoint(request: Request) -> Response:
            if not signed_in(request):
                here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
                return redirect(request, f"/signin?next={quote(here)}")
            form = None
            if request.method == "POST":
                form = await request.form(max_files=0, max_fields=50)
                if not _csrf_ok(request, form):
                    return pages.refused(request, "The form was stale or forged: reload it.")
            return await handler(request, form)

        return endpoint

    async def signin(request: Request) -> Response:
        if request.method == "GET":
            if signed_in(request):
                return redirect(request, "/")
            return pages.signin(request, error=None, needs_key=admin is None)
        form = await request.form(max_files=0, max_fields=10)
        if not _csrf_ok(request, form):
            return pages.refused(request, "The form was stale or forged: reload it.")
        address = request.client.host if request.client is not None else ""
        wait = throttle.wait(address)
        if wait > 0:  # the key is not even compared: no guess counts while it waits
            refused = pages.signin(
                request,
                error=f"Too many wrong keys from this address: try again in {retry_after(wait)} s.",
                status=429,
            )
            refused.headers["retry-after"] = retry_after(wait)
            return refused
        key = str(form.get("key", ""))
        digest = hashlib.sha256(key.encode()).digest()
        if admin is None or not hmac.compare_digest(digest, admin):
            throttle.failed(address)
            return pages.signin(request, error="That is not the admin key.", status=401)
        throttle.succeeded(address)
        request.session.clear()
        request.session.update({"admin": True, "csrf": secrets.token_urlsafe(32)})
        target = str(form.get("next", ""))
        return redirect(request, _inside(request, target))

    async def signout(request: Request) -> Response:
        form = await request.form(max_files=0, max_fields=10)
        if not _csrf_ok(request, form):
            return pages.refused(request, "The form was stale or forged: reload it.")
        request.session.clear()
        return redirect(request, "/signin")

    routes = [
        Route("/", page(pages.overview)),
        Route("/signin", signin, methods=["GET", "POST"]),
        Route("/signout", signout, methods=["POST"]),
        Route("/spend", page(pages.spend)),
        Route("/spend.csv", page(pages.spend_csv)),
        Route("/keys", page(pages.keys)),
        Route("/keys/projects", page(pages.create_project), methods=["POST"]),
        Route("/keys/projects/{id}/limits", page(pages.project_limits), methods=["POST"]),
        Route("/keys/projects/{id}/archive", page(pages.archive_project), methods=["POST"]),
        Route("/keys/new", page(pages.create_key), methods=["POST"]),
        Route("/keys/{id}/revoke", page(pages.revoke_key), methods=["POST"]),
        Route("/keys/{id}/rotate", page(pages.rotate_key), methods=["POST"]),
        Route("/requests", page(pages.requests)),
        Route("/requests/{request_id}.json", page(pages.request_json)),
        Route("/playground", page(pages.playground)),
        Mount("/static", StaticFiles(packages=[("imagegen_proxy.console", "static")])),
    ]
    app = Starlette(routes=routes, exception_handlers={404: pages.not_found})
    return _Hardened(
        SessionMiddleware(
            app,
            secret_key=_session_secret(admin),
            session_cookie="imagegen_console",
            max_age=round(config.console.session_hours * 3600),
            path=path,
            same_site="strict",
            https_only=config.console.secure_cookie,
        ),
        images_origin(config.storage),
    )


def _session_secret(admin: bytes | None) -> str:
    """Sessions are signed with a secret derived from the admin key: the same in every
    worker process, and a new admin key ends every session. Without an admin key (open
    mode), a secret of this process's own."""
    if admin is None:
        return secrets.token_hex(32)
    return hmac.new(admin, b"imagegen-proxy console session", hashlib.sha256).hexdigest()


def _csrf_ok(request: Request, form: FormData) -> bool:
    sent, expected = form.get("csrf"), request.session.get("csrf")
    if not isinstance(sent, str) or not isinstance(expected, str):
        return False
    return hmac.compare_digest(sent.encode(), expected.encode())


def _inside(request: Request, target: str) -> str:
    """`next` after signing in: a path inside the console, or its overview (never
    another site: no scheme, no `//`, no backslash)."""
    base = request.scope.get("root_path", "")
    if target.startswith(base + "/") and "//" not in target and "\\" not in target:
        return target[len(base) :]
    return "/"


class _Hardened:
    """Every console answer: not cached, not framed, nothing loaded from elsewhere."""

    def __init__(self, app: ASGIApp, images: str = "") -> None:
        self.app = app
        self.headers = _headers(images)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        extra = self.headers

        async def hardened(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, hardened)
