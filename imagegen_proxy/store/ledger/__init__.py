"""The ledger: one row per generation that reached the upstream, written in the background
(`writer`) and read back (`queries`): as usage lines, the latest rows, the spend since a
time, and OpenAI's usage and costs pages (`/organization/usage/images`, `/costs`)."""

from .queries import (
    COSTS,
    FIELDS,
    IMAGES,
    LATEST_FILTERS,
    LINE_ITEM_UNNAMED,
    MICROS,
    WIDTHS,
    UsageLine,
    UsageQueryError,
    costs,
    latest,
    spent_since,
    usage_images,
    usage_lines,
)
from .writer import LedgerRow, LedgerWriter

__all__ = [
    "COSTS",
    "FIELDS",
    "IMAGES",
    "LATEST_FILTERS",
    "LINE_ITEM_UNNAMED",
    "MICROS",
    "WIDTHS",
    "LedgerRow",
    "LedgerWriter",
    "UsageLine",
    "UsageQueryError",
    "costs",
    "latest",
    "spent_since",
    "usage_images",
    "usage_lines",
]
