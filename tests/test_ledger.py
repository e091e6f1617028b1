"""The ledger: rows written in the background, read back as OpenAI's usage and costs pages
(through the official SDK's admin client) and as the `imagegen-proxy usage` export; on SQLite
and on a real PostgreSQL server."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import dataclasses
import datetime
import io
import json
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from sqlalchemy import event, func, select, text
from starlette.applications import Starlette
from starlette.routing import Mount
from support import on_store, serve
from test_cli import run

from imagegen_proxy.admin.usage import usage_routes
from imagegen_proxy.store import Store
from imagegen_proxy.store.ledger import LedgerRow, LedgerWriter
from imagegen_proxy.store.schema import ledger

DAY = 86_400
T0 = int(datetime.datetime(2026, 11, 1, tzinfo=datetime.UTC).timestamp())


@pytest.fixture
def store_url(store_url: str) -> str:
    """conftest's empty database of each kind, at the newest schema."""
    on_store(store_url, lambda store: store.upgrade())
    return store_url


def row(at: int, **fields: Any) -> LedgerRow:
    base = LedgerRow(
        at=at,
        request_id=f"req_{at}",
        key_id="key_a",
        key_name="checkout-bot",
        project_id="proj_a",
        project_name="checkout",
        model="gpt-image-1",
        source="image.generation",
        size="1024x1024",
        quality="low",
        n=1,
        images=1,
        status=200,
        outcome="ok",
        input_tokens=10,
        output_tokens=272,
        cost_micros=40_000,
        duration_ms=900,
    )
    return dataclasses.replace(base, **fields)


# Four days of November 2026; the third has nothing.
ROWS = [
    row(T0 + 60, images=2, n=2, cost_micros=80_000),
    row(T0 + 3_600),
    row(T0 + 7_200, project_id="proj_b", model="dall-e-3", key_id="key_b", size="1792x1024"),
    row(T0 + DAY + 5, cost_micros=None),  # no price known: usage, but no cost
    row(T0 + DAY + 3_600, source="image.edit", cost_micros=20_000),
    row(T0 + 3 * DAY + 1, project_id="proj_b", model=None, key_id=None, cost_micros=10_000),
]


def write(url: str, rows: list[LedgerRow]) -> None:
    async def work(store: Store) -> None:
        writer = LedgerWriter(store)
        for each in rows:
            writer.add(each)
        await writer.aclose()

    on_store(url, work)


def count(store: Store) -> Awaitable[int]:
    async def rows() -> int:
        async with store.engine.connect() as connection:
            return int(
                (await connection.execute(select(func.count()).select_from(ledger))).one()[0]
            )

    return rows()


@contextlib.contextmanager
def usage_api(url: str) -> Iterator[str]:
    """The routes served as the gateway mounts them; yields the SDK's base_url."""
    store = Store(url)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await store.aclose()  # in the server's loop, where its connections live

    routes = [Mount("/v1/organization", routes=usage_routes(store))]
    with serve(Starlette(routes=routes, lifespan=lifespan)) as base:
        yield base + "/v1"


def admin(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(
        admin_api_key="sk-admin-x", api_key="unused", base_url=base_url, max_retries=0
    )


def results(page: Any) -> list[list[dict[str, Any]]]:
    """Each bucket's results as plain dicts, without the fields no group filled."""
    return [
        [
            {name: value for name, value in result.to_dict().items() if value is not None}
            for result in bucket.results
        ]
        for bucket in page.data
    ]


def used(images: int, requests: int, **group: str) -> dict[str, Any]:
    """A usage result as `results` gives it."""
    kind = "organization.usage.images.result"
    return {"object": kind, "images": images, "num_model_requests": requests, **group}


# --- usage -----------------------------------------------------------------------------------


def test_written_rows_are_counted_per_bucket_and_group(store_url: str) -> None:
    write(store_url, ROWS)
    with usage_api(store_url) as base_url:
        page = admin(base_url).admin.organization.usage.images(
            start_time=T0,
            end_time=T0 + 4 * DAY,
            bucket_width="1d",
            group_by=["project_id", "model"],
        )
    assert [(b.start_time, b.end_time) for b in page.data] == [
        (T0 + day * DAY, T0 + (day + 1) * DAY) for day in range(4)
    ]
    a, b = {"project_id": "proj_a"}, {"project_id": "proj_b"}
    assert results(page) == [
        [used(3, 2, **a, model="gpt-image-1"), used(1, 1, **b, model="dall-e-3")],
        [used(2, 2, **a, model="gpt-image-1")],
        [],  # empty buckets are there, as OpenAI gives them
        [used(1, 1, **b)],
    ]
    assert page.has_more is False and page.next_page is None


def test_the_async_admin_client_reads_the_same_page(store_url: str) -> None:
    write(store_url, ROWS)
    query: dict[str, Any] = {"start_time": T0, "end_time": T0 + 2 * DAY, "group_by": ["source"]}

    async def read(base_url: str) -> Any:
        client = openai.AsyncOpenAI(
            admin_api_key="sk-admin-x", api_key="unused", base_url=base_url, max_retries=0
        )
        async with client:
            return await client.admin.organization.usage.images(**query)

    with usage_api(store_url) as base_url:
        page = asyncio.run(read(base_url))
        assert page == admin(base_url).admin.organization.usage.images(**query)
    assert [[(r.source, r.images) for r in b.results] for b in page.data] == [
        [("image.generation", 4)],
        [("image.edit", 1), ("image.generation", 1)],
    ]


def test_ungrouped_usage_is_one_result_a_bucket_and_user_id_is_always_null(
    store_url: str,
) -> None:
    write(store_url, ROWS)
    with usage_api(store_url) as base_url:
        usage = admin(base_url).admin.organization.usage
        whole = usage.images(start_time=T0, end_time=T0 + 2 * DAY)
        by_user = usage.images(start_time=T0, end_time=T0 + DAY, group_by=["user_id"])
    assert [[(r.images, r.num_model_requests) for r in b.results] for b in whole.data] == [
        [(4, 3)],
        [(2, 2)],
    ]
    assert [(r.user_id, r.images) for r in by_user.data[0].results] == [(None, 4)]


def test_filters_keep_only_the_named_projects_keys_models_sizes_and_sources(
    store_url: str,
) -> None:
    write(store_url, ROWS)
    with usage_api(store_url) as base_url:
        usage = admin(base_url).admin.organization.usage

        def images(**filters: Any) -> list[int]:
            page = usage.images(start_time=T0, end_time=T0 + 4 * DAY, **filters)
            return [sum(r.images for r in b.results) for b in page.data]

        assert images(project_ids=["proj_b"]) == [1, 0, 0, 1]
        assert images(api_key_ids=["key_b"]) == [1, 0, 0, 0]
        assert images(models=["gpt-image-1", "dall-e-3"]) == [4, 2, 0, 0]
        assert images(sizes=["1024x1024"], sources=["image.edit"]) == [0, 1, 0, 0]
        assert images(project_ids=["proj_a"], models=["dall-e-3"]) == [0, 0, 0, 0]


def test_pages_follow_next_page_until_has_more_is_false(store_url: str) -> None:
    write(store_url, ROWS)
    with usage_api(store_url) as base_url:
        usage = admin(base_url).admin.organization.usage
        query: dict[str, Any] = {"start_time": T0, "end_time": T0 + 5 * DAY, "group_by": ["model"]}
        whole = usage.images(**query)
        pages = [usage.images(**query, limit=2)]
        while pages[-1].has_more:
            assert pages[-1].next_page is not None
            pages.append(usage.images(**query, limit=2, page=pages[-1].next_page))
    assert [len(page.data) for page in pages] == [2, 2, 1]
    assert [bucket for page in pages for bucket in page.data] == whole.data
    assert pages[-1].next_page is None


def test_hour_and_minute_buckets_are_utc_aligned_and_cut_to_the_range(store_url: str) -> None:
    write(store_url, ROWS)
    with usage_api(store_url) as base_url:
        usage = admin(base_url).admin.organization.usage
        hours = usage.images(start_time=T0 + 1_800, end_time=T0 + 3 * 3_600, bucket_width="1h")
        minutes = usage.images(
            start_time=T0 + 3_600 - 90, end_time=T0 + 3_600 + 30, bucket_width="1m"
        )
    assert [(b.start_time, b.end_time) for b in hours.data] == [
        (T0 + 1_800, T0 + 3_600),  # the first hour, from start_time on
        (T0 + 3_600, T0 + 7_200),
        (T0 + 7_200, T0 + 10_800),
    ]
    assert [sum(r.images for r in b.results) for b in hours.data] == [0, 1, 1]  # not T0 + 60
    assert [(b.start_time - T0, b.end_time - T0) for b in minutes.data] == [
        (3_510, 3_540),
        (3_540, 3_600),
        (3_600, 3_630),
    ]
    assert [sum(r.images for r in b.results) for b in minutes.data] == [0, 0, 1]


def test_a_day_bucket_is_a_utc_day_even_when_start_time_is_not_midnight(store_url: str) -> None:
    write(store_url, ROWS)
    with usage_api(store_url) as base_url:
        page = admin(base_url).admin.organization.usage.images(
            start_time=T0 + 3_000, end_time=T0 + DAY + 60
        )
    assert [(b.start_time, b.end_time) for b in page.data] == [
        (T0 + 3_000, T0 + DAY),
        (T0 + DAY, T0 + DAY + 60),
    ]
    assert [sum(r.images for r in b.results) for b in page.data] == [2, 1]


# --- costs -----------------------------------------------------------------------------------


def test_costs_are_dollars_of_the_priced_rows_by_line_item_and_project(store_url: str) -> None:
    write(store_url, ROWS)
    with usage_api(store_url) as base_url:
        costs = admin(base_url).admin.organization.usage.costs
        by_item = costs(start_time=T0, end_time=T0 + 4 * DAY, group_by=["line_item", "project_id"])
        total = costs(start_time=T0, end_time=T0 + 4 * DAY)
    kind = {"object": "organization.costs.result", "quantity_unit": "images"}
    assert results(by_item) == [
        [
            {**kind, "amount": {"value": 0.04, "currency": "usd"}, "line_item": "dall-e-3",
             "project_id": "proj_b", "quantity": 1},
            {**kind, "amount": {"value": 0.12, "currency": "usd"}, "line_item": "gpt-image-1",
             "project_id": "proj_a", "quantity": 3},
        ],
        # The unpriced row is usage, not cost.
        [{**kind, "amount": {"value": 0.02, "currency": "usd"}, "line_item": "gpt-image-1",
          "project_id": "proj_a", "quantity": 1}],
        [],
        # A request that named no model.
        [{**kind, "amount": {"value": 0.01, "currency": "usd"}, "line_item": "Image models",
          "project_id": "proj_b", "quantity": 1}],
    ]  # fmt: skip
    assert [[r.amount.value for r in b.results if r.amount] for b in total.data] == [
        [0.16],
        [0.02],
        [],
        [0.01],
    ]


def test_costs_filter_by_line_item_and_group_by_api_source(store_url: str) -> None:
    write(store_url, ROWS)
    with usage_api(store_url) as base_url:
        page = admin(base_url).admin.organization.usage.costs(
            start_time=T0,
            end_time=T0 + DAY,
            line_items=["dall-e-3"],
            group_by=["api_source", "api_key_id"],
        )
    assert [(r.api_source, r.api_key_id) for r in page.data[0].results] == [("unlabeled", "key_b")]
    assert [r.amount and r.amount.value for r in page.data[0].results] == [0.04]


# --- refusals --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "query", "param"),
    [
        ("/usage/images", {}, "start_time"),
        ("/usage/images", {"start_time": "yesterday"}, "start_time"),
        ("/usage/images", {"start_time": T0, "bucket_width": "2d"}, "bucket_width"),
        ("/usage/images", {"start_time": T0, "group_by[]": "colour"}, "group_by"),
        ("/usage/images", {"start_time": T0, "group_by": "line_item"}, "group_by"),
        ("/usage/images", {"start_time": T0, "limit": 0}, "limit"),
        ("/usage/images", {"start_time": T0, "limit": 32}, "limit"),  # 31 days at most
        ("/usage/images", {"start_time": T0, "end_time": T0}, "end_time"),
        ("/usage/images", {"start_time": T0, "page": "not-a-cursor"}, "page"),
        ("/usage/images", {"start_time": T0, "page": "AAAAAAAAAAE="}, "page"),  # not a bucket
        ("/usage/images", {"start_time": T0, "sources[]": "image.upscale"}, "sources"),
        ("/usage/images", {"start_time": T0, "user_ids[]": "user_1"}, "user_ids"),
        ("/costs", {"start_time": T0, "bucket_width": "1h"}, "bucket_width"),
        ("/costs", {"start_time": T0, "group_by[]": "model"}, "group_by"),
        ("/costs", {"start_time": T0, "limit": 181}, "limit"),
    ],
)
def test_bad_parameters_are_a_400_in_openais_envelope(
    store_url: str, path: str, query: dict[str, Any], param: str
) -> None:
    with usage_api(store_url) as base_url:
        answer = httpx.get(base_url + "/organization" + path, params=query)
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param and error["message"]


def test_the_sdk_raises_bad_request_for_a_refused_query(store_url: str) -> None:
    with usage_api(store_url) as base_url, pytest.raises(openai.BadRequestError) as refused:
        admin(base_url).admin.organization.usage.images(start_time=T0, limit=1_000)
    assert refused.value.status_code == 400
    assert refused.value.param == "limit"


def test_a_wrong_method_is_a_405_in_openais_envelope(store_url: str) -> None:
    with usage_api(store_url) as base_url:
        answer = httpx.post(base_url + "/organization/costs", params={"start_time": T0})
    assert answer.status_code == 405 and answer.headers["allow"] == "GET"
    assert answer.json()["error"]["code"] == "method_not_allowed"


def test_a_store_that_cannot_be_reached_is_a_503_not_a_500(tmp_path: Path) -> None:
    with usage_api(f"sqlite:///{tmp_path}/no/such/directory/proxy.db") as base_url:
        answer = httpx.get(base_url + "/organization/usage/images", params={"start_time": T0})
    assert answer.status_code == 503
    assert answer.json()["error"]["code"] == "store_unavailable"


def test_lists_come_in_brackets_or_repeated(store_url: str) -> None:
    write(store_url, ROWS)
    base = {"start_time": T0, "end_time": T0 + DAY}
    with usage_api(store_url) as base_url:
        url = base_url + "/organization/usage/images"
        brackets = httpx.get(url, params={**base, "group_by[]": ["project_id", "model"]})
        repeated = httpx.get(url, params={**base, "group_by": ["project_id", "model"]})
    assert brackets.status_code == repeated.status_code == 200
    assert brackets.json() == repeated.json()
    assert len(brackets.json()["data"][0]["results"]) == 2


# --- the export ------------------------------------------------------------------------------


def test_the_usage_command_exports_one_csv_row_per_group(store_url: str) -> None:
    write(store_url, ROWS)
    between = ["--since", "2026-11-01", "--until", "2026-11-05"]
    done = run("usage", "--store", store_url, *between, "--group-by", "project,model")
    assert done.returncode == 0, done.stderr
    assert list(csv.reader(io.StringIO(done.stdout))) == [
        ["project_id", "project_name", "model", "requests", "images", "input_tokens",
         "output_tokens", "cost_usd"],
        ["proj_a", "checkout", "gpt-image-1", "4", "5", "40", "1088", "0.14"],
        ["proj_b", "checkout", "", "1", "1", "10", "272", "0.01"],
        ["proj_b", "checkout", "dall-e-3", "1", "1", "10", "272", "0.04"],
    ]  # fmt: skip


def test_the_usage_command_gives_a_row_per_day_with_bucket(store_url: str) -> None:
    write(store_url, ROWS)
    done = run(
        "usage", "--store", store_url, "--since", "2026-11-01", "--until", "2026-11-05",
        "--bucket", "1d", "--format", "json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert [(r["start"], r["requests"], r["cost_usd"]) for r in json.loads(done.stdout)] == [
        ("2026-11-01T00:00:00Z", 3, 0.16),
        ("2026-11-02T00:00:00Z", 2, 0.02),
        ("2026-11-04T00:00:00Z", 1, 0.01),
    ]


def test_the_usage_command_refuses_what_it_cannot_read(store_url: str) -> None:
    refused = run("usage", "--store", store_url, "--since", "2026-11-01", "--group-by", "colour")
    assert refused.returncode == 2 and "cannot group by colour" in refused.stderr
    backwards = run("usage", "--store", store_url, "--since", "2026-11-02", "--until", "2026-11-01")
    assert backwards.returncode == 1 and "--until must be after --since" in backwards.stderr


def test_the_usage_command_reads_only_the_store_of_a_configuration(
    store_url: str, tmp_path: Path
) -> None:
    # The proxy's own file, whose upstream secret lives in an environment this shell lacks.
    config = tmp_path / "proxy.toml"
    config.write_text(
        f'[openai]\napi_key_env = "SURELY_UNSET_UPSTREAM_KEY"\n[store]\nurl = "{store_url}"\n'
    )
    done = run("usage", "--config", str(config), "--since", "2026-11-01")
    assert done.returncode == 0, done.stderr
    config.write_text('[store]\nurl = "mysql://db"\n')
    refused = run("usage", "--config", str(config), "--since", "2026-11-01")
    assert refused.returncode != 0 and "store.url" in refused.stderr, refused.stderr


# --- the writer ------------------------------------------------------------------------------


def test_a_row_is_written_within_the_interval_without_a_flush(store_url: str) -> None:
    async def work(store: Store) -> float:
        # Longer than the default (1 s), so a writer that ignored it would write too soon.
        writer = LedgerWriter(store, interval=1.5)
        started = time.monotonic()
        writer.add(row(T0))
        while await count(store) == 0:
            assert time.monotonic() - started < 10, "never written"
            await asyncio.sleep(0.01)
        written = time.monotonic() - started
        await writer.aclose()
        return written

    # Not before the interval; after it, as soon as a loaded CI machine gets there.
    assert 1.5 <= on_store(store_url, work) < 10


def test_add_never_waits_for_the_database(store_url: str) -> None:
    """With the table locked by another connection the writer's INSERT waits; `add` goes on
    taking rows, at memory speed, and they all land once the lock is gone."""

    async def work(store: Store) -> tuple[float, int]:
        inserting = asyncio.Event()

        def before(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            if statement.startswith("INSERT INTO ledger"):
                inserting.set()

        event.listen(store.engine.sync_engine, "before_cursor_execute", before)
        writer = LedgerWriter(store, max_batch=500)
        async with locked(store_url):
            for i in range(500):  # a full batch: the writer starts its INSERT
                writer.add(row(T0 + i))
            await inserting.wait()
            started = time.perf_counter()
            for i in range(10_000):
                writer.add(row(T0 + i))
            adding = time.perf_counter() - started
            assert writer.pending == 10_500
        await writer.aclose()
        return adding, await count(store)

    adding, written = on_store(store_url, work)
    # They were all added while the lock held the INSERT: add never waited for it. The bound
    # only guards against a slow path (~10 ms is typical; generous for a loaded CI machine).
    assert adding < 2.0
    assert written == 10_500


@contextlib.asynccontextmanager
async def locked(url: str) -> AsyncIterator[None]:
    """The ledger table locked against writers by another connection, for the block."""
    if url.startswith("sqlite"):
        connection = sqlite3.connect(url.removeprefix("sqlite:///"), isolation_level=None)
        connection.execute("BEGIN IMMEDIATE")  # the write lock; the writer waits (busy_timeout)
        try:
            yield
        finally:
            connection.execute("ROLLBACK")
            connection.close()
        return
    other = Store(url)
    try:
        async with other.engine.connect() as connection:
            await connection.execute(text("LOCK TABLE ledger IN EXCLUSIVE MODE"))
            yield
            await connection.rollback()
    finally:
        await other.aclose()


def test_a_failed_write_is_retried_and_beyond_the_bound_the_oldest_rows_go(
    store_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def work(store: Store) -> list[str]:
        async with store.engine.begin() as connection:
            await connection.execute(text("ALTER TABLE ledger RENAME TO ledger_away"))
        writer = LedgerWriter(store, max_batch=2, max_pending=3)
        for i in range(5):
            writer.add(row(T0 + i, request_id=f"r{i}"))
        await writer.flush()  # fails: no table
        assert writer.pending == 3
        async with store.engine.begin() as connection:
            await connection.execute(text("ALTER TABLE ledger_away RENAME TO ledger"))
        await writer.aclose()
        async with store.engine.connect() as connection:
            found = await connection.execute(select(ledger.c.request_id).order_by(ledger.c.at))
            return [request_id for (request_id,) in found]

    caplog.set_level(logging.WARNING, logger="imagegen_proxy")
    assert on_store(store_url, work) == ["r2", "r3", "r4"]
    messages = [record.getMessage() for record in caplog.records]
    assert any("dropping the oldest" in message for message in messages)
    assert any("writing 2 rows failed" in message for message in messages)
    assert any("2 rows were dropped" in message for message in messages)
    assert not any("checkout-bot" in message or "req_" in message for message in messages)


def test_the_writers_throughput(store_url: str) -> None:
    rows = [row(T0 + i % DAY, request_id=f"req_{i}") for i in range(20_000)]

    async def work(store: Store) -> float:
        writer = LedgerWriter(store)
        started = time.perf_counter()
        for each in rows:
            writer.add(each)
            if writer.pending % 500 == 0:
                await asyncio.sleep(0)  # as requests would: the writer gets its turns
        await writer.aclose()
        elapsed = time.perf_counter() - started
        assert await count(store) == len(rows)
        return elapsed

    elapsed = on_store(store_url, work)
    dialect = store_url.split(":", 1)[0]
    print(f"\nledger writes ({dialect}): {len(rows) / elapsed:,.0f} rows/s ({len(rows)} rows)")
