"""The proxy's configuration: one pydantic model, loadable from TOML."""

from __future__ import annotations

import os
from typing import Any

from pydantic import Field, ValidationError, model_validator

from .base import ConfigError, _Section
from .loading import describe, read_toml, store_url_of
from .policy import POLICY_BOUNDS, AdminConfig, BudgetPeriod, KeyConfig, Policy, ProjectConfig
from .prices import PriceConfig
from .sections import (
    AccessLogConfig,
    AuthConfig,
    ConsoleConfig,
    IdempotencyConfig,
    LimitsConfig,
    MetricsConfig,
    MockConfig,
    ProxySettings,
    ServerConfig,
    StorageConfig,
    StoreConfig,
    TracingConfig,
)
from .upstreams import (
    AzureMember,
    AzureUpstream,
    BedrockMember,
    BflMember,
    GeminiMember,
    Member,
    OpenAIMember,
    OpenAIUpstream,
    PoolConfig,
    PoolMember,
    ProviderUpstream,
    StabilityMember,
    UpstreamEntry,
    is_valid_provider_model,
    mask_url,
)

__all__ = [
    "POLICY_BOUNDS",
    "AccessLogConfig",
    "AdminConfig",
    "AuthConfig",
    "AzureMember",
    "AzureUpstream",
    "BedrockMember",
    "BflMember",
    "BudgetPeriod",
    "ConfigError",
    "ConsoleConfig",
    "GeminiMember",
    "IdempotencyConfig",
    "KeyConfig",
    "LimitsConfig",
    "Member",
    "MetricsConfig",
    "MockConfig",
    "OpenAIMember",
    "OpenAIUpstream",
    "Policy",
    "PoolConfig",
    "PoolMember",
    "PriceConfig",
    "ProjectConfig",
    "ProviderUpstream",
    "ProxyConfig",
    "ProxySettings",
    "ServerConfig",
    "StabilityMember",
    "StorageConfig",
    "StoreConfig",
    "TracingConfig",
    "UpstreamEntry",
    "describe",
    "is_valid_provider_model",
    "mask_url",
    "read_toml",
    "store_url_of",
]


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
    storage: StorageConfig = Field(default_factory=StorageConfig)
    mock: MockConfig = Field(default_factory=MockConfig)
    access_log: AccessLogConfig = Field(default_factory=AccessLogConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    tracing: TracingConfig = Field(default_factory=TracingConfig)
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

    def members(self) -> list[Member]:
        """The pool: `[[upstreams]]`, or the shorthand sections as members named "openai"
        and "azure"."""
        if self.upstreams:
            return list(self.upstreams)
        members: list[Member] = []
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
