"""Keys and projects in a database, changed while the proxy runs: SQLite and a real
PostgreSQL server, through the proxy with the official SDK and through the shell commands."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from conftest import HostApp, proxy_config
from double import UpstreamDouble
from sqlalchemy import text
from support import on_store, serve, until
from test_cli import run, running

from imagegen_proxy import ImageGenProxy
from imagegen_proxy.config import Policy
from imagegen_proxy.store import Store

PATH = "/v1/images/generations"
TOML_KEY = "sk-toml-key-0123456789"


def proxy_on(url: str, upstream: UpstreamDouble, cache_seconds: float = 1.0) -> Any:
    config = proxy_config(
        upstream,
        auth={"open": False},
        store={"url": url, "cache_seconds": cache_seconds},
        keys=[{"name": "toml-team", "key": TOML_KEY}],
    )
    return serve(ImageGenProxy(HostApp().app, config))


def generate(proxy: str, key: str) -> int:
    client = openai.OpenAI(base_url=proxy + "/v1", api_key=key, max_retries=0)
    try:
        client.images.generate(prompt="p", model="dall-e-3", size="1024x1024")
    except openai.APIStatusError as exc:
        return exc.status_code
    return 200


def test_a_key_made_at_run_time_works_and_a_revoked_one_stops_on_every_process(
    store_url: str, upstream: UpstreamDouble
) -> None:
    with proxy_on(store_url, upstream) as first, proxy_on(store_url, upstream) as second:
        _, key = on_store(store_url, lambda store: store.create_key("checkout-bot"))
        assert generate(first, key) == 200 and generate(second, key) == 200
        on_store(store_url, lambda store: store.revoke_key("checkout-bot"))
        # The promise is 2 s; 3 s leaves room for a loaded CI machine's scheduling.
        for proxy in (first, second):
            until(lambda proxy=proxy: generate(proxy, key) == 401, within=3.0)
        assert generate(first, TOML_KEY) == 200  # the configuration's keys work alongside


def test_an_archived_projects_keys_stop_working(store_url: str, upstream: UpstreamDouble) -> None:
    async def make(store: Store) -> str:
        await store.create_project("growth")
        return (await store.create_key("web", project="growth"))[1]

    key = on_store(store_url, make)
    with proxy_on(store_url, upstream) as proxy:
        assert generate(proxy, key) == 200
        on_store(store_url, lambda store: store.archive_project("growth"))
        until(lambda: generate(proxy, key) == 401, within=3.0)


def test_an_expired_key_is_refused(store_url: str, upstream: UpstreamDouble) -> None:
    _, key = on_store(store_url, lambda store: store.create_key("short", expires_in=1))
    with proxy_on(store_url, upstream, cache_seconds=0) as proxy:
        assert generate(proxy, key) == 200
        until(lambda: generate(proxy, key) == 401, within=5.0)


def test_a_stored_key_carries_its_limits_and_its_projects_budget(
    store_url: str, upstream: UpstreamDouble
) -> None:
    async def make(store: Store) -> str:
        await store.create_project("growth", Policy(budget_usd=0.08))
        policy = Policy(models=frozenset({"dall-e-3"}), budget_usd=20.0, budget_period="day")
        return (await store.create_key("bot", project="growth", policy=policy))[1]

    key = on_store(store_url, make)
    with proxy_on(store_url, upstream) as proxy:
        body = {"prompt": "p", "model": "dall-e-3", "size": "1024x1024"}
        answer = httpx.post(proxy + PATH, json=body, headers={"authorization": f"Bearer {key}"})
        assert answer.status_code == 200
        assert answer.headers["x-budget-remaining-usd"] == "0.04"  # the project's, tighter
        assert generate(proxy, key) == 200
        assert generate(proxy, key) == 429  # the project's $0.08 is spent
        other = {**body, "model": "gpt-image-1"}
        refused = httpx.post(proxy + PATH, json=other, headers={"authorization": f"Bearer {key}"})
        assert refused.status_code == 403


def test_limits_saved_out_of_range_before_they_were_bounded_are_read_at_their_bounds(
    store_url: str, upstream: UpstreamDouble, caplog: pytest.LogCaptureFixture
) -> None:
    async def make(store: Store) -> str:
        project = await store.create_project("growth", Policy(budget_usd=5.0))
        _, key = await store.create_key("bot", project="growth")
        async with store.engine.begin() as connection:  # as an earlier version let it be
            await connection.execute(
                text("UPDATE projects SET policy = :policy WHERE id = :id"),
                {"policy": '{"budget_usd": 1e308, "requests_per_minute": 1e400}', "id": project.id},
            )
        return key

    key = on_store(store_url, make)
    with proxy_on(store_url, upstream) as proxy:
        assert generate(proxy, key) == 200  # not a 500 for every request of its keys
        admin = on_store(store_url, lambda store: store.projects())
        assert admin[0].policy.budget_usd == 1e9 and admin[0].policy.requests_per_minute == 2**53
    assert "budget_usd, requests_per_minute out of range in the store" in caplog.text


def test_keys_are_stored_as_digests_only(store_url: str) -> None:
    async def make(store: Store) -> tuple[str, list[Any]]:
        _, key = await store.create_key("bot")
        async with store.engine.connect() as connection:
            rows = (await connection.execute(text("SELECT * FROM api_keys"))).all()
        return key, [list(row) for row in rows]

    key, rows = on_store(store_url, make)
    stored = repr(rows)
    assert key not in stored and key[7:] not in stored
    assert hashlib.sha256(key.encode()).hexdigest() in stored


def test_migrations_build_an_empty_database_and_run_again_harmlessly(store_url: str) -> None:
    async def twice(store: Store) -> list[Any]:
        await store.upgrade()
        async with store.engine.connect() as connection:
            return list((await connection.execute(text("SELECT * FROM alembic_version"))).all())

    assert on_store(store_url, twice) == [("0005",)]


def test_a_database_of_the_previous_schema_is_migrated_with_its_keys(
    store_url: str, upstream: UpstreamDouble
) -> None:
    key = "sk-igp-made-under-schema-0001"

    async def main() -> None:
        store = Store(store_url)
        try:
            await store.upgrade("0001")
            async with store.engine.begin() as connection:  # as the code of 0001 wrote it
                await connection.execute(
                    text(
                        "INSERT INTO api_keys (id, name, project_id, digest, redacted, "
                        "created_at, expires_at, revoked_at, policy) VALUES ('key_old', "
                        "'old-timer', NULL, :digest, 'sk-igp-mad...0001', 0, NULL, NULL, '{}')"
                    ),
                    {"digest": hashlib.sha256(key.encode()).hexdigest()},
                )
        finally:
            await store.aclose()

    asyncio.run(main())
    with proxy_on(store_url, upstream) as proxy:  # migrates to the newest on first use
        assert generate(proxy, key) == 200


def test_a_store_that_cannot_be_reached_is_a_503(upstream: UpstreamDouble, tmp_path: Path) -> None:
    gone = f"sqlite:///{tmp_path}/no/such/directory/proxy.db"
    with proxy_on(gone, upstream) as proxy:
        answer = httpx.post(proxy + PATH, json={"prompt": "p"}, headers={"x-api-key": "sk-x"})
        assert answer.status_code == 503
        assert answer.json()["error"]["code"] == "store_unavailable"
        assert generate(proxy, TOML_KEY) == 200  # the configuration's keys need no store


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (("projects", "create", "x", "--budget-usd", "inf"), "finite"),
        (("projects", "create", "x", "--budget-usd", "1e308"), "less than or equal"),
        (("keys", "create", "x", "--requests-per-minute", str(2**64)), "less than or equal"),
        (("keys", "create", "x", "--expires-in", "-1"), "lifetime"),
        (("keys", "create", "x", "--expires-in", "1e12"), "lifetime"),
    ],
)
def test_the_shell_commands_refuse_numbers_the_store_cannot_keep(
    tmp_path: Path, args: tuple[str, ...], said: str
) -> None:
    database = f"sqlite:///{tmp_path}/proxy.db"
    refused = run(*args, "--store", database)
    assert refused.returncode != 0 and said in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr
    listed = run("projects", "list", "--store", database)
    assert listed.returncode == 0 and "x" not in listed.stdout.split()  # nothing half-made
    assert run("keys", "list", "--store", database).returncode == 0


def test_the_shell_commands_manage_the_store_a_running_proxy_uses(
    upstream: UpstreamDouble, tmp_path: Path
) -> None:
    database = f"sqlite:///{tmp_path}/proxy.db"
    config = tmp_path / "proxy.toml"
    config.write_text(
        f'[openai]\nbase_url = "{upstream.url}/v1"\napi_key = "sk-upstream"\n'
        f'[store]\nurl = "{database}"\n'
    )
    with running("--config", str(config)) as (proxy, _):
        assert (tmp_path / "proxy.db").exists()  # migrated at start-up
        made = run("projects", "create", "growth", "--budget-usd", "500", "--config", str(config))
        assert made.returncode == 0, made.stderr
        made = run("keys", "create", "bot", "--project", "growth", "--json", "--store", database)
        assert made.returncode == 0, made.stderr
        key = json.loads(made.stdout)["key"]
        assert generate(proxy, key) == 200
        rotated = run("keys", "rotate", "bot", "--json", "--store", database)
        new = json.loads(rotated.stdout)["key"]
        until(lambda: generate(proxy, key) == 401, within=3.0)
        assert generate(proxy, new) == 200
        listed = run("keys", "list", "--store", database)
        assert "bot" in listed.stdout and new not in listed.stdout and key not in listed.stdout
        # Times read as times (UTC); --json keeps OpenAI's Unix seconds.
        assert re.search(r"^created_at: \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$", listed.stdout, re.M)
        as_json = json.loads(run("keys", "list", "--json", "--store", database).stdout)
        assert isinstance(as_json[0]["created_at"], int)
        refused = run("keys", "revoke", "nobody", "--store", database)
        assert refused.returncode == 1 and "no key 'nobody'" in refused.stderr
        # A project's budget changes from the shell; the running proxy follows.
        changed = run(
            "projects",
            "update",
            "growth",
            "--budget-usd",
            "0.01",
            "--json",
            "--budget-period",
            "day",
            "--store",
            database,
        )
        assert changed.returncode == 0, changed.stderr
        assert json.loads(changed.stdout)["limits"]["budget_usd"] == 0.01
        until(lambda: generate(proxy, new) == 429, within=3.0)  # $0.04 an image, over $0.01
        lifted = run(
            "projects", "update", "growth", "--unset", "budget_usd", "--json", "--store", database
        )
        assert "budget_usd" not in json.loads(lifted.stdout)["limits"]
        until(lambda: generate(proxy, new) == 200, within=3.0)
        for args, said in (((), "nothing to change"), (("--unset", "budget"), "cannot unset")):
            refused = run("projects", "update", "growth", *args, "--store", database)
            assert refused.returncode != 0 and said in refused.stderr, refused.stderr
