"""Where a request goes: the upstream URL, its credentials, and the HTTP client.

The upstream URL is built only from configuration and from values checked against
conservative patterns (deployment ids, api-versions). Headers going upstream are an
allow-list, so no client credential, cookie or forwarding header can leak through,
whatever it is called.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import quote

import httpx
from cachetools import LRUCache

from .config import AzureUpstream, ConfigError, OpenAIUpstream, ProxyConfig, ProxySettings
from .errors import ProxyError, server_error
from .headers import FORWARDED_REQUEST, FORWARDED_REQUEST_PREFIX, Headers
from .request import ImageGenerationBody, ImageRequest
from .routing import ENDPOINTS, ImageOperation, is_valid_deployment
from .types import Scope
from .upload import Upload

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
    # The relay reads SSE event boundaries and usage: it must see the bytes as sent.
    (b"accept-encoding", b"identity"),
]
_JSON = b"application/json"
Content = bytes | AsyncIterator[bytes]


class Target:
    """One configured upstream: its name, fixed headers and timeouts, computed once."""

    def __init__(
        self,
        name: str,
        settings: OpenAIUpstream | AzureUpstream,
        key_header: bytes,
        prefix: bytes = b"",
        extra: Headers | None = None,
    ) -> None:
        self.name = name
        self.total_timeout = settings.total_timeout
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
        content: Content,
        content_type: bytes,
        scope: Scope,
        api_key: str | None,
        request_id: str,
    ) -> httpx.Request:
        headers = [
            (key, value)
            for key, value in scope["headers"]
            if key in FORWARDED_REQUEST or key.startswith(FORWARDED_REQUEST_PREFIX)
        ]
        headers.append((b"x-client-request-id", request_id.encode()))
        headers.append((b"content-type", content_type))
        if api_key is None:
            headers += self.headers
        else:  # this client spends on its own upstream key
            headers += self._fixed + self._credentials(api_key)
        return httpx.Request(
            "POST", url, headers=headers, content=content, extensions=self.extensions
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
            self._openai_urls = {
                operation: httpx.URL(f"{config.openai.base_url}/images/{endpoint}")
                for operation, endpoint in ENDPOINTS.items()
            }
            org, project = config.openai.organization, config.openai.project
            identity = [(b"openai-organization", org.encode())] if org else []
            identity += [(b"openai-project", project.encode())] if project else []
            self._openai = Target("openai", config.openai, b"authorization", b"Bearer ", identity)
        if config.azure is not None:
            self._azure = Target("azure", config.azure, b"api-key")
            self._azure_base = config.azure.endpoint + "/openai/deployments/"
            self._azure_version = config.azure.api_version
            self._deployments = config.azure.deployments
            self._azure_urls: LRUCache[tuple[str, str, str], httpx.URL] = LRUCache(maxsize=1024)

    def build(
        self,
        request: ImageRequest,
        scope: Scope,
        api_key: str | None,
        request_id: str,
        upload: Upload | None = None,
    ) -> httpx.Request:
        """The upstream request; `api_key` replaces the configured upstream key, and
        `request_id` goes as `X-Client-Request-Id`, for the upstream's logs. An edit or
        variation sends the rest of its `upload` as it arrives."""
        operation = request.operation
        model = None  # the `model` to send instead of the client's
        if request.form == "azure" and self._azure is not None:
            assert request.deployment is not None
            target = self._azure
            url = self._azure_url(request.deployment, request.api_version, operation)
        elif request.form == "azure":
            assert self._openai is not None
            target, url = self._openai, self._openai_urls[operation]
            model = request.deployment
        elif self._openai is not None:
            target, url = self._openai, self._openai_urls[operation]
        else:
            assert self._azure is not None
            self._check_azure(operation)
            target = self._azure
            url = self._azure_url(self._deployment_for(request.model), None, operation)
        if upload is not None:
            content: Content = upload.body(None if model is None else {"model": model})
            content_type = upload.content_type
        else:
            body = request.body
            assert isinstance(body, ImageGenerationBody)
            if model is not None:
                body = body.model_copy(update={"model": model})
            content, content_type = body.to_json(), _JSON
        return target.request(url, content, content_type, scope, api_key, request_id)

    def target(self, request: ImageRequest) -> Target:
        """The upstream `build` sends `request` to."""
        if request.form == "azure":
            target = self._azure or self._openai
        else:
            target = self._openai or self._azure
        assert target is not None
        return target

    def check(self, operation: ImageOperation) -> None:
        """Refuse an operation no configured upstream serves (before anything is read)."""
        if self._openai is None:
            self._check_azure(operation)

    @staticmethod
    def _check_azure(operation: ImageOperation) -> None:
        if operation == "variation":
            raise ProxyError(
                404,
                "Image variations are not available on Azure OpenAI, the only upstream "
                "this proxy has.",
                code="unsupported_operation",
            )

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

    def _azure_url(
        self, deployment: str, api_version: str | None, operation: ImageOperation
    ) -> httpx.URL:
        endpoint = ENDPOINTS[operation]
        key = (deployment, api_version or self._azure_version, endpoint)
        url = self._azure_urls.get(key)
        if url is None:
            # Both parts were checked against conservative patterns; quote() is belt and braces.
            path = quote(deployment, safe="")
            version = quote(key[1], safe="")
            url = httpx.URL(f"{self._azure_base}{path}/images/{endpoint}?api-version={version}")
            self._azure_urls[key] = url  # parsed once: URL parsing shows in the profile
        return url


@dataclass(frozen=True, slots=True)
class Failure:
    """How an upstream exchange failed before its answer started: one row of `FAILURES`."""

    kind: str  # for the access log and metrics
    status: int
    code: str
    message: str
    retry: bool = True  # whether a client's retry may help (else x-should-retry: false)
    reached: bool = True  # whether the request may have reached the upstream, and be billed there

    def error(self) -> ProxyError:
        return server_error(self.status, self.message, self.code, retry=self.retry)


TIMED_OUT = Failure(
    "timeout",
    504,
    "upstream_timeout",
    "The upstream did not answer in time.",
    retry=False,  # a retry would most likely wait just as long, and may be billed again
    reached=True,
)
BROKEN = Failure(
    "protocol", 502, "upstream_error", "The upstream connection failed.", retry=True, reached=True
)
INVALID_STATUS = Failure(
    "protocol",
    502,
    "upstream_error",
    "The upstream answered with an invalid status.",
    retry=True,
    reached=True,
)
_NO_CONNECTION = Failure(
    "pool",
    503,
    "proxy_overloaded",
    "The proxy has no free upstream connection.",
    retry=True,
    reached=False,
)
_CONNECT_TIMEOUT = Failure(
    "connect",
    504,
    "upstream_timeout",
    "Timed out connecting to the upstream.",
    retry=True,
    reached=False,
)
_UNREACHABLE = Failure(
    "connect",
    502,
    "upstream_unreachable",
    "Could not connect to the upstream.",
    retry=True,
    reached=False,
)

# Each upstream failure once, most specific first (as httpx maps httpcore's exceptions).
# Only a request that provably never left the proxy is free: anything that may have
# reached the upstream may be generating there, and be billed.
FAILURES: tuple[tuple[type[Exception], Failure], ...] = (
    (httpx.PoolTimeout, _NO_CONNECTION),
    (httpx.ConnectTimeout, _CONNECT_TIMEOUT),
    (httpx.ConnectError, _UNREACHABLE),
    (httpx.TimeoutException, TIMED_OUT),
    (TimeoutError, TIMED_OUT),  # total_timeout, before the answer started
    (Exception, BROKEN),
)


def failure(exc: Exception) -> Failure:
    """The row of `FAILURES` for `exc`."""
    for kind, row in FAILURES:
        if isinstance(exc, kind):
            return row
    raise AssertionError("FAILURES ends with Exception")  # pragma: no cover
