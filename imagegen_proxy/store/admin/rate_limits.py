"""A project's rate limits by model, as the Admin API lists and sets them."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Insert, Table, select
from sqlalchemy.dialects import postgresql, sqlite

from ..schema import project_rate_limits
from .common import NotFound, Page, paginate
from .projects import Projects

RATE_LIMIT_PREFIX = "rl-"  # OpenAI's rate limit ids: "rl-" and the model, "rl-gpt-image-1"

# What a model name can be. Anything else names nothing, and is not asked of the database,
# where some (a NUL, for PostgreSQL) would be an error instead of a "no".
_MODEL = re.compile(r"[^\x00-\x1f]{1,200}")


@dataclass(frozen=True, slots=True)
class RateLimitRecord:
    model: str
    max_requests_per_1_minute: int | None
    max_images_per_1_minute: int | None

    @property
    def id(self) -> str:
        return RATE_LIMIT_PREFIX + self.model


def model_of(rate_limit_id: str) -> str:
    """The model a rate limit id ("rl-gpt-image-1") is for."""
    model = rate_limit_id.removeprefix(RATE_LIMIT_PREFIX)
    if model == rate_limit_id or _MODEL.fullmatch(model) is None:
        raise NotFound("rate limit", rate_limit_id)
    return model


class RateLimits(Projects):
    """The Admin API's operations on a project's rate limits by model."""

    async def rate_limits(
        self, project_id: str, limit: int, *, after: str | None = None, before: str | None = None
    ) -> Page[RateLimitRecord]:
        """The project's rate limits, by model name: one for each model the gateway serves
        that the project may use (unlimited where nothing is set), and each one set."""
        project = await self.project(project_id)
        query = select(project_rate_limits).where(project_rate_limits.c.project_id == project_id)
        async with self.store.engine.connect() as connection:
            found = {
                row.model: _rate_limit(row._mapping) for row in await connection.execute(query)
            }
        for model in self.models:
            if model not in found and project.policy.allows(model):
                found[model] = RateLimitRecord(model, None, None)
        listed = [found[model] for model in sorted(found)]
        return paginate(listed, limit, after=after, before=before)

    async def rate_limits_set(self) -> dict[str, list[RateLimitRecord]]:
        """Every project's per-model rate limits that limit something, by project id, in
        one query (for the console)."""
        query = select(project_rate_limits).order_by(
            project_rate_limits.c.project_id, project_rate_limits.c.model
        )
        found: dict[str, list[RateLimitRecord]] = {}
        async with self.store.engine.connect() as connection:
            for row in await connection.execute(query):
                record = _rate_limit(row._mapping)
                if record.max_requests_per_1_minute or record.max_images_per_1_minute:
                    found.setdefault(row.project_id, []).append(record)
        return found

    async def update_rate_limit(
        self, project_id: str, model: str, changes: Mapping[str, int | None]
    ) -> RateLimitRecord:
        """Set the fields in `changes` (`max_requests_per_1_minute`,
        `max_images_per_1_minute`; None: unlimited) of `model`'s limit, made if need be."""
        await self._active(project_id)
        row = {
            "project_id": project_id,
            "model": model,
            "max_requests_per_1_minute": None,
            "max_images_per_1_minute": None,
            **changes,
        }
        async with self.store.engine.begin() as connection:
            await connection.execute(_upsert(self.store.engine.dialect.name, row, changes))
            found = await connection.execute(
                select(project_rate_limits).where(
                    project_rate_limits.c.project_id == project_id,
                    project_rate_limits.c.model == model,
                )
            )
            return _rate_limit(found.one()._mapping)


def _upsert(dialect: str, row: Mapping[str, Any], changes: Mapping[str, Any]) -> Insert:
    """Insert `row`, or set `changes` on the row with its primary key: one statement, so two
    admins setting the same model's limit at once do not collide."""
    insert_: Callable[[Table], postgresql.Insert | sqlite.Insert]
    insert_ = postgresql.insert if dialect == "postgresql" else sqlite.insert
    statement = insert_(project_rate_limits).values(**row)
    keys = [project_rate_limits.c.project_id, project_rate_limits.c.model]
    if changes:
        return statement.on_conflict_do_update(index_elements=keys, set_=dict(changes))
    return statement.on_conflict_do_nothing(index_elements=keys)


def _rate_limit(row: Mapping[Any, Any]) -> RateLimitRecord:
    return RateLimitRecord(
        row["model"], row["max_requests_per_1_minute"], row["max_images_per_1_minute"]
    )
