"""The proxy's configuration: one pydantic model, loadable from TOML."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from .routing import API_VERSION, is_valid_deployment


class ConfigError(ValueError):
    """A configuration mistake, with a message meant for the person who made it."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerConfig(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)


class ProxySettings(_Section):
    mount_prefix: str = ""
    max_body_bytes: int = Field(1024 * 1024, gt=0)
    max_connections: int = Field(4096, gt=0)
    max_keepalive_connections: int = Field(512, ge=0)

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

    @model_validator(mode="before")
    @classmethod
    def _resolve_key(cls, data: Any) -> Any:
        # The key is read once, at start-up, so a missing variable fails loudly there.
        if not isinstance(data, dict) or not isinstance(data.get("api_key_env"), str):
            return data
        if data.get("api_key") is not None:
            raise ValueError("set api_key or api_key_env, not both")
        value = os.environ.get(data["api_key_env"])
        if not value:
            raise ValueError(f"environment variable {data['api_key_env']} is not set")
        return {**data, "api_key": value}


def _http_url(value: str) -> str:
    if not value.startswith(("http://", "https://")) or len(value) < 10:
        raise ValueError("must be an http:// or https:// URL")
    return value.rstrip("/")


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


class AuthConfig(_Section):
    open: bool = False


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
    auth: AuthConfig = Field(default_factory=AuthConfig)
    mock: MockConfig = Field(default_factory=MockConfig)

    @property
    def has_upstream(self) -> bool:
        return self.openai is not None or self.azure is not None

    @classmethod
    def from_toml(cls, path: str | os.PathLike[str]) -> ProxyConfig:
        """Load a TOML file; every mistake becomes a `ConfigError` naming the file and key."""
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such file") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read: {exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: invalid TOML: {exc}") from None
        return cls.from_mapping(data, source=str(path))

    @classmethod
    def from_mapping(cls, data: dict[str, Any], *, source: str = "config") -> ProxyConfig:
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(f"{source}: {describe(exc)}") from None


def describe(exc: ValidationError) -> str:
    """One line per problem, each naming the dotted key: `openai.read_timeout: ...`."""
    lines = []
    for error in exc.errors():
        key = ".".join(str(part) for part in error["loc"]) or "(top level)"
        if error["type"] == "extra_forbidden":
            lines.append(f"unknown key '{key}'")
        else:
            message = error["msg"].removeprefix("Value error, ")
            lines.append(f"{key}: {message}")
    return "; ".join(lines)
