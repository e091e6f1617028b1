"""What the console reads from forms and query strings, and how it words limits and times."""

from __future__ import annotations

import math
import secrets
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError
from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from ..config import Policy
from ..observe.activity import Unanswered
from .chart import dollars

PERIODS = ("day", "week", "month", "total")

# The Requests page's query parameters, and the ledger's columns they filter.
_FILTERS = {
    "key": "key_name",
    "project": "project_name",
    "model": "model",
    "outcome": "outcome",
    "request_id": "request_id",
    "trace_id": "trace_id",
}


def filters(request: Request) -> dict[str, str]:
    return {
        column: value
        for name, column in _FILTERS.items()
        if (value := request.query_params.get(name, "").strip())
    }


def unanswered(found: list[Unanswered], filters: dict[str, str], kind: str) -> list[Unanswered]:
    """The refusals and failures that match the Requests page's filters, and its `kind`
    ("outcome: code", the Overview's counts) when it has one."""
    wanted = {_UNANSWERED[column]: value for column, value in filters.items()}
    return [
        one
        for one in found
        if (not kind or one.kind == kind)
        and all(getattr(one, name) == value for name, value in wanted.items())
    ]


# The ledger's columns the filters name, as a refusal's fields.
_UNANSWERED = {
    "key_name": "key",
    "project_name": "project",
    "model": "model",
    "outcome": "outcome",
    "request_id": "request_id",
    "trace_id": "trace_id",
}


def text(form: FormData, name: str) -> str:
    value = str(form.get(name, "")).strip()
    if not value or len(value) > 200:
        raise ValueError(f"{name}: 1 to 200 characters")
    return value


def number(form: FormData, name: str) -> float | None:
    value = str(form.get(name, "")).strip()
    if not value:
        return None
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{name}: {value!r} is not a number") from None
    if not math.isfinite(number):
        raise ValueError(f"{name}: {value!r} is not a finite number")
    return number


def policy(form: FormData) -> Policy:
    """The limits a form sets (blank fields: none)."""
    fields: dict[str, Any] = {}
    for name in ("budget_usd", "requests_per_minute", "images_per_day"):
        value = number(form, name)
        if value is not None:
            fields[name] = value if name == "budget_usd" else int(value)
    period = str(form.get("budget_period", "") or "month")
    if period not in PERIODS:
        raise ValueError(f"budget_period must be one of {', '.join(PERIODS)}")
    try:
        return Policy(budget_period=period, **fields)
    except ValidationError as error:
        raise ValueError(reason(error)) from None


def reason(error: Exception) -> str:
    if isinstance(error, ValidationError):
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        return f"{where}: {first['msg']}"
    return str(error)


def moment(value: int | None) -> str:
    if value is None:
        return ""
    return datetime.fromtimestamp(value, UTC).strftime("%Y-%m-%d %H:%M:%S")  # the column says UTC


def limits(policy: Policy | None) -> str:
    """A policy in a line: "$5 a month · 10 requests/min · only gpt-image-2"; "" if none."""
    if policy is None:
        return ""
    parts = []
    if policy.budget_micros is not None:
        per = "in all" if policy.budget_period == "total" else f"a {policy.budget_period}"
        parts.append(f"{dollars(policy.budget_micros)} {per}")
    for name, unit in _UNITS:
        value = getattr(policy, name)
        if value is not None:
            parts.append(f"{value:,} {unit}")
    if policy.models is not None:
        parts.append("only " + (", ".join(sorted(policy.models)) or "no model"))
    if policy.denied_models:
        parts.append("not " + ", ".join(sorted(policy.denied_models)))
    return " · ".join(parts)


_UNITS = (
    ("requests_per_minute", "requests/min"),
    ("images_per_minute", "images/min"),
    ("images_per_day", "images/day"),
    ("tokens_per_day", "tokens/day"),
    ("max_concurrent", "at once"),
)


def csrf_token(request: Request) -> str:
    """The session's CSRF token, made on first need."""
    token = request.session.get("csrf")
    if not isinstance(token, str):
        token = request.session["csrf"] = secrets.token_urlsafe(32)
    return token


def redirect(request: Request, where: str) -> Response:
    return RedirectResponse(request.scope.get("root_path", "") + where, status_code=303)
