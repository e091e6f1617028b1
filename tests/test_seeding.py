"""Budgets survive restarts: with a store, each budget period starts from the ledger, for
keys, projects and the organization, on memory and Redis limits, on SQLite and
PostgreSQL; and a real `kill -9` and restart of the proxy."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from double import UpstreamDouble
from redis_server import redis_server
from support import on_store, until
from test_cli import COMMAND
from test_ledger import row

from imagegen_proxy.config import Policy
from imagegen_proxy.governance.auth import Principal, Project
from imagegen_proxy.governance.memory_limiter import MemoryLimiter
from imagegen_proxy.governance.ratelimit import period_start
from imagegen_proxy.governance.redis_limiter import RedisLimiter
from imagegen_proxy.store import Store
from imagegen_proxy.store.ledger import LedgerWriter
from imagegen_proxy.store.seeding import LedgerSeeded
from imagegen_proxy.wire.request import ImageGenerationBody, ImageRequest

NOW = datetime(2026, 11, 30, 12, tzinfo=UTC).timestamp()
REQUEST = ImageRequest(form="openai", body=ImageGenerationBody(prompt="p", model="gpt-image-2"))


def test_a_period_starts_at_its_utc_beginning() -> None:
    # Monday 2026-11-30 12:00 UTC.
    assert period_start("day", NOW) == NOW - 12 * 3600
    assert period_start("week", NOW) == NOW - 12 * 3600
    assert period_start("week", NOW + 3 * 86400) == NOW - 12 * 3600
    assert period_start("month", NOW) == datetime(2026, 11, 1, tzinfo=UTC).timestamp()
    assert period_start("total", NOW) == 0


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with redis_server() as (url, _):
        yield url


@pytest.fixture(params=["memory", "redis"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_keys_projects_and_the_organization_start_from_the_ledger(
    store_url: str, kind: str, request: pytest.FixtureRequest
) -> None:
    on_store(store_url, lambda store: store.upgrade())
    growth = Project("growth", Policy(budget_usd=1.0, budget_period="month"), id="proj_g")
    bot = Principal("bot", Policy(budget_usd=0.5, budget_period="day"), project=growth)
    other = Principal("web", Policy(), project=growth)
    org = Principal("ops", Policy(), organization=Policy(budget_usd=2.9, budget_period="month"))
    today = int(period_start("day", NOW))

    async def work(store: Store) -> list[bool]:
        writer = LedgerWriter(store)
        for moment, name, project, cost in [
            (today + 60, "bot", "growth", 400_000),  # today: the key's day budget
            (today - 86_400, "bot", "growth", 300_000),  # yesterday: the month's only
            (today + 120, "web", "growth", 200_000),
            (today + 180, "ops", None, 1_900_000),  # the organization's month
        ]:
            writer.add(row(moment, key_name=name, project_name=project, cost_micros=cost))
        await writer.aclose()
        if kind == "memory":
            inner: Any = MemoryLimiter(clock=lambda: NOW)
        else:
            url = request.getfixturevalue("redis_url")
            inner = RedisLimiter(url, prefix=f"seed:{request.node.name}", clock=lambda: NOW)
        limiter = LedgerSeeded(inner, store, clock=lambda: NOW)
        try:
            return [
                # The key has 0.10 of its 0.50 left: 0.05 fits, 0.15 does not.
                (await limiter.acquire(bot, REQUEST, 150_000)).allowed,
                (await limiter.acquire(bot, REQUEST, 50_000)).allowed,
                # The project: 0.95 of its 1.00 this month (0.05 just reserved): 0.06 does not.
                (await limiter.acquire(other, REQUEST, 60_000)).allowed,
                (await limiter.acquire(other, REQUEST, 40_000)).allowed,
                # The organization: all of the month's rows, 2.80 of 2.90.
                (await limiter.acquire(org, REQUEST, 200_000)).allowed,
                (await limiter.acquire(org, REQUEST, 100_000)).allowed,
            ]
        finally:
            await limiter.aclose()

    assert on_store(store_url, work) == [False, True, False, True, False, True]


def test_a_ledger_that_cannot_be_read_refuses_budgeted_requests(tmp_path: Path) -> None:
    async def work() -> tuple[int, bool]:
        store = Store(f"sqlite:///{tmp_path}/proxy.db")  # never migrated: no ledger table
        limiter = LedgerSeeded(MemoryLimiter(), store)
        budgeted = Principal("bot", Policy(budget_usd=1.0))
        free = Principal("free", Policy())
        try:
            try:
                await limiter.acquire(budgeted, REQUEST, 1)
            except Exception as exc:  # the ProxyError the client gets
                status = getattr(exc, "status", 0)
            else:
                status = 200
            return status, (await limiter.acquire(free, REQUEST, 0)).allowed
        finally:
            await store.aclose()

    assert asyncio.run(work()) == (503, True)


# --- a real kill -9 ------------------------------------------------------------------------

KEY = "sk-checkout-bot-0123456789"


def config_file(tmp_path: Path, upstream: UpstreamDouble, storage: str = "memory") -> Path:
    path = tmp_path / "proxy.toml"
    path.write_text(
        f'[openai]\nbase_url = "{upstream.url}/v1"\napi_key = "sk-up"\n'
        f'[store]\nurl = "sqlite:///{tmp_path}/proxy.db"\n'
        f'[limits]\nstorage = "{storage}"\n'
        '[[keys]]\nname = "checkout-bot"\n'
        f'key = "{KEY}"\nbudget_usd = 0.05\nbudget_period = "day"\n'
    )
    return path


def start(config: Path) -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen(
        [COMMAND, "--config", str(config), "--port", "0", "--log-level", "warning"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=config.parent,
    )
    assert process.stdout is not None
    banner = process.stdout.readline()
    assert "listening on http://" in banner, banner
    return process, banner.split("listening on ", 1)[1].split()[0]


def generate(url: str) -> int:
    body = {"model": "gpt-image-2", "prompt": "p", "size": "1024x1024", "quality": "low"}
    headers = {"authorization": f"Bearer {KEY}"}
    return httpx.post(
        url + "/v1/images/generations", json=body, headers=headers, timeout=30
    ).status_code


def ledger_rows(tmp_path: Path) -> int:
    # The standard library's sqlite3, read-only: no event loop of its own to race with the
    # running proxy's writes.
    uri = f"file:{tmp_path}/proxy.db?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=10)) as connection:
        return int(connection.execute("select count(*) from ledger").fetchone()[0])


def spend_until_refused(url: str) -> int:
    admitted = 0
    while (status := generate(url)) == 200:
        admitted += 1
        assert admitted < 100, "the budget never refused"
    assert status == 429
    return admitted


@pytest.fixture
def costly(upstream: UpstreamDouble) -> UpstreamDouble:
    """Each image costs $0.01: 2,000 text input tokens at gpt-image-2's $5 per 1M."""
    usage = {
        "input_tokens": 2000,
        "output_tokens": 0,
        "total_tokens": 2000,
        "input_tokens_details": {"text_tokens": 2000, "image_tokens": 0},
    }

    async def answer(x: Any) -> None:
        body = json.dumps({"created": 1, "data": [{"b64_json": "aW1n"}], "usage": usage})
        await x.start(200, [("content-type", "application/json")])
        await x.body(body.encode(), more=False)

    upstream.answer = answer
    return upstream


@pytest.mark.parametrize("after", ["memory", "redis"])
def test_a_killed_proxy_restarts_refusing_where_it_stopped(
    costly: UpstreamDouble, tmp_path: Path, after: str, request: pytest.FixtureRequest
) -> None:
    process, url = start(config_file(tmp_path, costly))
    try:
        admitted = spend_until_refused(url)
        # The ledger writes its rows every second: wait for them, then kill without warning.
        until(lambda: ledger_rows(tmp_path) == admitted, within=30)
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait(30)
    storage = "memory" if after == "memory" else request.getfixturevalue("redis_url")
    process, url = start(config_file(tmp_path, costly, storage))
    try:
        assert generate(url) == 429  # refused at the same point: nothing given back
        assert ledger_rows(tmp_path) == admitted
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(30)
    assert len(costly.requests) == admitted
