"""The ledger's writer: one row per generation that reached the upstream, written in the
background, a batch at a time."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from dataclasses import dataclass, fields
from operator import attrgetter
from typing import TYPE_CHECKING

from sqlalchemy import insert

from ..schema import ledger

if TYPE_CHECKING:
    from .. import Store

logger = logging.getLogger("imagegen_proxy")


@dataclass(frozen=True, slots=True)
class LedgerRow:
    """One generation, as the `ledger` table keeps it (see `schema.ledger`)."""

    at: int
    request_id: str
    key_id: str | None
    key_name: str
    project_id: str | None
    project_name: str | None
    model: str | None
    source: str
    size: str | None
    quality: str | None
    n: int
    images: int
    status: int
    outcome: str
    input_tokens: int
    output_tokens: int
    cost_micros: int | None
    duration_ms: int
    objects: list[str] | None = None  # the keys of the images [storage] kept
    trace_id: str | None = None  # its W3C trace id, with [tracing] on


COLUMNS = tuple(field.name for field in fields(LedgerRow))
_values = attrgetter(*COLUMNS)  # not dataclasses.astuple: it deep-copies every field
# With RETURNING, SQLAlchemy sends a batch as multi-row INSERTs ("insertmanyvalues", up to
# 1,000 rows and the driver's parameter limit each), compiled once: 20x faster than building
# `insert().values([...])` anew, and still one statement for a default batch of 500.
_INSERT = insert(ledger).returning(ledger.c.id)


class LedgerWriter:
    """Writes ledger rows in the background, a batch at a time.

    `add` only appends to a list in memory: it never waits for the database. A task in the
    running loop (started by the first `add`) writes what waits with one multi-row INSERT
    every `interval` seconds, or as soon as `max_batch` rows wait. A failed write is logged
    and its rows are written with the next batch; past `max_pending` rows waiting, the
    oldest are dropped, with a warning. `aclose()` writes what is left and stops the task.

    Rows are in memory until written: a crash loses the last `interval` seconds of them (and
    all that wait while the database is unreachable).
    """

    def __init__(
        self,
        store: Store,
        *,
        interval: float = 1.0,
        max_batch: int = 500,
        max_pending: int = 100_000,
    ) -> None:
        if interval <= 0 or max_batch < 1 or max_pending < max_batch:
            raise ValueError("need interval > 0 and 1 <= max_batch <= max_pending")
        self._store = store
        self._interval = interval
        self._max_batch = max_batch
        self._max_pending = max_pending
        self._waiting: deque[LedgerRow] = deque()
        self._writing = 0
        self._dropped = 0
        self._failures = 0
        self._lock = asyncio.Lock()  # one write at a time, so rows land in order
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def pending(self) -> int:
        """Rows added and not written yet."""
        return len(self._waiting) + self._writing

    def add(self, row: LedgerRow) -> None:
        """Queue `row` for the next write."""
        if self._closed:
            logger.warning("ledger: a row came after the writer closed; dropped")
            return
        if len(self._waiting) >= self._max_pending:
            self._drop(1)
        self._waiting.append(row)
        if self._task is None:
            with contextlib.suppress(RuntimeError):  # no running loop: flush() will write it
                self._task = asyncio.get_running_loop().create_task(self._run())
        if len(self._waiting) >= self._max_batch:
            self._wake.set()

    async def flush(self) -> None:
        """Write every row waiting now; a failure is logged and the rows kept."""
        async with self._lock:
            while self._waiting:
                if not await self._write(self._max_batch):
                    return

    async def aclose(self) -> None:
        """Write what is left and stop the background task."""
        self._closed = True
        self._wake.set()
        if self._task is not None:
            await self._task
        await self.flush()
        if self._waiting:
            logger.error("ledger: %d rows could not be written and are lost", len(self._waiting))

    async def _run(self) -> None:
        while not self._closed:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._interval):
                    await self._wake.wait()
            self._wake.clear()
            await self.flush()

    async def _write(self, count: int) -> bool:
        batch = [self._waiting.popleft() for _ in range(min(count, len(self._waiting)))]
        self._writing = len(batch)
        try:
            async with self._store.engine.begin() as connection:
                await connection.execute(
                    _INSERT, [dict(zip(COLUMNS, _values(row), strict=True)) for row in batch]
                )
        except BaseException as exc:
            self._waiting.extendleft(reversed(batch))
            if len(self._waiting) > self._max_pending:
                self._drop(len(self._waiting) - self._max_pending)
            if not isinstance(exc, Exception):
                raise  # cancelled: the rows stay for whoever writes next
            self._failures += 1
            # The driver's message only: SQLAlchemy's own text carries the rows' values.
            reason = getattr(exc, "orig", None) or exc
            log = logger.warning if self._failures == 1 else logger.debug
            log(
                "ledger: writing %d rows failed (%s: %s); retrying with the next batch",
                len(batch),
                type(reason).__name__,
                reason,
            )
            return False
        finally:
            self._writing = 0
        if self._failures or self._dropped:
            logger.warning(
                "ledger: writing again after %d failed attempts; %d rows were dropped",
                self._failures,
                self._dropped,
            )
            self._failures = self._dropped = 0
        return True

    def _drop(self, count: int) -> None:
        if not self._dropped:
            logger.warning(
                "ledger: more than %d rows wait to be written: dropping the oldest",
                self._max_pending,
            )
        for _ in range(count):
            self._waiting.popleft()
        self._dropped += count
