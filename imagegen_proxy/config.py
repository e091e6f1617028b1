"""The proxy's configuration: one pydantic model, loadable from TOML."""

from __future__ import annotations

import datetime
import functools
import hashlib
import os
import re
import tomllib
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from .wire.headers import HOP_BY_HOP, is_forwarded_upstream
from .wire.routing import API_VERSION, is_valid_deployment


class ConfigError(ValueError):
    """A configuration mistake, with a message meant for the person who made it."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _no_strings_for_numbers(cls, data: Any) -> Any:
        """A number or a switch written as a string (`requests_per_minute = "3"`) is a
        mistake, not something to convert: TOML, JSON and the forms all have numbers."""
        if isinstance(data, Mapping):
            for name, value in data.items():
                if isinstance(value, str) and name in cls.model_fields:
                    wanted = _scalars(cls, name)
                    if wanted:
                        raise PydanticCustomError(
                            "string_for_number",
                            "{wanted}, not the string {shown}",
                            {"field": name, "wanted": " or ".join(wanted), "shown": repr(value)},
                        )
        return data


@functools.cache
def _scalars(section: type[BaseModel], name: str) -> tuple[str, ...]:
    """What a field takes of number and boolean, if it takes no string: ("a number",)."""
    kinds = typing.get_args(annotation := section.model_fields[name].annotation) or (annotation,)
    if str in kinds or Path in kinds:
        return ()
    said = {int: "a number", float: "a number", bool: "true or false"}
    return tuple(dict.fromkeys(said[kind] for kind in kinds if kind in said))


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


class _Upstream(_Section):
    api_key: SecretStr | None = None
    api_key_env: str | None = None
    connect_timeout: float = Field(10.0, gt=0)
    read_timeout: float = Field(600.0, gt=0)
    write_timeout: float = Field(60.0, gt=0)
    pool_timeout: float = Field(10.0, gt=0)
    # The whole generation, however chatty the upstream: read_timeout bounds only silences.
    total_timeout: float = Field(900.0, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _resolve_key(cls, data: Any) -> Any:
        return _from_env(data, "api_key_env", "api_key") if isinstance(data, dict) else data


def _from_env(data: dict[str, Any], env_key: str, key: str) -> dict[str, Any]:
    """Read `data[env_key]`'s variable into `data[key]`, once, at start-up: a missing
    variable fails loudly there rather than on the first request."""
    name = data.get(env_key)
    if not isinstance(name, str):
        return data
    if data.get(key) is not None:
        raise ValueError(f"set {key} or {env_key}, not both")
    value = os.environ.get(name)
    if not value:
        raise ValueError(f"environment variable {name} is not set")
    return {**data, key: value}


def _http_url(value: str) -> str:
    if not value.startswith(("http://", "https://")) or len(value) < 10:
        raise ValueError("must be an http:// or https:// URL")
    if "@" in urlsplit(value).netloc:
        # It would be printed in the banner, /healthz and logs, and httpx would not send it.
        raise ValueError(
            "must not contain credentials (user:password@): put the key in api_key or api_key_env"
        )
    return value.rstrip("/")


def mask_url(url: str) -> str:
    """`url` fit to print: a password in it replaced by asterisks."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":**********@")
    return parts._replace(netloc=netloc).geturl()


def _header_name(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9-]+", value):
        raise ValueError(f"{value!r} is not an HTTP header name")
    return value.lower()


# Headers the proxy reads for its own purposes: never a place for a client key.
_RESERVED_HEADERS = frozenset(
    {"authorization", "host", "content-type", "content-length", "x-client-request-id"}
)


class OpenAIUpstream(_Upstream):
    """`[openai]`: an OpenAI-compatible upstream (`base_url` ends where `/images/...` starts)."""

    base_url: str = "https://api.openai.com/v1"
    organization: str | None = None
    project: str | None = None

    @field_validator("base_url")
    @classmethod
    def _base_url(cls, value: str) -> str:
        return _http_url(value)


class AzureUpstream(_Upstream):
    """`[azure]`: an Azure OpenAI resource, called with the deployments path form."""

    endpoint: str
    api_version: str = "2025-04-01-preview"
    deployments: dict[str, str] = Field(default_factory=dict)

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, value: str) -> str:
        return _http_url(value)

    @field_validator("api_version")
    @classmethod
    def _version(cls, value: str) -> str:
        if API_VERSION.fullmatch(value) is None:
            raise ValueError("not a valid api-version")
        return value

    @field_validator("deployments")
    @classmethod
    def _deployments(cls, value: dict[str, str]) -> dict[str, str]:
        bad = [name for name in value.values() if not is_valid_deployment(name)]
        if bad:
            raise ValueError(f"invalid deployment name {bad[0]!r}")
        return value


class PoolMember(_Section):
    """What `[[upstreams]]` entries add to an upstream's settings: how the pool uses it."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    models: frozenset[str] | None = None  # the models it serves; absent: every model
    weight: int = Field(1, gt=0)
    priority: int = Field(1, ge=0)  # lower first; a higher tier only when the lower are out


class OpenAIMember(OpenAIUpstream, PoolMember):
    """`[[upstreams]]` with `kind = "openai"`."""

    kind: Literal["openai"]


class AzureMember(AzureUpstream, PoolMember):
    """`[[upstreams]]` with `kind = "azure"`: `deployments` maps a model to its deployment
    here (absent: the model's own name)."""

    kind: Literal["azure"]


UpstreamEntry = Annotated[OpenAIMember | AzureMember, Field(discriminator="kind")]


class PoolConfig(_Section):
    """`[pool]`: failover and cooldowns between upstreams."""

    max_attempts: int = Field(3, ge=1, le=10)
    failures_to_open: int = Field(3, ge=1)
    cooldown_min: float = Field(1.0, gt=0)  # seconds out after failures_to_open failures...
    cooldown_max: float = Field(60.0, gt=0)  # ...doubling each time, up to this

    @model_validator(mode="after")
    def _bounds(self) -> PoolConfig:
        if self.cooldown_max < self.cooldown_min:
            raise ValueError("cooldown_max must not be below cooldown_min")
        return self


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


BudgetPeriod = Literal["day", "week", "month", "total"]


_MAX_COUNT = 2**53  # exact in a float, and far beyond any real limit
_COUNTS = (
    "requests_per_minute",
    "images_per_minute",
    "max_concurrent",
    "images_per_day",
    "tokens_per_day",
)
_MAX_BUDGET_USD = 1e9  # a billion dollars: 1e15 micro-USD, exact in 64 bits


class Policy(_Section):
    """What a client (a key, or a project's keys together) may do; absent limits are
    unlimited."""

    models: frozenset[str] | None = None
    denied_models: frozenset[str] | None = None  # a deny-list, checked after `models`
    # Finite and bounded, whichever way they come (configuration, Admin API, CLI, console):
    # the store and the limiters keep them as 64-bit integers (budgets in micro-USD).
    requests_per_minute: int | None = Field(None, gt=0, le=_MAX_COUNT)
    images_per_minute: int | None = Field(None, gt=0, le=_MAX_COUNT)
    max_concurrent: int | None = Field(None, gt=0, le=_MAX_COUNT)
    images_per_day: int | None = Field(None, gt=0, le=_MAX_COUNT)
    tokens_per_day: int | None = Field(None, gt=0, le=_MAX_COUNT)
    budget_usd: float | None = Field(None, gt=0, le=_MAX_BUDGET_USD, allow_inf_nan=False)
    budget_period: BudgetPeriod = "month"  # calendar periods in UTC; weeks start on Monday

    @property
    def limited(self) -> bool:
        """Whether any count-based limit or a budget is set (the model allow-list is not
        one)."""
        return any(getattr(self, name) is not None for name in _LIMITS)

    def allows(self, model: str) -> bool:
        """Whether the model lists let `model` through."""
        if self.models is not None and model not in self.models:
            return False
        return self.denied_models is None or model not in self.denied_models

    @property
    def budget_micros(self) -> int | None:
        """The budget in millionths of a dollar, the unit every cost is counted in."""
        return None if self.budget_usd is None else round(self.budget_usd * 1_000_000)


# The most each limit may be: what a stored row beyond it is read as (store.stored_policy).
POLICY_BOUNDS: dict[str, float] = {
    **{name: _MAX_COUNT for name in _COUNTS},
    "budget_usd": _MAX_BUDGET_USD,
}

_LIMITS = [
    name for name in Policy.model_fields if name not in ("models", "denied_models", "budget_period")
]


class ProjectConfig(Policy):
    """`[[projects]]`: a group of keys sharing limits and a budget (OpenAI's word for it)."""

    name: str = Field(min_length=1)


class KeyConfig(Policy):
    """`[[keys]]`: one client key, its name, and its policy."""

    name: str = Field(min_length=1)
    project: str | None = None  # a [[projects]] name: its limits apply too
    key: SecretStr | None = None
    key_sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$")
    key_env: str | None = None
    username: str | None = None
    upstream_api_key: SecretStr | None = None
    upstream_api_key_env: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _resolve_env(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = _from_env(data, "key_env", "key")
        return _from_env(data, "upstream_api_key_env", "upstream_api_key")

    @model_validator(mode="after")
    def _one_key(self) -> KeyConfig:
        if (self.key is None) == (self.key_sha256 is None):
            raise ValueError("set exactly one of key, key_sha256 or key_env")
        return self

    @property
    def digest(self) -> bytes:
        """SHA-256 of the key: all the proxy keeps to recognise it."""
        if self.key_sha256 is not None:
            return bytes.fromhex(self.key_sha256)
        assert self.key is not None
        return hashlib.sha256(self.key.get_secret_value().encode()).digest()


class AdminConfig(_Section):
    """`[admin]`: the operator's key. It unlocks `/healthz` details and `/metrics`."""

    key: SecretStr | None = None
    key_env: str | None = None
    key_sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$")
    # The admin API without the admin key: for open mode only (the no-config mode sets it
    # on loopback, like the rest of that mode).
    open: bool = False

    @model_validator(mode="before")
    @classmethod
    def _resolve_env(cls, data: Any) -> Any:
        return _from_env(data, "key_env", "key") if isinstance(data, dict) else data

    @model_validator(mode="after")
    def _one_key(self) -> AdminConfig:
        if self.key is not None and self.key_sha256 is not None:
            raise ValueError("set one of key, key_sha256 or key_env")
        return self

    @property
    def digest(self) -> bytes | None:
        """SHA-256 of the admin key, or None when there is none."""
        if self.key_sha256 is not None:
            return bytes.fromhex(self.key_sha256)
        if self.key is None:
            return None
        return hashlib.sha256(self.key.get_secret_value().encode()).digest()


_PRICE_KEY = re.compile(r"\d{2,5}x\d{2,5}/[a-z0-9_-]+")


class PriceConfig(_Section):
    """`[prices."MODEL"]`: what a model's images cost, in USD. Token-priced (per 1M tokens,
    with the output tokens of one image by "WIDTHxHEIGHT/quality"), priced per image, or
    `same_as` another model. Over a shipped entry of the same name, the fields given win."""

    same_as: str | None = None
    input_text_per_mtok: float | None = Field(None, ge=0)
    input_image_per_mtok: float | None = Field(None, ge=0)
    output_image_per_mtok: float | None = Field(None, ge=0)
    output_tokens: dict[str, int] = Field(default_factory=dict)
    partial_image_tokens: int = Field(100, ge=0)
    # Text the model writes besides the image (gpt-image-1.5): its price (absent: the image
    # output price) and the tokens of it to reserve per image.
    output_text_per_mtok: float | None = Field(None, ge=0)
    output_text_tokens: int = Field(0, ge=0)
    # The most input tokens one image of an edit can take, reserved against budgets until
    # the upstream reports the real figure. OpenAI publishes no bound: this one is an
    # assumption (an input image is no denser than the dearest output image).
    input_image_tokens: int = Field(6240, ge=0)
    per_image: dict[str, float] = Field(default_factory=dict)
    source: str | None = None  # where the figures come from, and when they were checked
    # When OpenAI shut the model down (or will): `/v1/models` says so, as OpenAI's does.
    shutdown_date: datetime.date | None = None
    # The model OpenAI names in its place, once shut down (see `[limits] retired`).
    replacement: str | None = None

    @field_validator("output_tokens", "per_image")
    @classmethod
    def _keys(cls, value: dict[str, Any]) -> dict[str, Any]:
        bad = [key for key in value if _PRICE_KEY.fullmatch(key) is None]
        if bad:
            raise ValueError(f'{bad[0]!r}: keys are "WIDTHxHEIGHT/quality", e.g. "1024x1024/high"')
        if any(number < 0 for number in value.values()):
            raise ValueError("must not be negative")
        return value


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


class MockConfig(_Section):
    """`[mock]`: the embedded mock upstream the bundled proxy serves when no upstream is set."""

    delay: float = Field(0.0, ge=0)
    pad_to: int = Field(0, ge=0)


class ProxyConfig(_Section):
    """Everything `ImageGenProxy` and the `imagegen-proxy` command are configured with."""

    server: ServerConfig = Field(default_factory=ServerConfig)
    proxy: ProxySettings = Field(default_factory=ProxySettings)
    openai: OpenAIUpstream | None = None
    azure: AzureUpstream | None = None
    upstreams: list[UpstreamEntry] = Field(default_factory=list)
    pool: PoolConfig | None = None
    auth: AuthConfig = Field(default_factory=AuthConfig)
    admin: AdminConfig = Field(default_factory=AdminConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    keys: list[KeyConfig] = Field(default_factory=list)
    projects: list[ProjectConfig] = Field(default_factory=list)
    prices: dict[str, PriceConfig] = Field(default_factory=dict)
    store: StoreConfig = Field(default_factory=StoreConfig)
    mock: MockConfig = Field(default_factory=MockConfig)
    access_log: AccessLogConfig = Field(default_factory=AccessLogConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    console: ConsoleConfig = Field(default_factory=ConsoleConfig)
    idempotency: IdempotencyConfig = Field(default_factory=IdempotencyConfig)

    @model_validator(mode="after")
    def _distinct_keys(self) -> ProxyConfig:
        names = [key.name for key in self.keys]
        if len(set(names)) != len(names):
            raise ValueError("two [[keys]] entries have the same name")
        if len({key.digest for key in self.keys}) != len(self.keys):
            raise ValueError("two [[keys]] entries have the same key")
        projects = [project.name for project in self.projects]
        if len(set(projects)) != len(projects):
            raise ValueError("two [[projects]] entries have the same name")
        for key in self.keys:
            if key.project is not None and key.project not in projects:
                raise ValueError(f"key {key.name!r}: no [[projects]] entry named {key.project!r}")
        if self.admin.digest is not None and self.admin.digest in {k.digest for k in self.keys}:
            raise ValueError("the [admin] key is also a client key: give them different keys")
        if self.auth.open and self.keys:
            raise ValueError("[auth] open = true serves without keys: remove it or the [[keys]]")
        if self.admin.open and not self.auth.open:
            raise ValueError("[admin] open = true is for open mode ([auth] open = true) only")
        names = [upstream.name for upstream in self.upstreams]
        if len(set(names)) != len(names):
            raise ValueError("two [[upstreams]] entries have the same name")
        if self.upstreams and (self.openai is not None or self.azure is not None):
            raise ValueError("[[upstreams]] replaces [openai] and [azure]: keep one or the other")
        return self

    @property
    def has_upstream(self) -> bool:
        return self.openai is not None or self.azure is not None or bool(self.upstreams)

    @property
    def pooled(self) -> bool:
        """Whether the upstreams form a pool (failover, cooldowns): `[[upstreams]]` or
        `[pool]`. The shorthand sections alone route as they always did."""
        return bool(self.upstreams) or self.pool is not None

    def members(self) -> list[OpenAIMember | AzureMember]:
        """The pool: `[[upstreams]]`, or the shorthand sections as members named "openai"
        and "azure"."""
        if self.upstreams:
            return list(self.upstreams)
        members: list[OpenAIMember | AzureMember] = []
        if self.openai is not None:
            settings = {k: v for k, v in self.openai if k != "api_key_env"}
            members.append(OpenAIMember(kind="openai", name="openai", **settings))
        if self.azure is not None:
            settings = {k: v for k, v in self.azure if k != "api_key_env"}
            members.append(AzureMember(kind="azure", name="azure", **settings))
        return members

    @classmethod
    def from_toml(cls, path: str | os.PathLike[str]) -> ProxyConfig:
        """Load a TOML file; every mistake becomes a `ConfigError` naming the file and key."""
        return cls.from_mapping(read_toml(path), source=str(path))

    @classmethod
    def from_mapping(cls, data: dict[str, Any], *, source: str = "config") -> ProxyConfig:
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(f"{source}: {describe(exc, data)}") from None


def _named(loc: tuple[int | str, ...], data: Mapping[str, Any]) -> list[str]:
    """`("keys", 1, "budget_usd")` as `["keys[checkout-bot]", "budget_usd"]` when entry 1
    has a name."""
    parts = [str(part) for part in loc]
    if len(loc) >= 2 and loc[0] in ("keys", "projects", "upstreams") and isinstance(loc[1], int):
        entries = data.get(str(loc[0]))
        entry = entries[loc[1]] if isinstance(entries, list) and loc[1] < len(entries) else None
        name = entry.get("name") if isinstance(entry, dict) else None
        if isinstance(name, str) and name:
            parts[:2] = [f"{loc[0]}[{name}]"]
    return parts


def read_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A TOML file's tables, not yet checked; a `ConfigError` naming the file if unreadable."""
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None


def store_url_of(path: str | os.PathLike[str]) -> str | None:
    """The `[store] url` of a configuration file, checked alone: the shell commands need
    nothing else of it (no upstream, no secret in the environment)."""
    section = read_toml(path).get("store") or {}
    try:
        return StoreConfig.model_validate(section).url
    except ValidationError as exc:
        raise ConfigError(f"{path}: store.{describe(exc)}") from None


def describe(exc: ValidationError, data: Mapping[str, Any] | None = None) -> str:
    """One line per problem, each naming the dotted key: `openai.read_timeout: ...`; an
    entry of `[[keys]]`, `[[projects]]` or `[[upstreams]]` by its name where it has one
    (`keys[checkout-bot].budget_usd`), else by its place (`keys.1`)."""
    lines = []
    for error in exc.errors():
        loc = error["loc"]
        if error["type"] == "string_for_number":  # raised by the section, for one of its keys
            loc = (*loc, error["ctx"]["field"])
        key = ".".join(str(part) for part in _named(loc, data or {}))
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            lines.append(f"unknown key '{key}'")
        else:
            lines.append(f"{key}: {message}" if key else message)
    return "; ".join(lines)
