"""What the Admin API's parts of the store share: its refusals, OpenAI's pages (in creation
order, after or before an object's id) and the ids it looks up."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from .. import StoreError


class NotFound(StoreError):
    """An id that names nothing there is."""

    def __init__(self, kind: str, id: str) -> None:
        super().__init__(f"No {kind} found with id '{id}'.")


class BadCursor(StoreError):
    """A page cursor (`param`: "after" or "before") that names nothing listed."""

    def __init__(self, param: str, value: str) -> None:
        super().__init__(f"No object with id '{value}' to page from.")
        self.param = param


class _Identified(Protocol):
    @property
    def id(self) -> str: ...


_T = TypeVar("_T", bound=_Identified)


@dataclass(frozen=True, slots=True)
class Page(Generic[_T]):
    items: list[_T]
    has_more: bool


def paginate(
    items: Sequence[_T], limit: int, *, after: str | None = None, before: str | None = None
) -> Page[_T]:
    """The `limit` items right after `after` (or, given `before`, right before it)."""
    ids = [item.id for item in items]
    start, end = 0, len(items)
    for param, cursor in (("after", after), ("before", before)):
        if cursor is not None and cursor not in ids:
            raise BadCursor(param, cursor)
    if after is not None:
        start = ids.index(after) + 1
    if before is not None:
        end = ids.index(before)
        first = max(start, end - limit)
        return Page(list(items[first:end]), first > start)
    return Page(list(items[start : start + limit]), start + limit < end)


# What the store's ids can be. Anything else names nothing, and is not asked of the
# database, where some (a NUL, for PostgreSQL) would be an error instead of a "no".
_ID = re.compile(r"[A-Za-z0-9_-]{1,40}")


def checked_id(value: str, kind: str) -> str:
    """`value`, if it can be the id of a `kind`; NotFound if not."""
    if _ID.fullmatch(value) is None:
        raise NotFound(kind, value)
    return value
