"""The three ways in: a wrapped Starlette/FastAPI app, a Django ASGI stack, the bundled command."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import openai
import pytest
from conftest import CLIENT_KEY, UPSTREAM_KEY, HostApp, proxy_config
from double import UpstreamDouble, completed, partial, sse
from starlette.applications import Starlette
from starlette.routing import Mount
from support import serve
from test_cli import run, running

from imagegen_proxy import ImageGenProxy, ProxyConfig

EXAMPLES = Path(__file__).parent.parent / "examples"
STREAM = [
    "image_generation.partial_image",
    "image_generation.completed",
]


def sdk(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=CLIENT_KEY, max_retries=0)


def generates_and_streams(url: str, upstream: UpstreamDouble) -> None:
    assert sdk(url).images.generate(prompt="p").data
    upstream.answer = sse(partial(0), completed())
    events = sdk(url).images.generate(prompt="p", stream=True, partial_images=1)
    assert [event.type for event in events] == STREAM


def test_fastapi_example_keeps_everything_of_the_host(upstream: UpstreamDouble) -> None:
    from websockets.sync.client import connect

    spec = importlib.util.spec_from_file_location("fastapi_app", EXAMPLES / "fastapi_app.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    app = module.build(proxy_config(upstream))
    with serve(app, lifespan="on") as url:
        assert module.state["started"]
        assert httpx.get(url + "/status").json() == {"ok": True, "started": True}
        assert httpx.get(url + "/teapot").status_code == 418  # the host's exception handler
        assert httpx.get(url + "/anything/else").json() == {"caught": "anything/else"}
        with connect(url.replace("http://", "ws://") + "/ws") as websocket:
            websocket.send("hi")
            assert websocket.recv() == "echo: hi"
        generates_and_streams(url, upstream)  # POST beats the host's catch-all route
    assert module.state["stopped"]
    assert upstream.last.header("authorization") == f"Bearer {UPSTREAM_KEY}"


@contextlib.contextmanager
def django_site(config: Path, shutdown_log: list[str] | None = None) -> Iterator[str]:
    """The example Django project under uvicorn, as a user would run it; what it logs
    while shutting down goes to `shutdown_log`."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "django_site.asgi:application",
            "--port",
            "0",
            "--log-level",
            "info",
        ],
        cwd=EXAMPLES / "django_site",
        env={**os.environ, "IMAGEGEN_PROXY_CONFIG": str(config)},
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stderr is not None
        for line in process.stderr:
            if "Uvicorn running on" in line:
                yield line.split("running on ", 1)[1].split()[0]
                break
        else:
            pytest.fail("the Django site did not start")
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(10)
        if shutdown_log is not None and process.stderr is not None:
            shutdown_log.append(process.stderr.read())


def test_django_site_serves_django_and_the_proxy(upstream: UpstreamDouble, tmp_path: Path) -> None:
    config = tmp_path / "proxy.toml"
    config.write_text(f'[openai]\nbase_url = "{upstream.url}/v1"\n[auth]\nopen = true\n')
    shutdown_log: list[str] = []
    with django_site(config, shutdown_log) as url:
        assert httpx.get(url + "/hello").json() == {"django": "hello", "path": "/hello"}
        assert httpx.post(url + "/not-proxied", json={}).status_code == 404  # Django's answer
        generates_and_streams(url, upstream)
    assert upstream.last.path == "/v1/images/generations"
    # No lifespan under Django, yet the upstream connections are closed at shutdown.
    assert "Unclosed" not in shutdown_log[0], shutdown_log[0]
    # The settings' LOGGING puts the proxy's access log on the console.
    lines = [line for line in shutdown_log[0].splitlines() if '"outcome"' in line]
    assert len(lines) == 2 and all('"operation": "generation"' in line for line in lines), lines


def test_django_sites_shipped_configuration_points_at_the_mock() -> None:
    # As the README runs it: `python -m imagegen_proxy.mock --port 9000`, then uvicorn.
    config = ProxyConfig.from_toml(EXAMPLES / "django_site" / "proxy.toml")
    assert config.openai is not None and config.openai.base_url == "http://127.0.0.1:9000/v1"
    assert config.auth.open


def test_two_proxies_in_one_process_keep_their_own_state(
    upstream: UpstreamDouble,
) -> None:
    other = UpstreamDouble()
    with serve(other) as other_url:
        other.url = other_url
        inner = ImageGenProxy(HostApp().app, proxy_config(upstream, proxy={"mount_prefix": "/a"}))
        outer = ImageGenProxy(
            inner,
            proxy_config(
                other,
                proxy={"mount_prefix": "/b"},
                auth={"open": False},
                keys=[{"name": "b-team", "key": CLIENT_KEY, "requests_per_minute": 1}],
            ),
        )
        with serve(outer) as url:
            client_a = openai.OpenAI(base_url=url + "/a/v1", api_key="x", max_retries=0)
            client_b = openai.OpenAI(base_url=url + "/b/v1", api_key=CLIENT_KEY, max_retries=0)
            for _ in range(3):
                client_a.images.generate(prompt="a")  # /a has no limits
            client_b.images.generate(prompt="b")
            with pytest.raises(openai.RateLimitError):
                client_b.images.generate(prompt="b")
            assert inner.transport is not outer.transport
    assert len(upstream.requests) == 3 and len(other.requests) == 1


def test_proxy_mounted_under_a_sub_path_respects_root_path(upstream: UpstreamDouble) -> None:
    proxy = ImageGenProxy(HostApp().app, proxy_config(upstream))
    with serve(Starlette(routes=[Mount("/sub", app=proxy)])) as url:
        assert sdk(url + "/sub").images.generate(prompt="p").data
        assert httpx.get(url + "/sub/hello").text == "host says hello at /sub/hello"


def test_uvicorn_root_path_is_respected(upstream: UpstreamDouble) -> None:
    proxy = ImageGenProxy(HostApp().app, proxy_config(upstream))
    with serve(proxy, root_path="/gateway") as url:  # behind a proxy that strips /gateway
        assert sdk(url).images.generate(prompt="p").data
    assert upstream.last.path == "/v1/images/generations"  # the root path stays here


def test_check_config_prints_the_resolved_config_with_secrets_masked(tmp_path: Path) -> None:
    config = tmp_path / "proxy.toml"
    config.write_text(
        '[openai]\napi_key = "sk-must-not-print"\n[limits]\nstorage = "redis://:hunter2@h:1/0"\n'
        '[[keys]]\nname = "team-a"\nkey = "sk-client-must-not-print"\nmax_concurrent = 2\n'
    )
    result = run("--check-config", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert '"name": "team-a"' in result.stdout and '"max_concurrent": 2' in result.stdout
    for secret in ("sk-must-not-print", "sk-client-must-not-print", "hunter2"):
        assert secret not in result.stdout + result.stderr
    assert result.stdout.strip().endswith("OK (upstream: openai)")


def test_check_config_fails_on_a_bad_config(tmp_path: Path) -> None:
    config = tmp_path / "proxy.toml"
    config.write_text('[openai]\napi_key = "sk-x"\n')  # a real upstream and no keys
    result = run("--check-config", "--config", str(config))
    assert result.returncode == 1
    assert "add [[keys]]" in result.stderr and "Traceback" not in result.stderr


def test_workers_serve_requests_and_say_limits_need_redis(tmp_path: Path) -> None:
    config = tmp_path / "proxy.toml"
    config.write_text(f'[[keys]]\nname = "a"\nkey = "{CLIENT_KEY}"\nrequests_per_minute = 100\n')
    with running("--workers", "2", "--config", str(config), lines=7) as (url, banner):
        assert "2 worker processes: limits are kept per process" in banner
        assert 'storage = "redis://' in banner
        client = sdk(url)
        for _ in range(6):
            assert client.images.generate(prompt="p", size="16x16").data


def test_healthz_says_when_an_upstream_has_no_key(tmp_path: Path) -> None:
    config = tmp_path / "proxy.toml"
    config.write_text('[openai]\nbase_url = "http://127.0.0.1:9/v1"\n[auth]\nopen = true\n')
    with running("--config", str(config)) as (url, _):
        answer = httpx.get(url + "/healthz")
    assert answer.status_code == 503
    assert answer.json()["upstreams"]["openai"]["api_key"] is False
    assert "incomplete" in answer.json()["status"]


def test_starlette_example_streams_too(upstream: UpstreamDouble) -> None:
    spec = importlib.util.spec_from_file_location("starlette_app", EXAMPLES / "starlette_app.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with serve(module.build(proxy_config(upstream))) as url:
        generates_and_streams(url, upstream)


def test_sdk_env_style_configuration_works(start_proxy: Callable[..., str]) -> None:
    url = start_proxy()
    client = openai.OpenAI(base_url=url + "/openai/v1", api_key=CLIENT_KEY, max_retries=0)
    assert client.images.generate(prompt="p").data
