"""The shipped OpenAPI document: valid, served, and what the proxy really accepts and answers."""

from __future__ import annotations

from collections.abc import Iterator
from importlib import resources
from typing import Any

import httpx
import pytest
import schemathesis
import yaml
from hypothesis import HealthCheck, given, settings
from openapi_spec_validator import validate
from test_cli import running

DOCUMENT = yaml.safe_load(resources.files("imagegen_proxy").joinpath("openapi.yaml").read_text())


def test_the_document_is_valid_openapi_3_1() -> None:
    validate(DOCUMENT)
    assert DOCUMENT["openapi"].startswith("3.1")


def test_the_document_lists_every_proxy_path() -> None:
    from imagegen_proxy.routing import OPENAI_PATHS

    paths = set(DOCUMENT["paths"])
    assert set(OPENAI_PATHS) | {"/openai/deployments/{deployment-id}/images/generations"} == paths


KEY = "sk-openapi-0123456789"


@pytest.fixture(scope="module")
def bundled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The command as it runs in production (client keys required), on the mock upstream."""
    config = tmp_path_factory.mktemp("openapi") / "proxy.toml"
    config.write_text(f'[[keys]]\nname = "fuzz"\nkey = "{KEY}"\n')
    with running("--config", str(config)) as (url, _):
        yield url


def test_the_bundled_proxy_serves_it(bundled: str) -> None:
    served = httpx.get(bundled + "/openapi.json").json()
    assert served["paths"] == DOCUMENT["paths"]
    assert served["servers"] == [{"url": "/"}]


@pytest.fixture(scope="module")
def api_schema(bundled: str) -> Any:
    api = schemathesis.openapi.from_url(bundled + "/openapi.json")

    @api.auth()
    class ClientKey:
        """The real key, known to schemathesis as such: it also checks that requests
        without it, or with a made-up one, are refused."""

        def get(self, case: Any, context: Any) -> str:
            return KEY

        def set(self, case: Any, data: str, context: Any) -> None:
            case.headers = {**(case.headers or {}), "Authorization": f"Bearer {data}"}

    return api


def conform(api_schema: Any, path: str, examples: int) -> None:
    """Schemathesis's cases for one operation (valid and invalid data, odd headers and
    methods): no 500, and every answer is what the document says."""

    @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck))
    @given(case=api_schema[path]["POST"].as_strategy())
    def run(case: Any) -> None:
        case.call_and_validate()

    run()


# Driven through schemathesis's Python API: its pytest plugin does not run on pytest 9.
@pytest.mark.parametrize("path", list(DOCUMENT["paths"]))
def test_answers_conform_to_the_document(api_schema: Any, path: str) -> None:
    conform(api_schema, path, examples=25)


@pytest.mark.long
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("path", list(DOCUMENT["paths"]))
def test_answers_conform_to_the_document_long(api_schema: Any, path: str) -> None:
    conform(api_schema, path, examples=2000)
