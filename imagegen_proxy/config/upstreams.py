"""The upstreams: `[openai]`, `[azure]`, the `[[upstreams]]` pool members and `[pool]`."""

from __future__ import annotations

import re
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

    @property
    def has_credentials(self) -> bool:
        """Whether requests to it carry credentials (a key, or what its kind makes them of)."""
        return self.api_key is not None


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
    # A client's model name (a pool's alias) -> the one sent upstream in its place.
    model_map: dict[str, str] = Field(default_factory=dict)

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


# A provider's model name goes into its URL path: only names of this shape are sent.
PROVIDER_MODEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


def is_valid_provider_model(name: str) -> bool:
    """Whether `name` may name a provider's model in its URL path."""
    return PROVIDER_MODEL.fullmatch(name) is not None and ".." not in name


class ProviderUpstream(_Upstream, PoolMember):
    """What every kind that speaks its own API (not OpenAI's) shares: its `base_url`, the
    provider's `model` for a request that names none, and `model_map` from the names
    clients use (a pool's alias) to the provider's own."""

    base_url: str
    model: str | None = None
    model_map: dict[str, str] = Field(default_factory=dict)

    @field_validator("base_url")
    @classmethod
    def _base_url(cls, value: str) -> str:
        return _http_url(value)

    @field_validator("model")
    @classmethod
    def _model(cls, value: str | None) -> str | None:
        if value is not None and not is_valid_provider_model(value):
            raise ValueError(f"invalid model name {value!r}")
        return value

    @field_validator("model_map")
    @classmethod
    def _model_map(cls, value: dict[str, str]) -> dict[str, str]:
        bad = [name for name in value.values() if not is_valid_provider_model(name)]
        if bad:
            raise ValueError(f"invalid model name {bad[0]!r}")
        return value

    @property
    def location(self) -> str:
        """Where it is, for people (mask it before showing it)."""
        return self.base_url

    def described(self) -> dict[str, str]:
        """Where it is, as `/healthz` and `--check-config` show it (masked)."""
        return {"base_url": mask_url(self.base_url)}


class GeminiMember(ProviderUpstream):
    """`[[upstreams]]` with `kind = "gemini"`: Google's Gemini image models through the
    Gemini API (`x-goog-api-key`), or through Vertex AI with `vertex_project` (a service
    account's OAuth token from `credentials_file`, or Application Default Credentials)."""

    kind: Literal["gemini"]
    base_url: str = "https://generativelanguage.googleapis.com"
    vertex_project: str | None = Field(None, pattern=r"^[a-z][a-z0-9-]{4,61}[a-z0-9]$")
    vertex_location: str = Field("global", pattern=r"^[a-z0-9-]{1,40}$")
    credentials_file: str | None = None

    @property
    def has_credentials(self) -> bool:
        return self.api_key is not None or self.vertex_project is not None

    @model_validator(mode="after")
    def _vertex(self) -> GeminiMember:
        if self.credentials_file is not None and self.vertex_project is None:
            raise ValueError("credentials_file is for Vertex AI: set vertex_project too")
        return self


class BflMember(ProviderUpstream):
    """`[[upstreams]]` with `kind = "bfl"`: Black Forest Labs' FLUX API (`x-key`): a task
    submitted, polled every `poll_interval` seconds (growing to `poll_max_interval`), its
    image fetched from the signed URL it names, which must be on `result_hosts`."""

    kind: Literal["bfl"]
    base_url: str = "https://api.bfl.ai"
    poll_interval: float = Field(0.5, gt=0, le=60)
    poll_max_interval: float = Field(4.0, gt=0, le=300)
    # A host of the polling and result URLs the API answers: exactly, or "*." + a domain.
    result_hosts: list[str] = Field(default_factory=lambda: ["*.bfl.ai", "*.bfl.ml"])

    @model_validator(mode="after")
    def _poll(self) -> BflMember:
        if self.poll_max_interval < self.poll_interval:
            raise ValueError("poll_max_interval must not be below poll_interval")
        return self


class StabilityMember(ProviderUpstream):
    """`[[upstreams]]` with `kind = "stability"`: Stability AI's Stable Image API (v2beta,
    `Authorization: Bearer`); the model names the service (`ultra`, `core`) or an SD3 model."""

    kind: Literal["stability"]
    base_url: str = "https://api.stability.ai"


class BedrockMember(ProviderUpstream):
    """`[[upstreams]]` with `kind = "bedrock"`: Amazon Bedrock's runtime in `region`,
    requests signed with SigV4 (botocore) from the standard AWS credential chain, or from
    `aws_access_key_id` and the secret in `aws_secret_access_key_env`; or a Bedrock API key
    (`api_key`, sent as a bearer token). `base_url` defaults to the region's endpoint."""

    kind: Literal["bedrock"]
    base_url: str = ""
    region: str = Field(pattern=r"^[a-z]{2}(-[a-z]+)+-[0-9]$")
    aws_access_key_id: str | None = Field(None, pattern=r"^[A-Z0-9]{16,128}$")
    aws_secret_access_key_env: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _endpoint(cls, data: Any) -> Any:
        if isinstance(data, dict) and not data.get("base_url") and data.get("region"):
            data = {**data, "base_url": f"https://bedrock-runtime.{data['region']}.amazonaws.com"}
        return data

    @model_validator(mode="after")
    def _keys(self) -> BedrockMember:
        if (self.aws_access_key_id is None) != (self.aws_secret_access_key_env is None):
            raise ValueError("set aws_access_key_id and aws_secret_access_key_env together")
        if self.api_key is not None and self.aws_access_key_id is not None:
            raise ValueError("set api_key (a Bedrock API key) or aws_access_key_id, not both")
        return self

    @property
    def has_credentials(self) -> bool:
        return True  # a key, given keys, or the AWS credential chain at request time

    def described(self) -> dict[str, str]:
        return {**super().described(), "region": self.region}


# Every kind of upstream's member: a new kind adds its own here (and in `upstream/kinds/`).
Member = OpenAIMember | AzureMember | GeminiMember | BflMember | StabilityMember | BedrockMember
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
