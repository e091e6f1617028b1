"""Operational endpoints say little to strangers: `/healthz` details and `/metrics` need the
admin key or the separate ops listener; the embedded mock is the proxy's alone."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from double import UpstreamDouble
from support import serve
from test_cli import running

from imagegen_proxy import ProxyConfig
from imagegen_proxy.server.app import create_app

ADMIN_KEY = "sk-admin-0123456789abcdef"
CLIENT = "sk-client-ops-0123456789"


def keyed(upstream: UpstreamDouble, **sections: Any) -> ProxyConfig:
    return ProxyConfig.model_validate(
        {
            "openai": {"base_url": upstream.url + "/v1", "api_key": "sk-upstream"},
            "keys": [{"name": "team-a", "key": CLIENT}],
            "metrics": {"enabled": True},
            **sections,
        }
    )


def test_healthz_says_only_its_status_without_the_admin_key(upstream: UpstreamDouble) -> None:
    with serve(create_app(keyed(upstream, admin={"key": ADMIN_KEY}))) as url:
        assert httpx.get(url + "/healthz").json() == {"status": "ok"}
        as_client = {"authorization": f"Bearer {CLIENT}"}
        assert httpx.get(url + "/healthz", headers=as_client).json() == {"status": "ok"}
        as_admin = {"authorization": f"Bearer {ADMIN_KEY}"}
        details = httpx.get(url + "/healthz", headers=as_admin).json()
    assert details["upstreams"]["openai"]["base_url"] == upstream.url + "/v1"


def test_an_admin_key_given_as_a_digest_works_too(upstream: UpstreamDouble) -> None:
    digest = hashlib.sha256(ADMIN_KEY.encode()).hexdigest()
    with serve(create_app(keyed(upstream, admin={"key_sha256": digest}))) as url:
        as_admin = {"authorization": f"Bearer {ADMIN_KEY}"}
        assert "upstreams" in httpx.get(url + "/healthz", headers=as_admin).json()


def test_metrics_need_the_admin_key(upstream: UpstreamDouble) -> None:
    with serve(create_app(keyed(upstream, admin={"key": ADMIN_KEY}))) as url:
        refused = httpx.get(url + "/metrics", headers={"authorization": f"Bearer {CLIENT}"})
        scraped = httpx.get(url + "/metrics", headers={"authorization": f"Bearer {ADMIN_KEY}"})
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "invalid_api_key"
    assert scraped.status_code == 200 and "imagegen_proxy_requests_total" in scraped.text


def test_without_an_admin_key_metrics_are_closed_on_the_main_port(
    upstream: UpstreamDouble,
) -> None:
    with serve(create_app(keyed(upstream))) as url:
        refused = httpx.get(url + "/metrics")
    assert refused.status_code == 401
    assert "[admin] key" in refused.json()["error"]["message"]


def test_the_admin_key_is_no_client_key(upstream: UpstreamDouble) -> None:
    with serve(create_app(keyed(upstream, admin={"key": ADMIN_KEY}))) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key=ADMIN_KEY, max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            client.images.generate(prompt="p")


def test_the_ops_listener_serves_details_and_metrics_without_credentials(
    upstream: UpstreamDouble, tmp_path: Path
) -> None:
    config = tmp_path / "proxy.toml"
    config.write_text(
        f'[openai]\nbase_url = "{upstream.url}/v1"\napi_key = "sk-upstream"\n'
        f'[[keys]]\nname = "team-a"\nkey = "{CLIENT}"\n'
        "[metrics]\nenabled = true\n[server]\nops_port = 0\n"
    )
    with running("--config", str(config), lines=7) as (url, banner):
        ops = banner.split("Operations (/healthz details, metrics) on ", 1)[1].split()[0]
        assert httpx.get(url + "/healthz").json() == {"status": "ok"}
        assert "upstreams" in httpx.get(ops + "/healthz").json()
        assert "imagegen_proxy_requests_total" in httpx.get(ops + "/metrics").text
        # Only operations there: the proxy paths are not served on it.
        assert httpx.post(ops + "/v1/images/generations", json={"prompt": "p"}).status_code == 404


def test_the_mock_is_closed_to_clients_when_keys_are_configured(tmp_path: Path) -> None:
    config = tmp_path / "proxy.toml"
    config.write_text(f'[[keys]]\nname = "team-a"\nkey = "{CLIENT}"\n')
    with running("--config", str(config)) as (url, _):
        direct = openai.OpenAI(base_url=url + "/_mock/v1", api_key=CLIENT, max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            direct.images.generate(prompt="around the proxy", n=10)
        through = openai.OpenAI(base_url=url + "/v1", api_key=CLIENT, max_retries=0)
        assert through.images.generate(prompt="through the proxy").data
