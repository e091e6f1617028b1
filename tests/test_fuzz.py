"""Property-based fuzzing of the proxy over real sockets: bodies, headers, paths, queries.

Whatever arrives, the answer is a success or an OpenAI-shaped error, never a 500. The quick
profile runs in CI; `pytest -m long tests/test_fuzz.py` runs 10,000 requests.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from conftest import CLIENT_KEY, HostApp, proxy_config
from double import UpstreamDouble
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import serve

from imagegen_proxy import ImageGenProxy

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
fields = st.fixed_dictionaries(
    {},
    optional={
        "prompt": st.text() | json_values,
        "n": st.integers(-5, 20) | json_values,
        "stream": st.booleans() | json_values,
        "partial_images": st.integers(-2, 6) | json_values,
        "output_compression": st.integers(-10, 120) | json_values,
        "size": st.text(max_size=12) | json_values,
        "model": st.text(max_size=20) | json_values,
    },
)
bodies = st.one_of(
    st.builds(
        lambda d, extra: json.dumps({**extra, **d}).encode(),
        fields,
        st.dictionaries(st.text(max_size=10), json_values, max_size=3),
    ),
    st.binary(max_size=300),
    st.integers(1, 3000).map(lambda depth: b"[" * depth + b"]" * depth),
    st.integers(1, 3000).map(lambda depth: b'{"prompt": ' + b"[" * depth + b"]" * depth + b"}"),
)
hostile = st.lists(
    st.characters(codec="utf-8") | st.sampled_from(["\r\n", "\x00", "/", "..", "%", "?", "#"]),
    max_size=12,
).map("".join)
paths = st.one_of(
    st.sampled_from(
        [
            "/v1/images/generations",
            "/images/generations",
            "/openai/v1/images/generations",
            "/openai/images/generations",
        ]
    ),
    hostile.map(lambda dep: f"/openai/deployments/{quote(dep, safe='')}/images/generations"),
    hostile.map(lambda rest: "/v1/images/" + quote(rest, safe="/")),
)
queries = st.dictionaries(
    st.sampled_from(["api-version", "x", "api-version "]), hostile, max_size=2
)
# Visible ASCII, no surrounding blanks: what an HTTP client can send at all.
header_value = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40).map(
    str.strip
)
headers = st.fixed_dictionaries(
    {},
    optional={
        "authorization": st.sampled_from([f"Bearer {CLIENT_KEY}", "Basic !!", "Bearer", ""])
        | header_value,
        "api-key": st.just(CLIENT_KEY) | header_value,
        "x-virtual-key": header_value,
        "content-type": st.sampled_from(["application/json", "text/plain", "application/x+json"])
        | header_value,
        "x-forwarded-for": header_value,
    },
)
methods = st.sampled_from(["POST"] * 6 + ["GET", "PUT", "DELETE", "PATCH", "OPTIONS"])


@pytest.fixture(scope="module")
def target() -> Iterator[str]:
    upstream = UpstreamDouble()
    with serve(upstream) as upstream_url:
        upstream.url = upstream_url
        keys = [{"name": "fuzz", "key": CLIENT_KEY, "requests_per_minute": 10**9}]
        config = proxy_config(
            upstream, azure=True, auth={"open": False}, keys=keys, proxy={"max_body_bytes": 4096}
        )
        with serve(ImageGenProxy(HostApp().app, config)) as url:
            yield url


def check(
    url: str, method: str, path: str, query: dict[str, str], head: dict[str, str], body: bytes
) -> None:
    answer = httpx.request(method, url + path, params=query, headers=head, content=body, timeout=30)
    assert answer.status_code < 500, answer.text[:300]
    if answer.status_code >= 400 and answer.headers.get("content-type") == "application/json":
        error: Any = answer.json()["error"]
        assert set(error) >= {"message", "type", "param", "code"}


def fuzz(url: str, examples: int) -> None:
    @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck))
    @given(methods, paths, queries, headers, bodies)
    def run(
        method: str, path: str, query: dict[str, str], head: dict[str, str], body: bytes
    ) -> None:
        check(url, method, path, query, head, body)

    run()


def test_fuzzed_requests_get_a_success_or_an_openai_error(target: str) -> None:
    fuzz(target, examples=300)


@pytest.mark.long
@pytest.mark.timeout(3600)
def test_fuzzed_requests_long(target: str) -> None:
    fuzz(target, examples=10_000)
