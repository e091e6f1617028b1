"""The shipped OpenAPI document: valid, served, and what the proxy really accepts and answers."""

from __future__ import annotations

from collections.abc import Iterator
from importlib import resources
from typing import Any

import httpx
import pytest
import schemathesis
import yaml
from double import multipart_parts
from hypothesis import HealthCheck, given, settings
from openapi_spec_validator import validate
from python_multipart.multipart import parse_options_header
from test_cli import running

from imagegen_proxy.wire.upload import FILE_FIELDS

DOCUMENT = yaml.safe_load(
    resources.files("imagegen_proxy.server").joinpath("openapi.yaml").read_text()
)


def test_the_document_is_valid_openapi_3_1() -> None:
    validate(DOCUMENT)
    assert DOCUMENT["openapi"].startswith("3.1")


def test_the_document_lists_every_proxy_path() -> None:
    from imagegen_proxy.wire.routing import MODELS_PATHS, OPENAI_PATHS

    azure = {
        "/openai/deployments/{deployment-id}/images/generations",
        "/openai/deployments/{deployment-id}/images/edits",
    }
    assert set(DOCUMENT["paths"]) == set(OPENAI_PATHS) | azure | set(MODELS_PATHS)


KEY = "sk-openapi-0123456789"
WHATWG_ESCAPES = str.maketrans({'"': "%22", "\r": "%0D", "\n": "%0A"})


@pytest.fixture(scope="module")
def bundled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The command as it runs in production (client keys required), on the mock upstream,
    as a pool (of one), which also serves the models."""
    config = tmp_path_factory.mktemp("openapi") / "proxy.toml"
    config.write_text(f'[[keys]]\nname = "fuzz"\nkey = "{KEY}"\n[pool]\n')
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


def is_upload(path: str) -> bool:
    """Edits and variations: multipart uploads (edits may be JSON too)."""
    return path.endswith(("/edits", "/variations"))


def sdk_order(body: dict[str, Any]) -> None:
    """Put the parts in the official SDK's order, text fields before files, as the document
    asks (a deciding field after a file part is refused).

    In place: a case whose body is assigned anew is validated again, and schemathesis
    counts any body holding binary data as invalid, which would turn the case negative."""
    ordered = sorted(body.items(), key=lambda item: item[0] in FILE_FIELDS)
    body.clear()
    body.update(ordered)


def declared_files(path: str) -> set[str]:
    """The file fields the document declares for `path`'s upload (schemathesis sends other
    names, e.g. an undeclared `mask` on a variation, as text parts)."""
    body = DOCUMENT["paths"][path]["post"]["requestBody"]["$ref"].rsplit("/", 1)[1]
    content = DOCUMENT["components"]["requestBodies"][body]["content"]["multipart/form-data"]
    schema = DOCUMENT["components"]["schemas"][content["schema"]["$ref"].rsplit("/", 1)[1]]
    return set(schema["properties"]) & FILE_FIELDS


def read_back(name: str) -> str:
    """A part's `name` as a multipart reader reads it from `name="..."`."""
    _, options = parse_options_header(f'form-data; name="{name}"'.encode())
    return options[b"name"].decode()


def check_sent_as_multipart(case: Any, response: Any) -> None:
    """What schemathesis sent is a multipart body with one part per generated value, the
    files (with a filename) after the text fields."""
    request = response.request
    content_type = request.headers["Content-Type"]
    assert content_type.startswith("multipart/form-data; boundary="), content_type
    parts = multipart_parts(request.body, content_type)
    expected: list[tuple[str, Any]] = [
        (name, value)
        for name, values in case.body.items()
        for value in (values if isinstance(values, list) else [values])
    ]
    # Names as browsers and urllib3 write them (WHATWG): quotes and line breaks escaped,
    # a backslash left as it is; then read back as a quoted string (where `\\` is `\`),
    # as the parts were.
    escaped = [read_back(name.translate(WHATWG_ESCAPES)) for name, _ in expected]
    assert [name for name, _, _ in parts] == escaped
    files = declared_files(case.operation.path)
    for (name, filename, content), (_, value) in zip(parts, expected, strict=True):
        if name in files:
            sent: bytes = getattr(value, "data", value)  # schemathesis's Binary, or bytes
            assert filename is not None
            assert content == sent


def conform(api_schema: Any, path: str, examples: int) -> None:
    """Schemathesis's cases for one operation (valid and invalid data, odd headers and
    methods): no 500, and every answer is what the document says."""
    [method] = DOCUMENT["paths"][path]

    @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck))
    @given(case=api_schema[path][method.upper()].as_strategy())
    def run(case: Any) -> None:
        # Edits come as multipart uploads or (GPT image models) as JSON.
        multipart = is_upload(path) and case.media_type != "application/json"
        if multipart:
            assert case.media_type == "multipart/form-data"
            sdk_order(case.body)
        response = case.call_and_validate()
        if multipart:
            check_sent_as_multipart(case, response)

    run()


# Driven through schemathesis's Python API: its pytest plugin does not run on pytest 9.
@pytest.mark.parametrize("path", list(DOCUMENT["paths"]))
def test_answers_conform_to_the_document(api_schema: Any, path: str) -> None:
    # Uploads cost more (the mock decodes and paints images): fewer of them, so that the
    # file stays within a minute.
    conform(api_schema, path, examples=15 if is_upload(path) else 25)


@pytest.mark.long
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("path", list(DOCUMENT["paths"]))
def test_answers_conform_to_the_document_long(api_schema: Any, path: str) -> None:
    conform(api_schema, path, examples=2000)
