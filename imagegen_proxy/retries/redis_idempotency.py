"""Repeats across processes, through Redis (`[limits] storage = "redis://..."`).

The process that starts a repeatable generation claims its marker in Redis (`SET NX`,
for as long as a generation may run). A repeat that lands on another process finds the
claim and waits, polling, until the generation ends (at most `wait` seconds): then it
replays the answer from the spool file the owner names, when it can read it (a spool
directory both processes share: the default one, on one host), and otherwise gets 409
`idempotency_in_progress` with a `retry-after`. A failed generation drops its claim:
the repeat then makes a fresh attempt. While Redis is away, every process deduplicates
on its own (logged once).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..redis_support import Outage, redis_client
from ..wire.errors import ProxyError
from .recording import Marker, Recording

if TYPE_CHECKING:
    from redis.asyncio import Redis

_POLL = 0.25  # seconds between looks at a claim held elsewhere


class SharedMarkers:
    """The claims of every process's repeatable generations, in Redis."""

    def __init__(
        self,
        url: str,
        *,
        ttl: float,
        running: float,
        prefix: str = "imagegen_proxy",
        client: Redis | None = None,
    ) -> None:
        self._client = client or redis_client(url, "Shared idempotency")
        self._prefix = f"{prefix}:idem:"
        self._ttl_ms = round(ttl * 1000)
        self._running_ms = round(running * 1000)  # how long a claim may stay "running"
        self.process = f"{os.getpid()}-{secrets.token_hex(4)}"
        self._pending: set[asyncio.Task[None]] = set()
        self._outage = Outage("shared idempotency", "repeats are deduplicated per process")

    async def claim(self, marker: Marker, request_id: str, wait: float) -> Recording | None:
        """Claim `marker` for a generation here: None when claimed (go on), or the
        generation another process finished, to replay. Raises 409 when it runs (or ran)
        elsewhere beyond reach."""
        key = self._prefix + marker.key
        mine = json.dumps({"owner": self.process, "state": "running", "id": request_id})
        try:
            if not marker.joins:  # a first attempt: never deduplicated, it takes the key
                await self._client.set(key, mine, px=self._running_ms)
                return None
            deadline = asyncio.get_running_loop().time() + wait
            while True:
                if await self._client.set(key, mine, px=self._running_ms, nx=True):
                    self._outage.over()
                    return None
                found = _load(await self._client.get(key))
                if found is None:
                    continue  # it was dropped meanwhile: claim it
                if found.get("owner") == self.process:
                    await self._client.set(key, mine, px=self._running_ms)
                    return None  # ours, forgotten here (expired): a fresh attempt
                if found.get("state") == "done":
                    stored = _stored(marker, found)
                    if stored is not None:
                        return stored
                    raise _elsewhere(found, 1)
                if asyncio.get_running_loop().time() >= deadline:
                    raise _elsewhere(found, 5)
                await asyncio.sleep(_POLL)
        except ProxyError:
            raise
        except Exception as exc:
            self._outage.failed(exc)
            return None

    def ended(self, recording: Recording) -> None:
        """Tell the other processes how the generation ended (in the background)."""
        task = asyncio.get_running_loop().create_task(self._end(recording))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _end(self, recording: Recording) -> None:
        key = self._prefix + recording.key
        try:
            found = _load(await self._client.get(key))
            if found is None or found.get("id") != recording.request_id:
                return  # another attempt took the key since
            if not recording.ok:
                await self._client.delete(key)
                return
            start = recording.start
            assert start is not None
            done = {
                **found,
                "state": "done",
                "path": recording.path,
                "size": recording.size,
                "status": start["status"],
                "headers": [
                    [k.decode("latin-1"), v.decode("latin-1")] for k, v in start["headers"]
                ],
            }
            await self._client.set(key, json.dumps(done), px=self._ttl_ms)
        except Exception as exc:
            self._outage.failed(exc)

    async def aclose(self) -> None:
        while self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)
        await self._client.aclose()


def _load(raw: Any) -> dict[str, Any] | None:
    if raw is None:
        return None
    try:
        found = json.loads(raw)
    except ValueError:
        return None
    return found if isinstance(found, dict) else None


def _stored(marker: Marker, found: dict[str, Any]) -> Recording | None:
    """The finished answer another process spooled, if this one can read it."""
    path = Path(str(found.get("path", "")))
    try:
        if not path.is_file() or path.stat().st_size != int(found["size"]):
            return None
        headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in found["headers"]]
        start = {"type": "http.response.start", "status": int(found["status"]), "headers": headers}
    except (OSError, KeyError, TypeError, ValueError):
        return None
    return Recording.stored(marker, str(found.get("id", "")), path, start, int(found["size"]))


def _elsewhere(found: dict[str, Any], wait: int) -> ProxyError:
    return ProxyError(
        409,
        "This request repeats a generation that another proxy process "
        f"{'ran' if found.get('state') == 'done' else 'is running'}; retry in {wait} s.",
        type="invalid_request_error",
        code="idempotency_in_progress",
        headers=[("retry-after", str(wait))],
    )
