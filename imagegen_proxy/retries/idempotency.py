"""Retries that never pay twice.

A generation that may be asked for again (it carries an `Idempotency-Key`, or the
official SDK's `x-stainless-retry-count`) is recorded as it streams (`recording`): its
answer goes to a spool file (a small one stays in memory) as it goes to its own client. A
repeat (the same client key and `Idempotency-Key`; or an SDK retry, count 1 or more, of
the same body) joins it while it runs, reading the recording from the first byte, or
replays it within `ttl` once it finished. A generation whose clients all left keeps running for
`grace` seconds, so that the retry the SDK sends after its own timeout finds it; then,
if nobody came back, it is cancelled. Only whole 2xx answers are kept: after a failure
the next retry is a fresh attempt.

Spool files live in a directory of this process's own
(`<spool_dir>/imagegen-proxy-spool/PID`), removed at shutdown; one left by a process that
died is removed by the next to start. Finished answers past `max_bytes` in all are
dropped, oldest first. With Redis, a repeat that lands on another process finds the
original there (`redis_idempotency`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import os
import shutil
import stat
import tempfile
import time
from collections import deque
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import IdempotencyConfig, Policy
from ..governance.auth import Principal, Project
from ..types import Scope
from ..wire.errors import ProxyError
from .recording import Marker, Recording

if TYPE_CHECKING:
    from .redis_idempotency import SharedMarkers

logger = logging.getLogger("imagegen_proxy")

_MAX_MEMORY = 64 * 1024 * 1024  # small answers kept in memory, in all


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
            parent = Path(self.config.spool_dir or tempfile.gettempdir())
            root = parent / "imagegen-proxy-spool"
            root.mkdir(mode=0o700, parents=True, exist_ok=True)
            if _private(root):
                _remove_leftovers(root)
            else:
                # A link, or someone else's, made before this process came: answers must
                # not be read or replaced there. A folder of its own.
                logger.warning(
                    "spool folder %s is a link or another user's: using a private one instead",
                    root,
                )
                root = Path(tempfile.mkdtemp(prefix="imagegen-proxy-spool-", dir=parent))
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
        if marker.explicit and found.digest != marker.digest:
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
            if self._recordings.get(recording.key) is recording:
                del self._recordings[recording.key]
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
        if self._recordings.get(recording.key) is recording:
            del self._recordings[recording.key]
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


def _private(folder: Path) -> bool:
    """Whether `folder` is a real directory of this user's, made one that no one else may
    enter (mode 0700) if it was open to others."""
    found = os.lstat(folder)
    if not stat.S_ISDIR(found.st_mode) or found.st_uid != os.getuid():
        return False
    if stat.S_IMODE(found.st_mode) & 0o077:
        os.chmod(folder, 0o700)
    return True
