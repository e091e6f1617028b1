"""The `imagegen-proxy` command, run as users run it: a subprocess on a real port."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from conftest import CLIENT_KEY, UPSTREAM_KEY
from double import UpstreamDouble
from support import until

from imagegen_proxy import ProxyConfig

COMMAND = str(Path(sys.executable).parent / "imagegen-proxy")


@contextlib.contextmanager
def running(
    *args: str,
    env: dict[str, str] | None = None,
    lines: int = 6,
    output: list[str] | None = None,
    cwd: str | Path | None = None,
) -> Iterator[tuple[str, str]]:
    """Start the command on a free port; yield its URL and the banner it printed.

    What it prints after the banner (access log lines) is read as it comes, into `output`
    if given: a pipe nobody reads would fill up and stall the server. It runs in `cwd`, by
    default a new empty directory (the no-config mode makes its store file there).
    """
    folder = tempfile.TemporaryDirectory(prefix="imagegen-cli-")
    process = subprocess.Popen(
        [COMMAND, "--port", "0", "--log-level", "warning", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
        cwd=cwd or folder.name,
    )
    try:
        assert process.stdout is not None
        banner = process.stdout.readline()
        assert "listening on http://" in banner, process.stderr.read() if process.stderr else ""
        url = banner.split("listening on ", 1)[1].split()[0]
        banner += "".join(process.stdout.readline() for _ in range(lines - 1))
        sink = output if output is not None else []
        for stream in (process.stdout, process.stderr):
            threading.Thread(target=sink.extend, args=(stream,), daemon=True).start()
        yield url, banner
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(10)
        folder.cleanup()


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [COMMAND, *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **(env or {})},
    )


def test_without_config_it_serves_the_embedded_mock() -> None:
    with running(lines=7) as (url, banner):
        assert url.startswith("http://127.0.0.1:")
        assert "embedded mock" in banner
        assert f"curl -s {url}/v1/images/generations" in banner
        body = json.loads(banner.split(" -d '", 1)[1].split("'", 1)[0])  # what it says to try
        tried = httpx.post(url + "/v1/images/generations", json=body, timeout=30)
        assert tried.status_code == 200 and tried.json()["data"][0]["b64_json"]
        client = openai.OpenAI(base_url=url + "/v1", api_key="anything", max_retries=0)
        image = client.images.generate(model="gpt-image-1", prompt="a lighthouse", size="64x64")
        assert base64.b64decode(image.data[0].b64_json or "")[:8] == b"\x89PNG\r\n\x1a\n"
        stream = client.images.generate(prompt="a lighthouse", stream=True, partial_images=2)
        assert [event.type for event in stream] == [
            "image_generation.partial_image",
            "image_generation.partial_image",
            "image_generation.completed",
        ]
        assert httpx.get(url + "/healthz").json()["status"] == "ok"


def test_python_dash_m_runs_the_same_command() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "imagegen_proxy", "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0
    assert "--config" in result.stdout and "--port" in result.stdout


def test_config_file_proxies_to_the_configured_upstream(
    upstream: UpstreamDouble, tmp_path: Path
) -> None:
    config = tmp_path / "proxy.toml"
    config.write_text(
        f'[openai]\nbase_url = "{upstream.url}/v1"\napi_key_env = "TEST_UPSTREAM_KEY"\n'
        "[auth]\nopen = true\n"
    )
    with running("--config", str(config), env={"TEST_UPSTREAM_KEY": UPSTREAM_KEY}) as (url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key=CLIENT_KEY, max_retries=0)
        client.images.generate(model="gpt-image-1", prompt="p")
    assert upstream.last.header("authorization") == f"Bearer {UPSTREAM_KEY}"
    assert upstream.last.json == {"model": "gpt-image-1", "prompt": "p"}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no such file"),
        ("[openai\nbase_url = 1", "invalid TOML"),
        ('[openai]\nbase_urll = "https://x.example"', "unknown key 'openai.base_urll'"),
        ('[openai]\nread_timeout = "slow"', "openai.read_timeout"),
        ('[openai]\napi_key_env = "SURELY_UNSET_VAR"', "environment variable SURELY_UNSET_VAR"),
        ('[openai]\nbase_url = "https://x.example"', "[auth] open = true"),
    ],
)
def test_config_mistakes_are_one_line_errors(
    tmp_path: Path, content: str | None, message: str
) -> None:
    config = tmp_path / "proxy.toml"
    if content is not None:
        config.write_text(content)
    result = run("--config", str(config), "--port", "0")
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_port_in_use_is_a_clear_error() -> None:
    with running(lines=7) as (url, _):
        port = url.rsplit(":", 1)[1]
        result = run("--port", port)
    assert result.returncode != 0
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr


def test_the_access_log_is_one_json_object_per_line_on_stdout() -> None:
    output: list[str] = []
    with running(output=output, lines=7) as (url, _):
        assert httpx.post(url + "/v1/images/generations", json={"prompt": "p"}).status_code == 200
        deadline = time.monotonic() + 5
        while not output and time.monotonic() < deadline:
            time.sleep(0.02)
    line = json.loads(output[0])
    assert (line["status"], line["outcome"], line["form"]) == (200, "ok", "openai")


@pytest.mark.parametrize("workers", ["1", "2"])
def test_ctrl_c_stops_it_without_a_traceback(tmp_path: Path, workers: str) -> None:
    process = subprocess.Popen(
        [COMMAND, "--port", "0", "--log-level", "info", "--workers", workers],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    assert process.stdout is not None
    banner = process.stdout.readline()
    assert "listening on http://" in banner
    url = banner.split("listening on ", 1)[1].split()[0]
    until(lambda: _answers(url), within=30)  # serving: startup is over
    process.send_signal(signal.SIGINT)
    _, errors = process.communicate(timeout=60)
    # 130 as for any command Ctrl-C ended; uvicorn's supervisor of workers exits 0.
    assert process.returncode == (130 if workers == "1" else 0), errors
    assert "Traceback" not in errors and "KeyboardInterrupt" not in errors, errors
    assert "Shutting down" in errors or "Stopping" in errors, errors


def _answers(url: str) -> bool:
    try:
        return httpx.get(url + "/healthz", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def test_help_lists_the_store_commands() -> None:
    shown = run("--help").stdout
    for command in ("db upgrade", "projects", "keys", "usage"):
        assert f"\n  {command} " in shown, shown


def test_start_up_says_when_a_restart_gives_budgets_back(
    upstream: UpstreamDouble, tmp_path: Path
) -> None:
    from imagegen_proxy.server.cli import _budgets_note

    config = tmp_path / "proxy.toml"
    text = f'[openai]\nbase_url = "{upstream.url}/v1"\napi_key = "sk-up"\n'
    text += '[[keys]]\nname = "bot"\nkey = "sk-bot-0123456789"\nbudget_usd = 5.0\n'
    config.write_text(text)
    output: list[str] = []
    with running("--config", str(config), lines=1, output=output):
        until(lambda: any("a restart gives every budget back" in line for line in output), 10)
    # With a store the periods start from the ledger; with Redis the counts outlive the
    # process; without a budget there is nothing to give back.
    loaded = ProxyConfig.from_toml(config)
    assert _budgets_note(loaded)
    stored = loaded.model_copy(
        update={"store": loaded.store.model_copy(update={"url": "sqlite:///x"})}
    )
    assert not _budgets_note(stored)
    shared = loaded.model_copy(
        update={"limits": loaded.limits.model_copy(update={"storage": "redis://localhost"})}
    )
    assert not _budgets_note(shared)
    free = loaded.model_copy(update={"keys": ()})
    assert not _budgets_note(free)
