"""The ledger read back: usage lines by group and bucket, the latest rows, the spend since a
time, and OpenAI's usage and costs pages (`/organization/usage/images`, `/costs`).

Buckets are whole UTC minutes, hours or days (multiples of the width since the epoch), cut
to the asked range: `start_time` inclusive, `end_time` exclusive. Costs add up only rows with
a price; a cost's `line_item` is the model's name ("Image models" when a request named none).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from sqlalchemy import BigInteger, ColumnElement, case, func, literal, select

from ..schema import ledger
from .writer import COLUMNS, LedgerRow

if TYPE_CHECKING:
    from .. import Store

WIDTHS: Final[Mapping[str, int]] = {"1m": 60, "1h": 3600, "1d": 86400}
LINE_ITEM_UNNAMED = "Image models"
MICROS = 1_000_000


class UsageQueryError(ValueError):
    """A usage or costs query that cannot be answered; `param` names the culprit."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True, slots=True)
class UsageLine:
    """What one group spent in one bucket [start, end)."""

    start: int
    end: int
    group: Mapping[str, str | None]
    requests: int
    images: int
    input_tokens: int
    output_tokens: int
    cost_micros: int  # of the priced rows only
    priced_requests: int
    priced_images: int


# What a query may group and filter by. `api_key_id` is the store's key id (None for a
# configuration's [[keys]] key).
FIELDS: Final[Mapping[str, ColumnElement[Any]]] = {
    "project_id": ledger.c.project_id,
    "project_name": ledger.c.project_name,
    "api_key_id": ledger.c.key_id,
    "key_name": ledger.c.key_name,
    "model": ledger.c.model,
    "size": ledger.c.size,
    "quality": ledger.c.quality,
    "source": ledger.c.source,
    "line_item": func.coalesce(ledger.c.model, literal(LINE_ITEM_UNNAMED, literal_execute=True)),
}


async def usage_lines(
    store: Store,
    start: int,
    end: int,
    *,
    width: int | None = None,
    group_by: Sequence[str] = (),
    filters: Mapping[str, Collection[str]] | None = None,
) -> list[UsageLine]:
    """The groups that spent anything in [start, end), per bucket of `width` seconds (UTC
    aligned, cut to the range), or over the whole range when `width` is None."""
    _check(start, end, group_by, FIELDS, filters, FIELDS)
    origin, width = (start, end - start) if width is None else (start - start % width, width)
    return await _lines(store, start, end, origin, width, group_by, filters or {})


async def _lines(
    store: Store,
    start: int,
    end: int,
    origin: int,
    width: int,
    group_by: Sequence[str],
    filters: Mapping[str, Collection[str]],
) -> list[UsageLine]:
    # Integer arithmetic both SQLite and PostgreSQL group on; the numbers are inlined (they
    # are ints) so that the GROUP BY expression is the SELECT's, parameters and all.
    def number(value: int) -> ColumnElement[int]:
        return literal(value, BigInteger, literal_execute=True)

    bucket = ((ledger.c.at - number(origin)) // number(width)).label("bucket")
    names = list(dict.fromkeys(group_by))
    cost = ledger.c.cost_micros
    sums: dict[str, ColumnElement[Any]] = {
        "requests": func.count(),
        "images": func.sum(ledger.c.images),
        "input_tokens": func.sum(ledger.c.input_tokens),
        "output_tokens": func.sum(ledger.c.output_tokens),
        "cost_micros": func.sum(cost),  # SUM and COUNT pass NULLs by: the priced rows only
        "priced_requests": func.count(cost),
        "priced_images": func.sum(case((cost.is_not(None), ledger.c.images), else_=0)),
    }
    groups = [FIELDS[name].label(name) for name in names]
    query = (
        select(bucket, *groups, *(total.label(name) for name, total in sums.items()))
        .where(ledger.c.at >= start, ledger.c.at < end)
        .where(*(FIELDS[name].in_(list(values)) for name, values in filters.items() if values))
        .group_by(bucket, *groups)
    )
    async with store.engine.connect() as connection:
        rows = (await connection.execute(query)).all()
    lines = []
    for row in rows:
        found = row._mapping
        first = origin + int(found["bucket"]) * width
        lines.append(
            UsageLine(
                max(first, start),
                min(first + width, end),
                {name: found[name] for name in names},
                # PostgreSQL sums BIGINTs as NUMERIC: Decimal in Python.
                **{name: int(found[name] or 0) for name in sums},
            )
        )
    return sorted(lines, key=lambda line: (line.start, [v or "" for v in line.group.values()]))


# What `latest` filters by: a value each, matched exactly.
LATEST_FILTERS: Final[Mapping[str, ColumnElement[Any]]] = {
    "request_id": ledger.c.request_id,
    "key_name": ledger.c.key_name,
    "project_name": ledger.c.project_name,
    "model": ledger.c.model,
    "outcome": ledger.c.outcome,
    "trace_id": ledger.c.trace_id,
}


async def latest(
    store: Store, *, limit: int = 100, filters: Mapping[str, str] | None = None
) -> list[LedgerRow]:
    """The latest generations, newest first, those matching every one of `filters`."""
    query = select(*(ledger.c[name] for name in COLUMNS))
    for name, value in (filters or {}).items():
        query = query.where(LATEST_FILTERS[name] == value)
    query = query.order_by(ledger.c.at.desc(), ledger.c.id.desc()).limit(limit)
    async with store.engine.connect() as connection:
        rows = (await connection.execute(query)).all()
    return [LedgerRow(*row) for row in rows]


# --- OpenAI's pages ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Report:
    """One of OpenAI's usage endpoints: what it groups and filters by, its bucket widths with
    their (default, most) number of buckets a page, and its result object."""

    groups: tuple[str, ...]  # in the order results list them
    filters: frozenset[str]
    limits: Mapping[str, tuple[int, int]]
    result: Callable[[UsageLine, Sequence[str]], dict[str, Any] | None]


def _image_result(line: UsageLine, group_by: Sequence[str]) -> dict[str, Any]:
    return {
        "object": "organization.usage.images.result",
        "images": line.images,
        "num_model_requests": line.requests,
        **{name: line.group.get(name) for name in IMAGES.groups},
    }


def _cost_result(line: UsageLine, group_by: Sequence[str]) -> dict[str, Any] | None:
    if not line.priced_requests:
        return None
    by_item = "line_item" in group_by
    return {
        "object": "organization.costs.result",
        "amount": {"value": line.cost_micros / MICROS, "currency": "usd"},
        **{name: line.group.get(name) for name in COSTS.groups},
        # The proxy has no Agents API: all of it is "unlabeled", as OpenAI names the rest.
        "api_source": "unlabeled" if "api_source" in group_by else None,
        "quantity": line.priced_images if by_item else None,
        "quantity_unit": "images" if by_item else None,
    }


# `user_id` is a group the proxy has no values for (it has no users): always null.
IMAGES: Final = _Report(
    ("project_id", "user_id", "api_key_id", "model", "size", "source"),
    frozenset({"project_id", "api_key_id", "model", "size", "source"}),
    {"1m": (60, 1440), "1h": (24, 168), "1d": (7, 31)},
    _image_result,
)
COSTS: Final = _Report(
    ("project_id", "user_id", "api_key_id", "line_item", "api_source"),
    frozenset({"project_id", "api_key_id", "line_item"}),
    {"1d": (7, 180)},
    _cost_result,
)


async def usage_images(
    store: Store,
    start: int,
    end: int | None = None,
    bucket_width: str = "1d",
    group_by: Sequence[str] = (),
    filters: Mapping[str, Collection[str]] | None = None,
    limit: int | None = None,
    page: str | None = None,
) -> dict[str, Any]:
    """OpenAI's `GET /organization/usage/images` page. `filters` maps a field (`project_id`,
    `api_key_id`, `model`, `size`, `source`) to the values kept; `end` defaults to now."""
    return await _page(store, IMAGES, start, end, bucket_width, group_by, filters, limit, page)


async def costs(
    store: Store,
    start: int,
    end: int | None = None,
    bucket_width: str = "1d",
    group_by: Sequence[str] = (),
    filters: Mapping[str, Collection[str]] | None = None,
    limit: int | None = None,
    page: str | None = None,
) -> dict[str, Any]:
    """OpenAI's `GET /organization/costs` page, in dollars. `filters` maps `project_id`,
    `api_key_id` or `line_item` to the values kept; `end` defaults to now."""
    return await _page(store, COSTS, start, end, bucket_width, group_by, filters, limit, page)


async def _page(
    store: Store,
    report: _Report,
    start: int,
    end: int | None,
    bucket_width: str,
    group_by: Sequence[str],
    filters: Mapping[str, Collection[str]] | None,
    limit: int | None,
    page: str | None,
) -> dict[str, Any]:
    end = int(time.time()) if end is None else end
    _check(start, end, group_by, report.groups, filters, report.filters)
    if bucket_width not in report.limits:
        raise UsageQueryError("bucket_width", f"bucket_width must be one of {list(report.limits)}")
    default, most = report.limits[bucket_width]
    limit = default if limit is None else limit
    if not 1 <= limit <= most:
        raise UsageQueryError(
            "limit", f"limit must be 1 to {most} with bucket_width={bucket_width}"
        )
    width = WIDTHS[bucket_width]
    origin = start - start % width
    first = origin if page is None else _cursor(page, origin, width, end)
    stop = min(end, first + limit * width)
    sql_groups = [name for name in group_by if name in FIELDS]
    lines = await _lines(store, max(start, first), stop, first, width, sql_groups, filters or {})
    data: list[dict[str, Any]] = [
        {
            "object": "bucket",
            "start_time": max(start, t),
            "end_time": min(end, t + width),
            "results": [],
        }
        for t in range(first, stop, width)
    ]
    for line in lines:
        result = report.result(line, group_by)
        if result is not None:
            data[(line.start - first) // width]["results"].append(result)
    more = stop < end
    return {
        "object": "page",
        "data": data,
        "has_more": more,
        "next_page": _page_token(stop) if more else None,
    }


def _check(
    start: int,
    end: int,
    group_by: Collection[str],
    groups: Collection[str],
    filters: Mapping[str, object] | None,
    filterable: Collection[str],
) -> None:
    if end <= start:
        raise UsageQueryError("end_time", "end_time must be after start_time")
    if unknown := set(group_by) - set(groups):
        raise UsageQueryError("group_by", f"cannot group by {sorted(unknown)}")
    if unknown := set(filters or {}) - set(filterable):
        raise UsageQueryError("filters", f"cannot filter by {sorted(unknown)}")


def _page_token(bucket_start: int) -> str:
    return base64.urlsafe_b64encode(bucket_start.to_bytes(8, "big")).decode()


def _cursor(page: str, origin: int, width: int, end: int) -> int:
    """The first bucket of the page `page` names, if it is one of this query's buckets."""
    with contextlib.suppress(binascii.Error, ValueError):
        raw = base64.urlsafe_b64decode(page.encode())
        first = int.from_bytes(raw, "big")
        if len(raw) == 8 and origin <= first < end and (first - origin) % width == 0:
            return first
    raise UsageQueryError("page", "page is not a next_page of this query")


async def spent_since(
    store: Store, since: int, *, key: str | None = None, project: str | None = None
) -> int:
    """Micro-USD the ledger holds since `since` (Unix seconds): the key's (by name), the
    project's (by name), or, with neither, the organization's."""
    query = select(func.coalesce(func.sum(ledger.c.cost_micros), 0)).where(ledger.c.at >= since)
    if key is not None:
        query = query.where(ledger.c.key_name == key)
    if project is not None:
        query = query.where(ledger.c.project_name == project)
    async with store.engine.connect() as connection:
        return int((await connection.execute(query)).scalar_one())
