"""ProxyConfig: TOML and keyword construction, and the mistakes it names."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest
from conftest import proxy_config
from double import UpstreamDouble
from pydantic import ValidationError
from starlette.applications import Starlette
from support import serve

from imagegen_proxy import ConfigError, ImageGenProxy, ProxyConfig

FULL = """
[server]
host = "0.0.0.0"
port = 9000

[proxy]
mount_prefix = "/ai/"
max_body_bytes = 2048

[openai]
base_url = "https://api.openai.com/v1/"
api_key = "sk-test"
organization = "org-1"
read_timeout = 900

[azure]
endpoint = "https://res.openai.azure.com"
api_key_env = "TEST_AZURE_KEY"
api_version = "2024-10-21"
deployments = { "gpt-image-1" = "images-prod" }

[auth]
open = true
"""


def test_from_toml_reads_every_section(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_AZURE_KEY", "azure-secret")
    path = tmp_path / "c.toml"
    path.write_text(FULL)
    config = ProxyConfig.from_toml(path)
    assert (config.server.host, config.server.port) == ("0.0.0.0", 9000)
    assert config.proxy.mount_prefix == "/ai"
    assert config.openai is not None and config.openai.base_url == "https://api.openai.com/v1"
    assert config.openai.read_timeout == 900
    assert config.azure is not None
    assert config.azure.api_key is not None
    assert config.azure.api_key.get_secret_value() == "azure-secret"
    assert config.azure.deployments == {"gpt-image-1": "images-prod"}


def test_secrets_do_not_show_in_repr(tmp_path: Path) -> None:
    config = ProxyConfig(openai={"api_key": "sk-very-secret"})  # type: ignore[arg-type]
    assert "sk-very-secret" not in repr(config)
    assert "sk-very-secret" not in config.model_dump_json()


def test_keyword_construction_names_the_bad_key() -> None:
    with pytest.raises(ValidationError, match=r"openai\.read_timeout"):
        ProxyConfig(openai={"read_timeout": -1})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"opneai": {}}, "unknown key 'opneai'"),
        ({"openai": {"base_url": "ftp://x"}}, "openai.base_url: must be an http"),
        ({"openai": {"api_key": "a", "api_key_env": "B"}}, "not both"),
        ({"azure": {"endpoint": "https://x.example", "api_version": "a b"}}, "azure.api_version"),
        ({"azure": {"endpoint": "https://x.example", "deployments": {"m": "../x"}}}, "'../x'"),
        ({"proxy": {"mount_prefix": "ai"}}, "proxy.mount_prefix: must start with '/'"),
        ({"proxy": {"max_body_bytes": 0}}, "proxy.max_body_bytes"),
        ({"server": {"port": 70000}}, "server.port"),
        ({"server": {"max_header_bytes": 10}}, "server.max_header_bytes"),
        ({"openai": {"total_timeout": 0}}, "openai.total_timeout"),
        ({"proxy": {"forward_response_headers": ["Connection"]}}, "'connection' must not"),
        ({"proxy": {"forward_response_headers": ["set-cookie"]}}, "'set-cookie' must not"),
        ({"admin": {"key": "a", "key_sha256": "0" * 64}}, "admin: set one of"),
        # An entry of a list by its name, not its place; by its place when it has none.
        (
            {"keys": [{"name": "a", "key": "sk-a"}, {"name": "bot", "budget_usd": -1}]},
            "keys[bot].budget_usd",
        ),
        ({"keys": [{"key": "sk-a", "rpm": 1}]}, "unknown key 'keys.0.rpm'"),
        # A number or a switch written as a string is a mistake, not converted.
        (
            {"keys": [{"name": "bot", "key": "sk-a", "requests_per_minute": "3"}]},
            "keys[bot].requests_per_minute: a number, not the string '3'",
        ),
        ({"server": {"port": "8000"}}, "server.port: a number, not the string '8000'"),
        ({"proxy": {"list_models": "yes"}}, "proxy.list_models: true or false, not the string"),
        (
            {"projects": [{"name": "growth", "max_concurrent": 0}]},
            "projects[growth].max_concurrent",
        ),
    ],
)
def test_mistakes_name_the_key(data: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)) as error:
        ProxyConfig.from_mapping(data)
    assert "\n" not in str(error.value)


def test_proxy_refuses_to_start_without_an_upstream() -> None:
    with pytest.raises(ConfigError, match=r"add an \[openai\] or \[azure\] section"):
        ImageGenProxy(Starlette(), ProxyConfig(auth={"open": True}))  # type: ignore[arg-type]


def test_proxy_refuses_to_start_open_unless_told() -> None:
    with pytest.raises(ConfigError, match=r"\[auth\] open = true"):
        ImageGenProxy(Starlette(), ProxyConfig(openai={}))  # type: ignore[arg-type]


def test_add_middleware_form_works(upstream: UpstreamDouble) -> None:
    app = Starlette()
    app.add_middleware(ImageGenProxy, config=proxy_config(upstream))
    with serve(app) as url:
        answer = httpx.post(url + "/v1/images/generations", json={"prompt": "p"})
    assert answer.status_code == 200  # the bare Starlette app alone would say 404
    assert upstream.last.json == {"prompt": "p"}


@pytest.mark.parametrize(
    "section",
    [
        {"openai": {"base_url": "https://user:hunter2@api.example.com/v1"}},
        {"openai": {"base_url": "https://hunter2@api.example.com/v1"}},
        {"azure": {"endpoint": "https://u:hunter2@x.openai.azure.com"}},
    ],
)
def test_credentials_in_an_upstream_url_are_refused_with_the_reason(
    section: dict[str, object],
) -> None:
    with pytest.raises(ConfigError, match="must not contain credentials") as error:
        ProxyConfig.from_mapping(section)
    assert "api_key" in str(error.value)


@pytest.mark.parametrize(
    "header", ["x-stainless-lang", "User-Agent", "accept", "authorization", "x-request-id"]
)
def test_a_virtual_key_header_that_would_travel_upstream_is_refused(header: str) -> None:
    with pytest.raises(ConfigError, match=r"auth\.virtual_key_header"):
        ProxyConfig.from_mapping({"auth": {"virtual_key_header": header}})


def test_the_admin_key_cannot_also_be_a_client_key() -> None:
    with pytest.raises(ConfigError, match="also a client key"):
        ProxyConfig.from_mapping({"admin": {"key": "same"}, "keys": [{"name": "a", "key": "same"}]})


def test_check_config_masks_passwords_in_the_redis_and_store_urls(tmp_path: Path) -> None:
    from imagegen_proxy.server.app import resolved

    config = ProxyConfig.from_mapping(
        {
            "limits": {"storage": "redis://u:hunter2@127.0.0.1/0"},
            "store": {"url": "postgresql://imagegen:hunter2@db.internal/imagegen"},
        }
    )
    assert "hunter2" not in json.dumps(resolved(config))
