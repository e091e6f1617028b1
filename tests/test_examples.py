"""The examples stay runnable: each one is loaded and exercised here."""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import get_args

import httpx
import openai
import pytest
from conftest import CLIENT_KEY, proxy_config
from double import UpstreamDouble
from pydantic import BaseModel
from support import serve

from imagegen_proxy import ProxyConfig

EXAMPLES = Path(__file__).parent.parent / "examples"


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def config_keys() -> Iterator[tuple[str, str]]:
    """Every (section, key) a config file can hold."""
    for section, field in ProxyConfig.model_fields.items():
        for candidate in (field.annotation, *get_args(field.annotation)):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                for key in candidate.model_fields:
                    yield section, key


def test_example_config_is_valid_and_shows_every_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-1")
    monkeypatch.setenv("AZURE_OPENAI_API_KEY", "az-1")
    monkeypatch.setenv("TEAM_A_KEY", "team-a-key")
    monkeypatch.setenv("IMAGEGEN_ADMIN_KEY", "admin-key")
    config = ProxyConfig.from_toml(EXAMPLES / "config.example.toml")
    assert config.openai is not None and config.azure is not None
    text = (EXAMPLES / "config.example.toml").read_text()
    for section, key in config_keys():
        assert f"[{section}]" in text and re.search(rf"\b{key} =", text), f"{section}.{key}"


def test_starlette_example_serves_its_routes_and_proxies_images(
    upstream: UpstreamDouble,
) -> None:
    app = load("starlette_app").build(proxy_config(upstream))
    with serve(app) as url:
        assert httpx.get(url + "/").json()["app"] == "my internal platform"
        assert httpx.get(url + "/v1/models").json()["data"][0]["id"] == "gpt-image-1"
        client = openai.OpenAI(base_url=url + "/v1", api_key=CLIENT_KEY, max_retries=0)
        assert client.images.generate(prompt="p").data
    assert upstream.last.path == "/v1/images/generations"


def test_readme_reference_lists_every_key() -> None:
    rows = [
        line
        for line in (EXAMPLES.parent / "README.md").read_text().splitlines()
        if line.startswith("| `")
    ]
    for section, key in config_keys():
        assert any(
            f"`{section}.{key}`" in row or (f"`{section}." in row and f"{key}" in row)
            for row in rows
        ), f"{section}.{key} missing from the README's configuration reference"


def test_readme_reference_lists_every_upstream_key() -> None:
    """Every key of every kind's `[[upstreams]]` entry, as its own row or as `[openai]`'s
    and `[azure]`'s (whose keys the members of those kinds take)."""
    from imagegen_proxy.config import Member

    rows = [
        line
        for line in (EXAMPLES.parent / "README.md").read_text().splitlines()
        if line.startswith("| `")
    ]
    for member in get_args(Member):
        for key in member.model_fields:
            assert any(
                f"`upstreams[].{key}`" in row
                or f"`openai.{key}`" in row
                or f"`azure.{key}`" in row
                or (row.startswith("| `upstreams[].") and re.search(rf"\b{key}\b", row))
                for row in rows
            ), f"upstreams[].{key} ({member.__name__}) missing from the README's reference"


def test_the_readmes_pool_of_providers_is_a_valid_configuration() -> None:
    import tomllib

    readme = (EXAMPLES.parent / "README.md").read_text()
    section = readme[readme.index("## Other providers") :]
    block = section.split("```toml\n", 1)[1].split("```", 1)[0]
    config = ProxyConfig.model_validate(tomllib.loads(block))
    assert [member.kind for member in config.members()] == ["openai", "gemini", "bfl"]
