"""Retries that never pay twice.

A generation that may be asked for again (it carries an `Idempotency-Key`, or the
official SDK's `x-stainless-retry-count`) is recorded as it streams: its answer goes to a
spool file, not to memory, and its client reads it back from there like anyone else. A
repeat (the same client key and `Idempotency-Key`; or an SDK retry, count 1 or more, of
the same body) joins it while it runs, from the first byte, or replays it from the file
within `ttl` once it finished. A generation whose clients all left keeps running for
`grace` seconds, so that the retry the SDK sends after its own timeout finds it; then,
if nobody came back, it is cancelled. Only whole 2xx answers are kept: after a failure
the next retry is a fresh attempt.

Spool files live in a directory of this process's own (`<spool_dir>/imagegen-proxy-spool/PID`),
removed at shutdown; one left by a process that died is removed by the next to start.
Finished answers past `max_bytes` in all are dropped, oldest first. With Redis, a repeat
that lands on another process finds the original there (`redis_idempotency`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import os
import shutil
import tempfile
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from .auth import Principal, Project
from .config import IdempotencyConfig, Policy
from .errors import ClientGone, ProxyError
from .types import Message, Receive, Scope, Send

if TYPE_CHECKING:
    from .redis_idempotency import SharedMarkers

logger = logging.getLogger("imagegen_proxy")

_READ = 256 * 1024  # a reader sends the spool on in pieces of at most this
_SMALL = 64 * 1024  # an answer up to this size stays in memory, not in a file
_MAX_MEMORY = 64 * 1024 * 1024  # small answers kept in memory, in all
_REPLAYED = (b"idempotent-replayed", b"true")
_END: Message = {"type": "http.response.body", "body": b"", "more_body": False}
_SET = asyncio.Event()  # what a finished recording's readers find: nothing more to wait for
_SET.set()


@dataclass(frozen=True, slots=True)
class Marker:
    """What makes a request repeatable: its key in the registry, the digest of its body,
    and whether it may join an earlier one (an SDK's first attempt never does)."""

    key: str
    digest: str
    joins: bool
    explicit: bool  # an Idempotency-Key, rather than an SDK retry


def marker(scope: Scope, principal: Principal, body: bytes, sdk_retries: bool) -> Marker | None:
    """The request's `Marker`, or None for one that is never deduplicated."""
    given = retry_count = None
    for name, value in scope["headers"]:
        if name == b"idempotency-key":
            given = value
        elif name == b"x-stainless-retry-count":
            retry_count = value
    if given is None and (retry_count is None or not sdk_retries):
        return None  # the common case: nothing to hash
    who = (principal.id or principal.name).encode()
    digest = hashlib.sha256(body).hexdigest()
    if given is not None:
        if not 0 < len(given) <= 255:
            raise ProxyError(
                400,
                "Idempotency-Key must be 1 to 255 characters.",
                param="Idempotency-Key",
                code="invalid_idempotency_key",
            )
        key = hashlib.sha256(b"key\0" + who + b"\0" + given).hexdigest()
        return Marker(key, digest, joins=True, explicit=True)
    assert retry_count is not None
    key = hashlib.sha256(b"sdk\0" + who + b"\0" + digest.encode()).hexdigest()
    return Marker(key, digest, joins=retry_count.strip() not in (b"", b"0"), explicit=False)


def rate_only(principal: Principal) -> Principal:
    """`principal` held to its per-minute request rates alone: what a joined or replayed
    request counts against (it costs nothing against budgets, quotas or concurrency)."""

    def rates(policy: Policy | None) -> Policy | None:
        if policy is None:
            return None
        return Policy(requests_per_minute=policy.requests_per_minute)

    project = principal.project
    if project is not None:
        project = Project(
            project.name,
            rates(project.policy) or Policy(),
            {model: rates(policy) or Policy() for model, policy in project.per_model.items()},
            project.id,
        )
    return replace(
        principal,
        policy=rates(principal.policy) or Policy(),
        project=project,
        organization=rates(principal.organization),
    )


class Recording:
    """One generation's answer, spooled to a file as it comes, for any number of readers."""

    __slots__ = (
        "_buffer",
        "_dropped",
        "_fd",
        "_gone",
        "_grace",
        "_news",
        "_timer",
        "complete",
        "ended",
        "error",
        "finished_at",
        "marker",
        "path",
        "readers",
        "request_id",
        "size",
        "start",
    )

    def __init__(
        self, marker: Marker, request_id: str, path: Path, grace: float, *, writing: bool = True
    ) -> None:
        self.marker = marker
        self.request_id = request_id
        self.path = path
        self._fd: int | None = None  # the spool file, once the answer outgrew `_SMALL`
        # A small answer stays in memory (a file costs more than the whole exchange).
        self._buffer: bytearray | None = bytearray() if writing else None
        self._grace = grace
        self.start: Message | None = None
        self.size = 0
        self.complete = False  # the answer's last message was written
        self.ended = False  # the generation is over (whole, failed or cut)
        self.error: ProxyError | None = None  # it failed before its answer started
        self.finished_at: float | None = None  # kept for replays since then
        self.readers = 1  # its own client, from the start
        self._dropped = False  # its file goes when the last reader is done
        self._news = asyncio.Event()
        self._gone = asyncio.Event()  # every client left and `grace` ran out
        self._timer: asyncio.TimerHandle | None = None

    @classmethod
    def stored(
        cls, marker: Marker, request_id: str, path: Path, start: Message, size: int
    ) -> Recording:
        """A finished answer another process spooled at `path`, to replay (attached)."""
        recording = cls(marker, request_id, path, 0.0, writing=False)
        recording.start, recording.size = start, size
        recording.complete = recording.ended = True
        return recording

    @property
    def ok(self) -> bool:
        status = None if self.start is None else self.start["status"]
        return self.complete and status is not None and 200 <= status < 300

    # --- the generation's side: the relay's `send` and `receive` ------------------------

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.start = message
        elif message["type"] == "http.response.body":
            data = message.get("body", b"")
            if data:
                self._write(data)
            if not message.get("more_body", False):
                self.complete = True
        self._notify()

    async def receive(self) -> Message:
        """The generation's client, as the relay sees it: gone only when every reader
        left and `grace` ran out."""
        await self._gone.wait()
        return {"type": "http.disconnect"}

    def _write(self, data: bytes) -> None:
        buffer = self._buffer
        if buffer is not None:
            if len(buffer) + len(data) <= _SMALL:
                buffer += data
                self.size += len(data)
                return
            # Outgrown: to the file, from here on (readers move over at their offset).
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            self._buffer = None
            data = bytes(buffer) + data
            self.size -= len(buffer)
        assert self._fd is not None
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]
        self.size += len(data)

    def fail(self, error: ProxyError) -> None:
        self.error = error
        self._notify()

    def end(self) -> None:
        self.ended = True
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._notify()
        # Kept for minutes, by the thousand: as few objects as can be for the collector.
        self._news = self._gone = _SET
        if self.start is not None:
            self.start = {**self.start, "headers": tuple(self.start["headers"])}

    def _notify(self) -> None:
        self._news.set()
        self._news = asyncio.Event()

    # --- the readers' side --------------------------------------------------------------

    def attach(self) -> None:
        """One more client will read it (`detach` when it is done)."""
        self.readers += 1
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def detach(self) -> None:
        self.readers -= 1
        if self.readers:
            return
        if self._dropped:
            _unlink(self.path)
        elif not self.ended:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(self._grace, self._expire)

    def spill(self) -> None:
        """Move a small answer held in memory to its file."""
        buffer = self._buffer
        if buffer is None:
            return
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(buffer)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        self._buffer = None

    @property
    def held(self) -> int:
        """Bytes of its answer held in memory (a small one's)."""
        return 0 if self._buffer is None else len(self._buffer)

    @property
    def dropped(self) -> bool:
        return self._dropped

    def drop(self) -> None:
        """Remove its file, now or once its last reader is done."""
        self._dropped = True
        if self.readers == 0:
            _unlink(self.path)

    async def stream(self, receive: Receive, send: Send, *, replayed: bool) -> int:
        """Send the answer to one attached client, from its first byte, as it is
        written; return the body bytes sent. Raises the generation's `ProxyError` if it
        failed before its answer started, and `ClientGone` when the client leaves."""
        task = asyncio.current_task()
        assert task is not None
        left = False

        async def watch() -> None:
            nonlocal left
            while (await receive())["type"] != "http.disconnect":
                pass
            left = True
            task.cancel()

        watcher = asyncio.create_task(watch())
        try:
            return await self._stream(send, replayed)
        except asyncio.CancelledError:
            if not left:
                raise
            task.uncancel()
            raise ClientGone from None
        except OSError:
            raise ClientGone from None
        finally:
            watcher.cancel()

    def _open_at(self, offset: int) -> BinaryIO:
        # A local file in the page cache: opening and reading it does not wait on anything.
        spool = open(self.path, "rb", buffering=0)  # noqa: SIM115 - the caller closes it
        spool.seek(offset)
        return spool

    async def _stream(self, send: Send, replayed: bool) -> int:
        while self.start is None:
            if self.error is not None:
                raise self.error
            if self.ended:
                raise ProxyError(
                    502,
                    "The generation this request repeats ended without an answer.",
                    type="server_error",
                    code="upstream_error",
                )
            await self._news.wait()
        start = self.start
        if replayed:
            start = {**start, "headers": [*start["headers"], _REPLAYED]}
        await send(start)
        sent = 0
        with contextlib.ExitStack() as stack:
            spool = None
            while True:
                if sent < self.size:
                    buffer = self._buffer
                    if buffer is not None:
                        chunk = bytes(buffer[sent : self.size])
                    else:
                        if spool is None:
                            spool = stack.enter_context(self._open_at(sent))
                        chunk = spool.read(min(_READ, self.size - sent))
                    sent += len(chunk)
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                elif self.complete:
                    await send(_END)
                    return sent
                elif self.ended:
                    return sent  # cut: the server aborts the connection, as for the original
                else:
                    await self._news.wait()

    def _expire(self) -> None:
        self._timer = None
        if self.readers == 0 and not self.ended:
            logger.info(
                "generation %s: nobody came back within %g s; cancelled",
                self.request_id,
                self._grace,
            )
            self._gone.set()


class Idempotency:
    """The recordings of one process, by marker: in flight, and finished within `ttl`."""

    def __init__(
        self, config: IdempotencyConfig, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.config = config
        self._clock = clock
        self._recordings: dict[str, Recording] = {}
        self._finished: deque[Recording] = deque()  # the kept answers, oldest first
        self._kept = 0  # bytes of the finished answers kept
        self._in_memory = 0  # of which small ones, held in memory
        self._sweep: asyncio.TimerHandle | None = None  # when the oldest answer expires
        self._names = itertools.count()
        self._folder: Path | None = None
        self.repeats = 0  # requests answered from another's generation
        self.shared: SharedMarkers | None = None  # with Redis: other processes' generations

    @property
    def folder(self) -> Path:
        """This process's spool directory, made on first use (after removing those of
        processes that are gone)."""
        if self._folder is None:
            root = Path(self.config.spool_dir or tempfile.gettempdir()) / "imagegen-proxy-spool"
            root.mkdir(mode=0o700, parents=True, exist_ok=True)
            _remove_leftovers(root)
            self._folder = root / str(os.getpid())
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder.mkdir(mode=0o700)
        return self._folder

    def find(self, marker: Marker) -> Recording | None:
        """The recording `marker` repeats, if any, attached (`detach` it when done); 422
        when an `Idempotency-Key` comes back with another body."""
        self._expire()
        found = self._recordings.get(marker.key)
        if found is None:
            return None
        if marker.explicit and found.marker.digest != marker.digest:
            raise ProxyError(
                422,
                "This Idempotency-Key was used with another request body: use a new key "
                "for a new request.",
                type="invalid_request_error",
                param="Idempotency-Key",
                code="idempotency_key_reused",
            )
        if not marker.joins:
            return None
        self.repeats += 1
        found.attach()
        return found

    def start(self, marker: Marker, request_id: str) -> Recording:
        """Record a new generation under `marker` (an earlier one under it is forgotten)."""
        path = self.folder / f"{next(self._names)}.spool"
        recording = Recording(marker, request_id, path, self.config.grace)
        self._forget(self._recordings.pop(marker.key, None))
        self._recordings[marker.key] = recording
        return recording

    def ended(self, recording: Recording) -> None:
        """The generation is over: a whole 2xx answer is kept for `ttl`, anything else is
        dropped (the next retry is a fresh attempt)."""
        recording.end()
        if self.shared is not None:
            if recording.ok:
                recording.spill()  # where the other processes can read it
            self.shared.ended(recording)
        if not recording.ok:
            if self._recordings.get(recording.marker.key) is recording:
                del self._recordings[recording.marker.key]
            recording.drop()
            return
        recording.finished_at = self._clock()
        self._kept += recording.size
        self._in_memory += recording.held
        self._finished.append(recording)
        while self._finished and (
            self._kept > self.config.max_bytes or self._in_memory > _MAX_MEMORY
        ):
            self._forget(self._finished.popleft())
        if self._sweep is None:
            self._schedule()

    def _expire(self) -> None:
        """Drop the kept answers older than `ttl`: O(1) unless some are due."""
        finished, ttl = self._finished, self.config.ttl
        now = self._clock()
        while finished and now - (finished[0].finished_at or 0.0) >= ttl:
            self._forget(finished.popleft())

    def _schedule(self) -> None:
        """Wake when the oldest kept answer expires, so that its file goes on time."""
        self._sweep = None
        if not self._finished:
            return
        due = (self._finished[0].finished_at or 0.0) + self.config.ttl - self._clock()
        with contextlib.suppress(RuntimeError):  # no loop: expired on the next request
            self._sweep = asyncio.get_running_loop().call_later(max(due, 0.0), self._swept)

    def _swept(self) -> None:
        self._expire()
        self._schedule()

    def _forget(self, recording: Recording | None) -> None:
        """Drop a kept answer, once (its readers read on from the open file)."""
        if recording is None or recording.finished_at is None or recording.dropped:
            return
        if self._recordings.get(recording.marker.key) is recording:
            del self._recordings[recording.marker.key]
        self._kept -= recording.size
        self._in_memory -= recording.held
        recording.drop()

    @property
    def kept(self) -> int:
        """Bytes of finished answers kept for replays."""
        return self._kept

    def __len__(self) -> int:
        return len(self._recordings)

    def close(self) -> None:
        """Remove every spool file (at shutdown)."""
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        self._recordings.clear()
        self._finished.clear()
        self._kept = self._in_memory = 0
        self._kept = 0
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _remove_leftovers(root: Path) -> None:
    """Remove the spool directories of processes that are gone."""
    for folder in root.iterdir():
        pid = folder.name
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except PermissionError:
            pass  # alive, someone else's
