"""What the proxy accepts, refuses, and passes upstream."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest
from conftest import CLIENT_KEY, UPSTREAM_KEY
from double import UpstreamDouble
from support import raw_request, read_response

PATH = "/v1/images/generations"


def post(proxy: str, body: Any, **kwargs: Any) -> httpx.Response:
    return httpx.post(proxy + PATH, json=body, **kwargs)


def test_unknown_fields_and_values_pass_through(proxy: str, upstream: UpstreamDouble) -> None:
    client = openai.OpenAI(base_url=proxy + "/v1", api_key=CLIENT_KEY, max_retries=0)
    client.images.generate(
        model="gpt-image-2",
        prompt="a lighthouse",
        size="2048x1152",  # type: ignore[arg-type]
        quality="xhigh",  # type: ignore[arg-type]
        output_format="avif",  # type: ignore[arg-type]
        extra_body={"safety_identifier": "user-42", "future": {"nested": [1, 2.5, None]}},
    )
    assert upstream.last.json == {
        "model": "gpt-image-2",
        "prompt": "a lighthouse",
        "size": "2048x1152",
        "quality": "xhigh",
        "output_format": "avif",
        "safety_identifier": "user-42",
        "future": {"nested": [1, 2.5, None]},
    }


def test_gpt_image_2_6_parameters_round_trip_through_the_sdk(
    proxy: str, upstream: UpstreamDouble
) -> None:
    client = openai.OpenAI(base_url=proxy + "/v1", api_key=CLIENT_KEY, max_retries=0)
    asked = {"complexity": "low", "frame_count": 6, "frame_duration_ms": 150}
    client.images.generate(
        model="gpt-image-2.6-sunburst",
        prompt="a spinning coin",
        quality="max",  # type: ignore[arg-type]
        output_format="gif",  # type: ignore[arg-type]
        extra_body=asked,
    )
    assert upstream.last.json == {
        "model": "gpt-image-2.6-sunburst",
        "prompt": "a spinning coin",
        "quality": "max",
        "output_format": "gif",
        **asked,
    }


def test_integral_floats_count_as_integers(proxy: str, upstream: UpstreamDouble) -> None:
    assert post(proxy, {"prompt": "p", "n": 2.0, "output_compression": 50.0}).status_code == 200
    assert upstream.last.json == {"prompt": "p", "n": 2, "output_compression": 50}


def test_explicit_nulls_pass_through(proxy: str, upstream: UpstreamDouble) -> None:
    assert post(proxy, {"prompt": "p", "size": None, "n": None}).status_code == 200
    assert upstream.last.json == {"prompt": "p", "size": None, "n": None}


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({}, "prompt", "missing_required_parameter"),
        ({"prompt": ""}, "prompt", "empty_string"),
        ({"prompt": 5}, "prompt", "invalid_type"),
        ({"prompt": "p", "n": 0}, "n", "integer_below_min_value"),
        ({"prompt": "p", "n": 11}, "n", "integer_above_max_value"),
        ({"prompt": "p", "n": "2"}, "n", "invalid_type"),
        ({"prompt": "p", "n": True}, "n", "invalid_type"),
        ({"prompt": "p", "n": 1.5}, "n", "invalid_type"),
        ({"prompt": "p", "n": 11.0}, "n", "integer_above_max_value"),
        ({"prompt": "p", "n": 10**30}, "n", "integer_above_max_value"),
        ({"prompt": "p", "stream": "true"}, "stream", "invalid_type"),
        ({"prompt": "p", "partial_images": 4}, "partial_images", "integer_above_max_value"),
        (
            {"prompt": "p", "output_compression": -1},
            "output_compression",
            "integer_below_min_value",
        ),
        (
            {"prompt": "p", "output_compression": 101},
            "output_compression",
            "integer_above_max_value",
        ),
        ({"prompt": "p", "size": 1024}, "size", "invalid_type"),
        ({"prompt": "p", "frame_count": 1}, "frame_count", "integer_below_min_value"),
        ({"prompt": "p", "frame_count": 17}, "frame_count", "integer_above_max_value"),
        ({"prompt": "p", "frame_count": "9"}, "frame_count", "invalid_type"),
        ({"prompt": "p", "frame_duration_ms": 0}, "frame_duration_ms", "integer_below_min_value"),
        ({"prompt": "p", "complexity": 3}, "complexity", "invalid_type"),
        ({"prompt": "p", "model": ["gpt-image-1"]}, "model", "invalid_type"),
    ],
)
def test_bad_fields_are_400_naming_the_param(
    proxy: str, upstream: UpstreamDouble, body: dict[str, Any], param: str, code: str
) -> None:
    answer = post(proxy, body)
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert (error["param"], error["code"], error["type"]) == (param, code, "invalid_request_error")
    assert param in error["message"]
    assert upstream.requests == []


def test_sdk_raises_bad_request_with_the_param(proxy: str) -> None:
    client = openai.OpenAI(base_url=proxy + "/v1", api_key=CLIENT_KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError) as failure:
        client.images.generate(prompt="p", n=42)
    assert failure.value.param == "n"


@pytest.mark.parametrize(
    "raw",
    [b"{bad json", b"[1, 2]", b'"prompt"', b"null", b"\xff\xfe\x00{", b"[" * 100_000, b""],
)
def test_bodies_that_are_not_a_json_object_are_400(
    proxy: str, upstream: UpstreamDouble, raw: bytes
) -> None:
    answer = httpx.post(proxy + PATH, content=raw, headers={"content-type": "application/json"})
    assert answer.status_code == 400
    assert answer.json()["error"]["code"] == "invalid_json"
    assert upstream.requests == []


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
def test_non_json_content_type_is_415(proxy: str, content_type: str | None) -> None:
    headers = {} if content_type is None else {"content-type": content_type}
    answer = httpx.post(proxy + PATH, content=b'{"prompt": "p"}', headers=headers)
    assert answer.status_code == 415
    assert answer.json()["error"]["code"] == "unsupported_media_type"


def test_json_content_type_with_charset_is_accepted(proxy: str) -> None:
    headers = {"content-type": "application/json; charset=utf-8"}
    assert httpx.post(proxy + PATH, content=b'{"prompt": "p"}', headers=headers).is_success


def test_body_over_the_declared_limit_is_413_before_reading(
    start_proxy: Callable[..., str], upstream: UpstreamDouble
) -> None:
    proxy = start_proxy(proxy={"max_body_bytes": 1000})
    headers = {"content-type": "application/json", "content-length": "50000000"}
    with raw_request(proxy, headers) as sock:
        status = sock.recv(65536).split(b"\r\n", 1)[0]
    assert status == b"HTTP/1.1 413 Request Entity Too Large"
    assert upstream.requests == []


def test_chunked_body_over_the_limit_is_413_without_reading_to_the_end(
    start_proxy: Callable[..., str], upstream: UpstreamDouble
) -> None:
    proxy = start_proxy(proxy={"max_body_bytes": 1000})
    headers = {"content-type": "application/json", "transfer-encoding": "chunked"}
    with raw_request(proxy, headers) as sock:
        sock.sendall(b"7d0\r\n" + b"x" * 2000 + b"\r\n")  # the body never ends
        reply = read_response(sock)
    assert reply.status_code == 413
    assert reply.json()["error"]["code"] == "request_too_large"


def test_body_at_the_limit_is_accepted(start_proxy: Callable[..., str]) -> None:
    proxy = start_proxy(proxy={"max_body_bytes": 1000})
    body = json.dumps({"prompt": "x" * 900}).encode()
    body += b" " * (1000 - len(body))
    headers = {"content-type": "application/json"}
    assert httpx.post(proxy + PATH, content=body, headers=headers).is_success


CLIENT_CREDENTIALS = {
    "authorization": f"Bearer {CLIENT_KEY}",
    "api-key": CLIENT_KEY,
    "x-api-key": CLIENT_KEY,
    "x-virtual-key": CLIENT_KEY,
    "proxy-authorization": f"Basic {CLIENT_KEY}",
    "cookie": f"session={CLIENT_KEY}",
    "openai-organization": "org-client",
    "openai-project": "proj-client",
    "x-forwarded-for": "10.1.2.3",
    "x-custom-secret": CLIENT_KEY,
}


@pytest.mark.parametrize("azure", [False, True])
def test_client_credentials_never_reach_the_upstream(
    start_proxy: Callable[..., str], upstream: UpstreamDouble, azure: bool
) -> None:
    proxy = start_proxy(openai=not azure, azure=azure)
    assert post(proxy, {"prompt": "p", "model": "dep"}, headers=CLIENT_CREDENTIALS).is_success
    sent = upstream.last
    assert CLIENT_KEY not in json.dumps(sent.headers) + sent.query + sent.body.decode()
    names = {name for name, _ in sent.headers}
    assert not names & {"cookie", "proxy-authorization", "x-forwarded-for", "x-virtual-key"}
    if azure:
        assert sent.header("api-key") == UPSTREAM_KEY
        assert sent.header("authorization") is None
    else:
        assert sent.header("authorization") == f"Bearer {UPSTREAM_KEY}"
        assert sent.header("api-key") is None
        assert sent.header("openai-organization") is None


def test_configured_organization_and_project_go_upstream(
    start_proxy: Callable[..., str], upstream: UpstreamDouble
) -> None:
    proxy = start_proxy(openai={"organization": "org-proxy", "project": "proj-proxy"})
    post(proxy, {"prompt": "p"}, headers={"openai-organization": "org-client"})
    assert upstream.last.header("openai-organization") == "org-proxy"
    assert upstream.last.header("openai-project") == "proj-proxy"


def test_sdk_identity_headers_go_upstream_and_encoding_is_identity(
    proxy: str, upstream: UpstreamDouble
) -> None:
    client = openai.OpenAI(base_url=proxy + "/v1", api_key=CLIENT_KEY, max_retries=0)
    client.images.generate(prompt="p")
    assert upstream.last.header(
        "user-agent",
    ).startswith("OpenAI/Python")  # type: ignore[union-attr]
    assert upstream.last.header("x-stainless-lang") == "python"
    assert upstream.last.header("accept-encoding") == "identity"
    assert upstream.last.header("content-type") == "application/json"


def test_upstream_cookies_are_neither_stored_nor_replayed(
    proxy: str, upstream: UpstreamDouble
) -> None:
    post(proxy, {"prompt": "p"})  # the double answers with set-cookie
    reply = post(proxy, {"prompt": "p"})
    assert "set-cookie" not in reply.headers
    assert upstream.last.header("cookie") is None
