"""The Spend page's question: a range of whole UTC days and a grouping, answered from the
ledger as the chart's series and the table's (and the CSV's) rows."""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, date, datetime, time, timedelta
from typing import TYPE_CHECKING, Any

from starlette.requests import Request

if TYPE_CHECKING:
    from ..store import Store

DAY = 86400
MAX_DAYS = 366
# Spend grouped by: the ledger's column, and the label of rows that have none.
GROUPS = {
    "project": ("project_name", "(no project)"),
    "key": ("key_name", ""),
    "model": ("model", "(none)"),
}


class SpendQuery:
    """`?start=YYYY-MM-DD&end=YYYY-MM-DD&by=project|key|model`: whole UTC days, `end`
    included; by default the last 14 days by project."""

    def __init__(self, request: Request) -> None:
        params = request.query_params
        today = datetime.now(UTC).date()
        self.end = _day(params.get("end"), today)
        self.start = _day(params.get("start"), self.end - timedelta(days=13))
        self.by = params.get("by", "project")
        if self.by not in GROUPS:
            raise ValueError(f"by must be one of {', '.join(GROUPS)}")
        if self.start > self.end:
            raise ValueError("start must not be after end")
        if (self.end - self.start).days >= MAX_DAYS:
            raise ValueError(f"at most {MAX_DAYS} days at a time")

    async def run(
        self, store: Store
    ) -> tuple[list[str], dict[str, list[int]], list[dict[str, Any]]]:
        """The days, each group's cost per day (for the chart), and one row per day and
        group that spent anything (for the table and the CSV)."""
        from ..store.ledger import usage_lines

        column, unnamed = GROUPS[self.by]
        count = (self.end - self.start).days + 1
        start = int(datetime.combine(self.start, time(), UTC).timestamp())
        lines = await usage_lines(store, start, start + count * DAY, width=DAY, group_by=[column])
        days = [str(self.start + timedelta(days=i)) for i in range(count)]
        index = {day: i for i, day in enumerate(days)}
        series: dict[str, list[int]] = defaultdict(lambda: [0] * len(days))
        rows = []
        for line in lines:
            day = str(datetime.fromtimestamp(line.start, UTC).date())
            group = line.group[column] or unnamed
            series[group][index[day]] += line.cost_micros
            rows.append(
                {
                    "day": day,
                    "group": group,
                    "requests": line.requests,
                    "images": line.images,
                    "cost_micros": line.cost_micros,
                }
            )
        ordered = dict(sorted(series.items(), key=lambda item: -sum(item[1])))
        return days, ordered, rows


def _day(value: str | None, default: date) -> date:
    if not value:
        return default
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{value!r} is no date (YYYY-MM-DD)") from None
