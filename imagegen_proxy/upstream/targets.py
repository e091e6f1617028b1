"""Where a request goes: the upstream URL, its credentials, and the HTTP client.

The upstream URL is built only from configuration and from values checked against
conservative patterns (deployment ids, api-versions). Headers going upstream are an
allow-list, so no client credential, cookie or forwarding header can leak through,
whatever it is called.

A request goes upstream as a `Call` of plain values and comes back as an `Answer`. The
default aiohttp transport sends a `Call` as it is; any httpx transport or client (a user's
own, with its hooks) gets it as an `httpx.Request` (`httpx_sender`): httpx stays the API,
and the hot path builds none of its objects (see bench/README.md).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import quote, urlsplit

import httpx
from cachetools import LRUCache

from ..config import AzureMember, ConfigError, OpenAIMember, ProxyConfig
from ..types import Scope
from ..wire.errors import ProxyError, server_error
from ..wire.headers import FORWARDED_REQUEST, FORWARDED_REQUEST_PREFIX
from ..wire.json_upload import Incoming, JsonUpload
from ..wire.request import ImageGenerationBody, ImageRequest
from ..wire.routing import ENDPOINTS, ImageOperation, is_valid_deployment

Content = bytes | AsyncIterator[bytes]
OPENAI_API_HOST = "api.openai.com"
# Upstream request headers: `str` pairs, what aiohttp takes (httpx takes them too).
TextHeaders = list[tuple[str, str]]


@dataclass(frozen=True, slots=True)
class Timeouts:
    """An upstream's timeouts, in seconds: httpx's four."""

    connect: float | None
    read: float | None
    write: float | None
    pool: float | None

    def as_httpx(self) -> dict[str, Any]:
        """As an httpx request's `timeout` extension."""
        return {"connect": self.connect, "read": self.read, "write": self.write, "pool": self.pool}


@dataclass(slots=True)
class Call:
    """One attempt's request to an upstream (always a POST), as plain values."""

    url: str
    headers: TextHeaders
    content: Content
    timeouts: Timeouts


class Answer(Protocol):
    """An upstream's answer, its body not read yet. `aclose()` must be awaited, once."""

    @property
    def status(self) -> int: ...

    @property
    def raw_headers(self) -> Sequence[tuple[bytes, bytes]]: ...

    def header(self, name: str) -> str | None:
        """The value of the (lower-case) header `name`, None without one."""
        ...

    def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives, as sent (never decoded); failures raise httpx's errors."""
        ...

    async def aclose(self) -> None: ...


SendUpstream = Callable[[Call], Awaitable[Answer]]
SendHttpx = Callable[[httpx.Request], Awaitable[httpx.Response]]


def client_sender(client: httpx.AsyncClient) -> SendUpstream:
    """Send through a user's own client, with its hooks, transport and settings."""

    async def send(request: httpx.Request) -> httpx.Response:
        return await client.send(request, stream=True)

    return httpx_sender(send)


def httpx_sender(send: SendHttpx) -> SendUpstream:
    """Send a `Call` as an `httpx.Request` with `send`."""

    async def send_call(call: Call) -> Answer:
        request = httpx.Request(
            "POST",
            call.url,
            headers=call.headers,
            content=call.content,
            extensions={"timeout": call.timeouts.as_httpx()},
        )
        return HttpxAnswer(await send(request))

    return send_call


class HttpxAnswer:
    """An `httpx.Response` as an `Answer`."""

    __slots__ = ("response",)

    def __init__(self, response: httpx.Response) -> None:
        self.response = response

    @property
    def status(self) -> int:
        return self.response.status_code

    @property
    def raw_headers(self) -> Sequence[tuple[bytes, bytes]]:
        return self.response.headers.raw

    def header(self, name: str) -> str | None:
        value: str | None = self.response.headers.get(name)
        return value

    def chunks(self) -> AsyncIterator[bytes]:
        return self.response.aiter_raw()

    async def aclose(self) -> None:
        await self.response.aclose()


# The relay reads SSE event boundaries and usage: it must see the bytes as sent.
_BASE_HEADERS: TextHeaders = [("accept-encoding", "identity")]
_JSON = "application/json"


class Target:
    """One configured upstream: its name, kind, URLs, fixed headers and timeouts, computed
    once; in a pool, also the models it serves, its weight and its priority."""

    def __init__(self, member: OpenAIMember | AzureMember) -> None:
        self.name = member.name
        self.kind = member.kind
        self.models = member.models
        self.weight, self.priority = member.weight, member.priority
        self.total_timeout = member.total_timeout
        # OpenAI's own API, whose shutdown dates `[limits] retired` applies; another
        # OpenAI-compatible service (a mock, a gateway) keeps serving what it serves.
        self.is_openai_api = False
        extra: TextHeaders = []
        if isinstance(member, OpenAIMember):
            self.is_openai_api = urlsplit(member.base_url).hostname == OPENAI_API_HOST
            self._key_header, self._key_prefix = "authorization", "Bearer "
            org, project = member.organization, member.project
            extra += [("openai-organization", org)] if org else []
            extra += [("openai-project", project)] if project else []
            self._urls = {
                operation: f"{member.base_url}/images/{endpoint}"
                for operation, endpoint in ENDPOINTS.items()
            }
        else:
            self._key_header, self._key_prefix = "api-key", ""
            self._azure_base = member.endpoint + "/openai/deployments/"
            self.api_version = member.api_version
            self.deployments = member.deployments
            self._azure_urls: LRUCache[tuple[str, str, str], str] = LRUCache(maxsize=1024)
        self._fixed = _BASE_HEADERS + extra
        key = None if member.api_key is None else member.api_key.get_secret_value()
        self.headers = self._fixed + self._credentials(key)
        self.timeouts = Timeouts(
            connect=member.connect_timeout,
            read=member.read_timeout,
            write=member.write_timeout,
            pool=member.pool_timeout,
        )

    def serves(self, model: str | None) -> bool:
        return self.models is None or model in self.models

    def _credentials(self, key: str | None) -> TextHeaders:
        return [] if key is None else [(self._key_header, self._key_prefix + key)]

    def openai_url(self, operation: ImageOperation) -> str:
        return self._urls[operation]

    def azure_url(self, deployment: str, api_version: str | None, operation: ImageOperation) -> str:
        endpoint = ENDPOINTS[operation]
        key = (deployment, api_version or self.api_version, endpoint)
        url = self._azure_urls.get(key)
        if url is None:
            # Both parts were checked against conservative patterns; quote() is belt and braces.
            path = quote(deployment, safe="")
            version = quote(key[1], safe="")
            url = f"{self._azure_base}{path}/images/{endpoint}?api-version={version}"
            self._azure_urls[key] = url
        return url

    def deployment_for(self, model: str | None) -> str:
        """This Azure upstream's deployment for `model` (`deployments[model]`, else the
        model's own name)."""
        if model is None:
            raise ProxyError(
                400,
                "Missing required parameter: 'model' (it names the Azure deployment).",
                param="model",
                code="missing_required_parameter",
            )
        deployment = self.deployments.get(model, model)
        if not is_valid_deployment(deployment):
            raise ProxyError(
                400,
                f"Invalid value for 'model': {model!r} is not a valid deployment name.",
                param="model",
                code="invalid_value",
            )
        return deployment

    def call(
        self,
        url: str,
        content: Content,
        content_type: str,
        scope: Scope,
        api_key: str | None,
        request_id: str,
    ) -> Call:
        headers = [
            (key.decode("latin-1"), value.decode("latin-1"))
            for key, value in scope["headers"]
            if key in FORWARDED_REQUEST or key.startswith(FORWARDED_REQUEST_PREFIX)
        ]
        headers.append(("x-client-request-id", request_id))
        headers.append(("content-type", content_type))
        if api_key is None:
            headers += self.headers
        else:  # this client spends on its own upstream key
            headers += self._fixed + self._credentials(api_key)
        return Call(url, headers, content, self.timeouts)


class Upstreams:
    """Turns a normalized request into the upstream request, for either form to either
    kind of upstream.

    Without a pool (`[openai]` and `[azure]` alone), OpenAI-form requests go to `[openai]`
    when configured, else to `[azure]` with the deployment `deployments[model]` (or the
    model name); Azure-form requests go to `[azure]` when configured, else to `[openai]`
    with the deployment as the model. In a pool (`ProxyConfig.pooled`), `pool.Pool` orders
    the upstreams that serve the model, the Azure form's deployment id naming the model.
    """

    def __init__(self, config: ProxyConfig) -> None:
        if not config.has_upstream:
            raise ConfigError("no upstream configured: add an [openai] or [azure] section")
        self.pooled = config.pooled
        self.targets = [Target(member) for member in config.members()]
        self._openai = self._azure = None
        if not self.pooled:
            for target in self.targets:
                if target.kind == "openai":
                    self._openai = target
                else:
                    self._azure = target

    def build(
        self,
        request: ImageRequest,
        target: Target,
        scope: Scope,
        api_key: str | None,
        request_id: str,
        upload: Incoming | None = None,
    ) -> Call:
        """The upstream request to `target`; `api_key` replaces the configured upstream
        key, and `request_id` goes as `X-Client-Request-Id`, for the upstream's logs. An
        edit or variation sends the rest of its `upload` as it arrives."""
        operation = request.operation
        model = None  # the `model` to send instead of the client's
        if target.kind == "azure":
            if request.deployment is not None and not self.pooled:
                deployment = request.deployment  # the client named it: as today
            else:
                deployment = target.deployment_for(request.model)
            url = target.azure_url(deployment, request.api_version, operation)
        else:
            url = target.openai_url(operation)
            if request.form == "azure":
                model = request.deployment
        content: Content
        if isinstance(upload, JsonUpload):
            edit = request.body
            assert isinstance(edit, ImageGenerationBody)
            if model is not None:
                edit = edit.model_copy(update={"model": model})
            content, content_type = upload.body(edit.to_json()), _JSON
        elif upload is not None:
            content = upload.body(None if model is None else {"model": model})
            content_type = upload.content_type.decode("latin-1")
        else:
            body = request.body
            assert isinstance(body, ImageGenerationBody)
            if model is not None:
                body = body.model_copy(update={"model": model})
            content, content_type = body.to_json(), _JSON
        return target.call(url, content, content_type, scope, api_key, request_id)

    def target(self, request: ImageRequest) -> Target:
        """The upstream a request goes to without a pool."""
        if request.form == "azure":
            target = self._azure or self._openai
        else:
            target = self._openai or self._azure
        assert target is not None
        return target

    def check(self, operation: ImageOperation) -> None:
        """Refuse an operation no configured upstream serves (before anything is read)."""
        if operation == "variation" and all(t.kind == "azure" for t in self.targets):
            raise ProxyError(
                404,
                "Image variations are not available on Azure OpenAI, the only upstream "
                "this proxy has.",
                code="unsupported_operation",
            )


@dataclass(frozen=True, slots=True)
class Failure:
    """How an upstream exchange failed before its answer started: one row of `FAILURES`."""

    kind: str  # for the access log and metrics
    status: int
    code: str
    message: str
    retry: bool = True  # whether a client's retry may help (else x-should-retry: false)
    reached: bool = True  # whether the request may have reached the upstream, and be billed there
    failover: bool = False  # whether a pool may try the next upstream instead

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
    "protocol",
    502,
    "upstream_error",
    "The upstream connection failed.",
    retry=True,
    reached=True,
    failover=True,  # refused or reset before any answer
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
    failover=True,
)
_UNREACHABLE = Failure(
    "connect",
    502,
    "upstream_unreachable",
    "Could not connect to the upstream.",
    retry=True,
    reached=False,
    failover=True,
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
