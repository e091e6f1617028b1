"""The upstreams: `[openai]`, `[azure]`, the `[[upstreams]]` pool members and `[pool]`."""

from __future__ import annotations

from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator

from ..wire.routing import API_VERSION, is_valid_deployment
from .base import _from_env, _Section


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


class OpenAIUpstream(_Upstream):
    """`[openai]`: an OpenAI-compatible upstream (`base_url` ends where `/images/...` starts)."""

    base_url: str = "https://api.openai.com/v1"
    organization: str | None = None
    project: str | None = None

    @field_validator("base_url")
    @classmethod
    def _base_url(cls, value: str) -> str:
        return _http_url(value)

    @property
    def location(self) -> str:
        """Where it is, for people (mask it before showing it)."""
        return self.base_url

    def described(self) -> dict[str, str]:
        """Where it is, as `/healthz` and `--check-config` show it (masked)."""
        return {"base_url": mask_url(self.base_url)}


class AzureUpstream(_Upstream):
    """`[azure]`: an Azure OpenAI resource, called with the deployments path form."""

    endpoint: str
    api_version: str = "2025-04-01-preview"
    deployments: dict[str, str] = Field(default_factory=dict)

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, value: str) -> str:
        return _http_url(value)

    @property
    def location(self) -> str:
        """Where it is, for people (mask it before showing it)."""
        return self.endpoint

    def described(self) -> dict[str, str]:
        """Where it is, as `/healthz` and `--check-config` show it (masked)."""
        return {"endpoint": mask_url(self.endpoint), "api_version": self.api_version}

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


# Every kind of upstream's member: a new kind adds its own here (and in `upstream/kinds/`).
Member = OpenAIMember | AzureMember
UpstreamEntry = Annotated[Member, Field(discriminator="kind")]


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
