"""Client authentication: the four credential schemes, refusals, and the explicit-open rule."""

from __future__ import annotations

import base64
import hashlib
import logging
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest
from conftest import API_VERSION, UPSTREAM_KEY
from double import UpstreamDouble

from imagegen_proxy import ConfigError, ImageGenProxy, ProxyConfig
from imagegen_proxy.config import Policy
from imagegen_proxy.governance.auth import Credentials, Principal
from imagegen_proxy.wire.errors import ProxyError

KEY_A = "sk-team-a-0123456789abcdef"
KEY_B = "sk-team-b-fedcba9876543210"
PATH = "/v1/images/generations"


def keyed(start_proxy: Callable[..., str], **options: Any) -> str:
    keys = options.pop("keys", None) or [
        {"name": "team-a", "key": KEY_A},
        {"name": "team-b", "key_sha256": hashlib.sha256(KEY_B.encode()).hexdigest()},
    ]
    auth = {"open": False, **options.pop("auth", {})}
    return start_proxy(auth=auth, keys=keys, **options)


def post(proxy: str, headers: dict[str, str], body: dict[str, Any] | None = None) -> httpx.Response:
    return httpx.post(proxy + PATH, json=body or {"prompt": "p"}, headers=headers)


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def sdk(proxy: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy + "/v1", api_key=key, max_retries=0)


def test_bearer_key_is_accepted(start_proxy: Callable[..., str], upstream: UpstreamDouble) -> None:
    proxy = keyed(start_proxy)
    assert sdk(proxy, KEY_A).images.generate(prompt="p").data
    assert upstream.last.header("authorization") == f"Bearer {UPSTREAM_KEY}"


def test_key_given_as_sha256_is_accepted(start_proxy: Callable[..., str]) -> None:
    assert sdk(keyed(start_proxy), KEY_B).images.generate(prompt="p").data


@pytest.mark.parametrize("scheme", ["Basic", "basic", "BASIC"])
def test_basic_auth_password_is_the_key(start_proxy: Callable[..., str], scheme: str) -> None:
    proxy = keyed(start_proxy)
    value = basic("anyone", KEY_A).replace("Basic", scheme)
    assert post(proxy, {"authorization": value}).status_code == 200


def test_basic_auth_username_is_checked_when_the_key_sets_one(
    start_proxy: Callable[..., str],
) -> None:
    proxy = keyed(start_proxy, keys=[{"name": "team-a", "key": KEY_A, "username": "alice"}])
    assert post(proxy, {"authorization": basic("alice", KEY_A)}).status_code == 200
    assert post(proxy, {"authorization": basic("mallory", KEY_A)}).status_code == 401
    assert post(proxy, {"authorization": f"Bearer {KEY_A}"}).status_code == 401


@pytest.mark.parametrize(
    "value",
    [
        "Basic !!!not-base64!!!",
        "Basic " + base64.b64encode(b"user:\xff\xfe" + KEY_A.encode()).decode(),
        "Basic " + base64.b64encode(KEY_A.encode()).decode(),  # no colon
        "Basic " + base64.b64encode(b"user:").decode(),  # no password
        "Bearer",
        "Token " + KEY_A,
        KEY_A,
    ],
)
def test_malformed_authorization_is_401_not_500(
    start_proxy: Callable[..., str], upstream: UpstreamDouble, value: str
) -> None:
    answer = post(keyed(start_proxy), {"authorization": value})
    assert answer.status_code == 401
    assert answer.json()["error"]["code"] == "invalid_api_key"
    assert KEY_A not in answer.text
    assert upstream.requests == []


def test_virtual_key_header_default_and_configured(start_proxy: Callable[..., str]) -> None:
    assert post(keyed(start_proxy), {"x-virtual-key": KEY_A}).status_code == 200
    proxy = keyed(start_proxy, auth={"virtual_key_header": "X-Portkey-Key"})
    assert post(proxy, {"x-portkey-key": KEY_A}).status_code == 200
    assert post(proxy, {"x-virtual-key": KEY_A}).status_code == 401


@pytest.mark.parametrize("header", ["x-api-key", "api-key"])
def test_api_key_headers_are_accepted(
    start_proxy: Callable[..., str], upstream: UpstreamDouble, header: str
) -> None:
    assert post(keyed(start_proxy), {header: KEY_A}).status_code == 200
    assert upstream.last.header(header) is None


def test_azure_client_key_is_accepted(
    start_proxy: Callable[..., str], upstream: UpstreamDouble
) -> None:
    proxy = keyed(start_proxy, openai=False, azure=True)
    client = openai.AzureOpenAI(
        azure_endpoint=proxy, api_key=KEY_A, api_version=API_VERSION, max_retries=0
    )
    assert client.images.generate(model="dep", prompt="p").data
    assert upstream.last.header("api-key") == UPSTREAM_KEY


def test_same_key_as_bearer_and_api_key_is_allowed(start_proxy: Callable[..., str]) -> None:
    headers = {"authorization": f"Bearer {KEY_A}", "api-key": KEY_A}
    assert post(keyed(start_proxy), headers).status_code == 200


def test_two_different_keys_are_401(start_proxy: Callable[..., str]) -> None:
    headers = {"authorization": f"Bearer {KEY_A}", "api-key": KEY_B}
    answer = post(keyed(start_proxy), headers)
    assert answer.status_code == 401
    assert KEY_A not in answer.text and KEY_B not in answer.text


def test_missing_key_raises_authentication_error(
    start_proxy: Callable[..., str], upstream: UpstreamDouble
) -> None:
    proxy = keyed(start_proxy)
    answer = post(proxy, {})
    assert answer.status_code == 401
    assert answer.headers["www-authenticate"].startswith("Bearer")
    assert answer.json()["error"]["type"] == "invalid_request_error"
    assert upstream.requests == []


def test_unknown_key_raises_authentication_error(start_proxy: Callable[..., str]) -> None:
    with pytest.raises(openai.AuthenticationError) as failure:
        sdk(keyed(start_proxy), "sk-wrong").images.generate(prompt="p")
    assert failure.value.code == "invalid_api_key"
    assert "sk-wrong" not in str(failure.value.body)


def test_model_outside_the_allow_list_is_403_and_not_sent(
    start_proxy: Callable[..., str], upstream: UpstreamDouble
) -> None:
    proxy = keyed(start_proxy, keys=[{"name": "team-a", "key": KEY_A, "models": ["gpt-image-1"]}])
    client = sdk(proxy, KEY_A)
    assert client.images.generate(model="gpt-image-1", prompt="p").data
    with pytest.raises(openai.PermissionDeniedError) as failure:
        client.images.generate(model="dall-e-3", prompt="p")
    assert failure.value.code == "model_not_allowed"
    with pytest.raises(openai.PermissionDeniedError):
        client.images.generate(prompt="p")  # no model: cannot be checked
    assert len(upstream.requests) == 1


def test_azure_deployment_is_checked_against_the_allow_list(
    start_proxy: Callable[..., str], upstream: UpstreamDouble
) -> None:
    keys = [{"name": "team-a", "key": KEY_A, "models": ["images-prod"]}]
    proxy = keyed(start_proxy, keys=keys, openai=False, azure=True)
    client = openai.AzureOpenAI(
        azure_endpoint=proxy, api_key=KEY_A, api_version=API_VERSION, max_retries=0
    )
    assert client.images.generate(model="images-prod", prompt="p").data
    with pytest.raises(openai.PermissionDeniedError):
        client.images.generate(model="images-other", prompt="p")
    assert len(upstream.requests) == 1


def test_a_key_can_spend_on_its_own_upstream_key(
    start_proxy: Callable[..., str], upstream: UpstreamDouble, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEAM_A_UPSTREAM", "sk-upstream-of-team-a")
    keys = [
        {"name": "team-a", "key": KEY_A, "upstream_api_key_env": "TEAM_A_UPSTREAM"},
        {"name": "team-b", "key": KEY_B},
    ]
    proxy = keyed(start_proxy, keys=keys)
    sdk(proxy, KEY_A).images.generate(prompt="p")
    assert upstream.last.header("authorization") == "Bearer sk-upstream-of-team-a"
    sdk(proxy, KEY_B).images.generate(prompt="p")
    assert upstream.last.header("authorization") == f"Bearer {UPSTREAM_KEY}"


def test_keys_never_reach_logs(
    start_proxy: Callable[..., str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    proxy = keyed(start_proxy)
    post(proxy, {"authorization": f"Bearer {KEY_A}"})
    post(proxy, {"authorization": f"Bearer {KEY_A}x"})
    post(proxy, {"authorization": basic("u", KEY_B), "x-api-key": KEY_A})
    text = caplog.text + "".join(str(record.__dict__) for record in caplog.records)
    assert KEY_A not in text and KEY_B not in text and UPSTREAM_KEY not in text


def test_real_upstream_without_keys_refuses_to_start() -> None:
    config = ProxyConfig(openai={"api_key": "sk-x"})  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"add \[\[keys\]\]") as error:
        ImageGenProxy(lambda *a: None, config)  # type: ignore[arg-type, arg-type]
    assert "open = true" in str(error.value)


def test_open_and_keys_together_are_a_config_error() -> None:
    with pytest.raises(ConfigError, match="open = true"):
        ProxyConfig.from_mapping({"auth": {"open": True}, "keys": [{"name": "a", "key": "k"}]})


class TeamHeader:
    """A user's own authenticator: trusts an upstream SSO gateway's team header."""

    async def authenticate(self, credentials: Credentials) -> Principal:
        if b"sso-token-ok" not in credentials.keys:
            raise ProxyError(401, "SSO token required.", code="invalid_api_key")
        return Principal("sso-team", Policy(models=frozenset({"gpt-image-1"})))


def test_custom_authenticator_is_used(upstream: UpstreamDouble) -> None:
    from conftest import HostApp, proxy_config
    from support import serve

    config = proxy_config(upstream, auth={"open": False})
    app = ImageGenProxy(HostApp().app, config, authenticator=TeamHeader())
    with serve(app) as proxy:
        body = {"prompt": "p", "model": "gpt-image-1"}
        assert post(proxy, {"x-api-key": "sso-token-ok"}, body).status_code == 200
        assert post(proxy, {"x-api-key": "nope"}).status_code == 401
        refused = post(proxy, {"x-api-key": "sso-token-ok"}, {"prompt": "p", "model": "dall-e-2"})
        assert refused.status_code == 403
    assert len(upstream.requests) == 1


@pytest.mark.parametrize("headers", [{}, {"authorization": "Bearer sk-forged-0123456789"}])
def test_a_request_without_a_valid_key_is_refused_before_its_body_is_read(
    start_proxy: Callable[..., str], upstream: UpstreamDouble, headers: dict[str, str]
) -> None:
    from support import raw_request, read_response

    proxy = keyed(start_proxy)
    # 50 MB announced, none sent: the answer comes from the headers alone.
    announced = {"content-type": "application/json", "content-length": "50000000", **headers}
    with raw_request(proxy, announced) as sock:
        sock.settimeout(10)  # generous: the answer needs no body, so it comes at once
        answer = read_response(sock)
    assert answer.status_code == 401
    assert answer.json()["error"]["code"] == "invalid_api_key"
    assert upstream.requests == []


def test_a_keyless_request_is_refused_before_its_body_is_validated(
    start_proxy: Callable[..., str],
) -> None:
    proxy = keyed(start_proxy)
    answer = httpx.post(proxy + PATH, content=b"{not json", headers={"content-type": "text/x"})
    assert answer.status_code == 401  # not 415 nor 400: a stranger learns nothing more


def test_a_denied_model_is_403_and_others_pass(
    start_proxy: Callable[..., str], upstream: UpstreamDouble
) -> None:
    keys = [{"name": "team-a", "key": KEY_A, "denied_models": ["dall-e-2"]}]
    proxy = keyed(start_proxy, keys=keys)
    headers = {"authorization": f"Bearer {KEY_A}"}
    refused = post(proxy, headers, {"prompt": "p", "model": "dall-e-2"})
    assert refused.status_code == 403 and "denied: dall-e-2" in refused.json()["error"]["message"]
    assert post(proxy, headers, {"prompt": "p", "model": "gpt-image-1"}).status_code == 200
    assert len(upstream.requests) == 1
