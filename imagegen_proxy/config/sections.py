"""`[server]`, `[proxy]`, `[auth]`, `[limits]`, `[store]` and the other one-table sections."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from ..wire.headers import HOP_BY_HOP, is_forwarded_upstream
from .base import _Section


def _header_name(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9-]+", value):
        raise ValueError(f"{value!r} is not an HTTP header name")
    return value.lower()


def _http_url(value: str | None) -> str | None:
    if value is None:
        return value
    if not value.startswith(("http://", "https://")) or "@" in value.split("/")[2]:
        raise ValueError("must be an http:// or https:// URL, without credentials")
    return value.rstrip("/")


# Headers the proxy reads for its own purposes: never a place for a client key.
_RESERVED_HEADERS = frozenset(
    {"authorization", "host", "content-type", "content-length", "x-client-request-id"}
)


class ServerConfig(_Section):
    """`[server]`: the bundled proxy's listener and its front door (uvicorn's protocol)."""

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    openapi_path: str = "/openapi.json"
    # A request's line and headers, together; beyond either limit: 431 and close.
    max_header_bytes: int = Field(64 * 1024, ge=1024)
    max_header_count: int = Field(100, ge=8)
    # From a connection's start (or the end of its previous response) until a request's
    # headers are complete; then 408 (or a silent close, if nothing came) and close.
    header_timeout: float = Field(10.0, gt=0)
    # Client connections held at once; None: sized to the open-files limit at start-up.
    max_connections: int | None = Field(None, gt=0)
    # A second listener for /healthz details and /metrics, without credentials.
    ops_host: str = "127.0.0.1"
    ops_port: int | None = Field(None, ge=0, le=65535)


class ProxySettings(_Section):
    mount_prefix: str = ""
    max_body_bytes: int = Field(1024 * 1024, gt=0)
    body_timeout: float = Field(30.0, gt=0)
    max_connections: int = Field(4096, gt=0)
    max_keepalive_connections: int = Field(512, ge=0)
    # Below the upstream's own idle timeout (uvicorn's default is 5 s): a pooled connection
    # the upstream closes just as a burst reuses it gets a reset, and that request a 502.
    keepalive_expiry: float = Field(4.0, gt=0)
    transport: Literal["aiohttp", "httpx"] = "aiohttp"
    # An answer larger than this is cut (JSON) or ended with an error event (SSE).
    max_response_bytes: int = Field(512 * 1024 * 1024, gt=0)
    # Edits and variations: the multipart upload's size (413 beyond) and file parts (400).
    max_upload_bytes: int = Field(64 * 1024 * 1024, gt=0)
    max_upload_files: int = Field(16, gt=0)
    # `GET /v1/models` (and `/models`, `/openai/v1/models`): the models served, answered by
    # the proxy. Unset: with a pool, and in the bundled proxy; otherwise the path is the
    # host app's.
    list_models: bool | None = None
    # Upstream response headers to relay beyond the built-in allow-list (headers.py).
    forward_response_headers: tuple[str, ...] = ()

    @field_validator("forward_response_headers")
    @classmethod
    def _response_headers(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        names = tuple(_header_name(name) for name in value)
        hop = [name for name in names if name in HOP_BY_HOP or name == "set-cookie"]
        if hop:
            raise ValueError(f"{hop[0]!r} must not be relayed (hop-by-hop or a cookie)")
        return names

    @field_validator("mount_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        value = value.rstrip("/")
        if value and not value.startswith("/"):
            raise ValueError("must start with '/', e.g. \"/ai\"")
        return value


class AuthConfig(_Section):
    open: bool = False
    virtual_key_header: str = "x-virtual-key"

    @field_validator("virtual_key_header")
    @classmethod
    def _key_header(cls, value: str) -> str:
        name = _header_name(value)
        if is_forwarded_upstream(name):
            # The client's key would travel to the upstream with it.
            raise ValueError(f"{name!r} is forwarded to the upstream: choose another header")
        if name in _RESERVED_HEADERS or name in HOP_BY_HOP or name == "x-request-id":
            raise ValueError(f"{name!r} has another meaning: choose another header")
        return name


class LimitsConfig(_Section):
    storage: str = "memory"
    on_storage_error: Literal["deny", "allow"] = "deny"
    # A model without a price, asked for by a key or project with a budget: refused (403
    # model_not_priced) or served with its cost unknown.
    unpriced: Literal["deny", "allow"] = "deny"
    # A model past its `shutdown_date`, bound for OpenAI: refused (404 model_not_found,
    # naming its replacement) before it waits in line, or sent on as asked.
    retired: Literal["refuse", "pass"] = "refuse"
    concurrency_lease_seconds: float = Field(3600.0, gt=0)

    @field_validator("storage")
    @classmethod
    def _storage(cls, value: str) -> str:
        if value != "memory" and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError('must be "memory" or a redis:// URL')
        return value


class AccessLogConfig(_Section):
    """`[access_log]`: one line per proxied request on the `imagegen_proxy.access` logger."""

    enabled: bool = True
    format: Literal["json", "kv"] = "json"
    log_prompts: bool = False


class MetricsConfig(_Section):
    """`[metrics]`: Prometheus metrics (needs the `metrics` extra: prometheus-client)."""

    enabled: bool = False
    path: str = "/metrics"

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError('must start with "/"')
        return value


class TracingConfig(_Section):
    """`[tracing]`: OpenTelemetry traces of every proxied request, exported over OTLP (the
    `tracing` extra; `tracing-grpc` for gRPC). What is left unset comes from the standard
    `OTEL_*` environment variables, then the SDK's defaults."""

    enabled: bool = False
    # OTLP/HTTP: the collector's base URL ("/v1/traces" is added), or the full traces URL;
    # gRPC: "http://host:4317" (https:// for TLS). Unset: OTEL_EXPORTER_OTLP_*_ENDPOINT.
    endpoint: str | None = None
    protocol: Literal["http/protobuf", "grpc"] | None = None  # unset: OTEL_EXPORTER_OTLP_*
    service_name: str | None = None  # unset: OTEL_SERVICE_NAME, else "imagegen-proxy"
    # The share of new traces kept; a caller's sampled flag is always followed. Unset:
    # OTEL_TRACES_SAMPLER (and _ARG), else every trace.
    sample_ratio: float | None = Field(None, ge=0, le=1)
    # The environment variable holding the exporter's headers, "name=value,name=value" (a
    # collector's token never sits in the file); OTEL_EXPORTER_OTLP_HEADERS works too.
    headers_env: str | None = None
    # Embedded in an app that set up OpenTelemetry itself: its global tracer provider
    # gets the spans, and the settings above are the app's.
    global_provider: bool = False

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        return _http_url(value)


class IdempotencyConfig(_Section):
    """`[idempotency]`: retries that never pay twice (see `idempotency`)."""

    enabled: bool = True
    ttl: float = Field(600.0, gt=0)  # seconds a finished answer is kept for replays
    grace: float = Field(10.0, ge=0)  # seconds a generation outlives its last client
    sdk_retries: bool = True  # deduplicate the SDK's retries (x-stainless-retry-count >= 1)
    max_bytes: int = Field(1024**3, gt=0)  # finished answers kept, in all; oldest dropped first
    spool_dir: str | None = None  # where answers are spooled; default: the system's temp dir


class ConsoleConfig(_Section):
    """`[console]`: the operators' web pages on the bundled proxy (the `console` extra:
    Jinja2 and itsdangerous). Signed in with the `[admin]` key."""

    enabled: bool | None = None  # None: on when the console extra is installed
    path: str = Field("/console", pattern=r"^(/[A-Za-z0-9._~-]+)+$")
    session_hours: float = Field(8.0, gt=0, le=24 * 30)
    # The session cookie's Secure flag: set it when clients reach the proxy over HTTPS
    # (behind a TLS terminator), so that the cookie never travels in clear.
    secure_cookie: bool = False


class StoreConfig(_Section):
    """`[store]`: a database of projects and keys, changed while the proxy runs (the `store`
    extra). `sqlite:///path/proxy.db` or `postgresql://user@host/db`."""

    url: str | None = None
    # How long what the store says of a key is kept: a revoked key stops working within it.
    cache_seconds: float = Field(1.0, ge=0)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("sqlite:///", "postgresql://")):
            raise ValueError('must be "sqlite:///PATH" or "postgresql://USER@HOST/DB"')
        return value


class StorageConfig(_Section):
    """`[storage]`: where images are kept and served by URL (`response_format="url"`):
    `file:///path` (served by the proxy at signed, expiring URLs under `public_url`) or
    `s3://bucket/prefix` on any S3-compatible store (the `s3` extra)."""

    url: str | None = None
    endpoint_url: str | None = None  # an S3-compatible service other than AWS's
    region: str | None = None
    access_key_id_env: str | None = None  # absent: the standard AWS credential chain
    secret_access_key_env: str | None = None
    url_ttl: float = Field(3600.0, gt=0, le=7 * 24 * 3600)  # S3 presigns a week at most
    keep: Literal["asked", "always"] = "asked"
    on_error: Literal["fail", "inline"] = "fail"
    retention_days: int | None = Field(None, ge=1)
    public_url: str | None = None  # file://: where clients reach this proxy
    signing_key_env: str | None = None  # file://: the URLs' HMAC key (absent: per process)
    part_size: int = Field(8 * 1024 * 1024, ge=5 * 1024 * 1024)  # S3's least part

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is None:
            return value
        if value.startswith("file:///") and len(value) > len("file:///"):
            return value
        if re.fullmatch(r"s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[^\s]*)?", value):
            return value.rstrip("/")
        raise ValueError('must be "file:///PATH" or "s3://BUCKET[/PREFIX]"')

    @field_validator("public_url", "endpoint_url")
    @classmethod
    def _http(cls, value: str | None) -> str | None:
        return _http_url(value)

    @model_validator(mode="after")
    def _keys(self) -> StorageConfig:
        if (self.access_key_id_env is None) != (self.secret_access_key_env is None):
            raise ValueError("set access_key_id_env and secret_access_key_env together")
        return self

    @property
    def is_file(self) -> bool:
        return self.url is not None and self.url.startswith("file://")


class MockConfig(_Section):
    """`[mock]`: the embedded mock upstream the bundled proxy serves when no upstream is set."""

    delay: float = Field(0.0, ge=0)
    pad_to: int = Field(0, ge=0)
