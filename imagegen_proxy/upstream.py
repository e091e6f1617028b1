"""Where a request goes: the upstream URL, its credentials, and the HTTP client.

The upstream URL is built only from configuration and from values checked against
conservative patterns (deployment ids, api-versions). Headers going upstream are an
allow-list, so no client credential, cookie or forwarding header can leak through,
whatever it is called.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from urllib.parse import quote

import httpx
from cachetools import LRUCache

from .config import AzureUpstream, ConfigError, OpenAIUpstream, ProxyConfig, ProxySettings
from .errors import ProxyError, server_error
from .request import ImageGenerationBody, ImageRequest
from .routing import is_valid_deployment
from .types import Scope

Headers = list[tuple[bytes, bytes]]

# What the client may tell the upstream about itself; everything else is dropped.
_FORWARDED = frozenset({b"accept", b"user-agent"})
_FORWARDED_PREFIX = b"x-stainless-"


SendUpstream = Callable[[httpx.Request], Awaitable[httpx.Response]]


def create_transport(settings: ProxySettings) -> httpx.AsyncBaseTransport:
    """The default upstream transport: a pool sized for thousands of slow generations.

    The proxy calls it directly: no redirects are followed and no cookies are kept (a shared
    jar would hand one user's upstream cookies to the next).
    """
    limits = httpx.Limits(
        max_connections=settings.max_connections,
        max_keepalive_connections=settings.max_keepalive_connections,
        keepalive_expiry=settings.keepalive_expiry,
    )
    if settings.transport == "aiohttp":
        from .transport import AiohttpTransport

        return AiohttpTransport(limits)
    return httpx.AsyncHTTPTransport(limits=limits)


def client_sender(client: httpx.AsyncClient) -> SendUpstream:
    """Send through a user's own client, with its hooks, transport and settings."""

    async def send(request: httpx.Request) -> httpx.Response:
        return await client.send(request, stream=True)

    return send


_BASE_HEADERS: Headers = [
    (b"content-type", b"application/json"),
    # The relay reads SSE event boundaries and usage: it must see the bytes as sent.
    (b"accept-encoding", b"identity"),
]


class _Target:
    """One configured upstream: its fixed headers and timeouts, computed once."""

    def __init__(
        self,
        settings: OpenAIUpstream | AzureUpstream,
        key_header: bytes,
        prefix: bytes = b"",
        extra: Headers | None = None,
    ) -> None:
        self._key_header, self._key_prefix = key_header, prefix
        self._fixed = _BASE_HEADERS + (extra or [])
        key = None if settings.api_key is None else settings.api_key.get_secret_value()
        self.headers = self._fixed + self._credentials(key)
        self.extensions = {
            "timeout": httpx.Timeout(
                connect=settings.connect_timeout,
                read=settings.read_timeout,
                write=settings.write_timeout,
                pool=settings.pool_timeout,
            ).as_dict()
        }

    def _credentials(self, key: str | None) -> Headers:
        return [] if key is None else [(self._key_header, self._key_prefix + key.encode())]

    def request(
        self,
        url: httpx.URL,
        body: ImageGenerationBody,
        scope: Scope,
        api_key: str | None,
        request_id: str,
    ) -> httpx.Request:
        headers = [
            (key, value)
            for key, value in scope["headers"]
            if key in _FORWARDED or key.startswith(_FORWARDED_PREFIX)
        ]
        headers.append((b"x-client-request-id", request_id.encode()))
        if api_key is None:
            headers += self.headers
        else:  # this client spends on its own upstream key
            headers += self._fixed + self._credentials(api_key)
        return httpx.Request(
            "POST", url, headers=headers, content=body.to_json(), extensions=self.extensions
        )


class Upstreams:
    """Turns a normalized request into the upstream request, for either form to either upstream.

    OpenAI-form requests go to `[openai]` when configured, else to `[azure]` with the
    deployment `deployments[model]` (or the model name). Azure-form requests go to
    `[azure]` when configured, else to `[openai]` with the deployment as the model.
    """

    def __init__(self, config: ProxyConfig) -> None:
        if config.openai is None and config.azure is None:
            raise ConfigError("no upstream configured: add an [openai] or [azure] section")
        self._openai = self._azure = None
        if config.openai is not None:
            self._openai_url = httpx.URL(config.openai.base_url + "/images/generations")
            org, project = config.openai.organization, config.openai.project
            identity = [(b"openai-organization", org.encode())] if org else []
            identity += [(b"openai-project", project.encode())] if project else []
            self._openai = _Target(config.openai, b"authorization", b"Bearer ", identity)
        if config.azure is not None:
            self._azure = _Target(config.azure, b"api-key")
            self._azure_base = config.azure.endpoint + "/openai/deployments/"
            self._azure_version = config.azure.api_version
            self._deployments = config.azure.deployments
            self._azure_urls: LRUCache[tuple[str, str], httpx.URL] = LRUCache(maxsize=1024)

    def build(
        self, request: ImageRequest, scope: Scope, api_key: str | None, request_id: str
    ) -> httpx.Request:
        """The upstream request; `api_key` replaces the configured upstream key, and
        `request_id` goes as `X-Client-Request-Id`, for the upstream's logs."""
        body = request.body
        if request.form == "azure":
            assert request.deployment is not None
            if self._azure is not None:
                url = self._azure_url(request.deployment, request.api_version)
                return self._azure.request(url, body, scope, api_key, request_id)
            assert self._openai is not None
            body = body.model_copy(update={"model": request.deployment})
            return self._openai.request(self._openai_url, body, scope, api_key, request_id)
        if self._openai is not None:
            return self._openai.request(self._openai_url, body, scope, api_key, request_id)
        assert self._azure is not None
        url = self._azure_url(self._deployment_for(body.model), None)
        return self._azure.request(url, body, scope, api_key, request_id)

    def target(self, request: ImageRequest) -> str:
        """Which upstream `build` sends `request` to: "openai" or "azure"."""
        if request.form == "azure":
            return "azure" if self._azure is not None else "openai"
        return "openai" if self._openai is not None else "azure"

    def _deployment_for(self, model: str | None) -> str:
        if model is None:
            raise ProxyError(
                400,
                "Missing required parameter: 'model' (it names the Azure deployment).",
                param="model",
                code="missing_required_parameter",
            )
        deployment = self._deployments.get(model, model)
        if not is_valid_deployment(deployment):
            raise ProxyError(
                400,
                f"Invalid value for 'model': {model!r} is not a valid deployment name.",
                param="model",
                code="invalid_value",
            )
        return deployment

    def _azure_url(self, deployment: str, api_version: str | None) -> httpx.URL:
        key = (deployment, api_version or self._azure_version)
        url = self._azure_urls.get(key)
        if url is None:
            # Both parts were checked against conservative patterns; quote() is belt and braces.
            path = quote(deployment, safe="")
            version = quote(key[1], safe="")
            url = httpx.URL(f"{self._azure_base}{path}/images/generations?api-version={version}")
            self._azure_urls[key] = url  # parsed once: URL parsing shows in the profile
        return url


def failure_kind(exc: httpx.HTTPError) -> str:
    """How an upstream request failed before its response started, for logs and metrics."""
    if isinstance(exc, httpx.PoolTimeout):
        return "pool"
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
        return "connect"
    if isinstance(exc, httpx.TimeoutException):
        return "timeout"
    return "protocol"


def map_error(exc: httpx.HTTPError) -> ProxyError:
    """The answer for an upstream failure that happened before its response started."""
    if isinstance(exc, httpx.PoolTimeout):
        return server_error(503, "The proxy has no free upstream connection.", "proxy_overloaded")
    if isinstance(exc, httpx.ConnectTimeout):
        return server_error(504, "Timed out connecting to the upstream.", "upstream_timeout")
    if isinstance(exc, httpx.TimeoutException):
        # A retry would most likely wait just as long, and may be billed again.
        return server_error(
            504, "The upstream did not answer in time.", "upstream_timeout", retry=False
        )
    if isinstance(exc, httpx.ConnectError):
        return server_error(502, "Could not connect to the upstream.", "upstream_unreachable")
    return server_error(502, "The upstream connection failed.", "upstream_error")
