"""Images on the filesystem (`[storage] url = "file:///path"`), served by the proxy itself at
`{public_url}/v1/imagegen/files/{key}?expires=…&signature=…`: an HMAC-SHA256 of the key and
its expiry, with `signing_key_env`'s key (absent: a random one per process, so URLs do not
outlive it and workers do not share them).

An object is written to `.incoming/` and moved into place when committed (`os.replace`,
atomic on one filesystem): a reader never sees half a file, and an aborted one is simply
unlinked. Blocking file work runs in a worker thread, batched.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import secrets
import time
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import IO
from urllib.parse import unquote, urlsplit

from ..config import StorageConfig
from .base import StorageError, valid_key

_BATCH = 256 * 1024  # bytes gathered before one thread hop writes them
_READ = 256 * 1024
FILES_PATH = "/v1/imagegen/files/"


class FileStore:
    """A directory of images, and the signed URLs it answers them at."""

    def __init__(self, root: Path, public_url: str | None, signing_key: bytes) -> None:
        self.root = root
        self.public_url = public_url
        self._key = signing_key

    @classmethod
    def of(cls, config: StorageConfig) -> FileStore:
        assert config.url is not None
        root = Path(unquote(urlsplit(config.url).path))
        key = None
        if config.signing_key_env is not None:
            value = os.environ.get(config.signing_key_env)
            if not value:
                from ..config import ConfigError

                raise ConfigError(
                    f"[storage] signing_key_env: environment variable "
                    f"{config.signing_key_env} is not set"
                )
            key = value.encode()
        return cls(root, config.public_url, key or secrets.token_bytes(32))

    def _path(self, key: str) -> Path:
        if not valid_key(key):
            raise StorageError("not an image key")
        return self.root / key

    async def open(self, key: str, content_type: str) -> _FileWriter:
        final = self._path(key)
        incoming = self.root / ".incoming"

        temporary = incoming / f"{secrets.token_hex(12)}.part"

        def start() -> IO[bytes]:
            incoming.mkdir(parents=True, exist_ok=True)
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            return os.fdopen(fd, "wb")

        opening = asyncio.ensure_future(asyncio.to_thread(start))
        try:
            file = await asyncio.shield(opening)
        except asyncio.CancelledError:
            # The thread goes on and may still make the file: drop it once it has.
            opening.add_done_callback(lambda done: _drop_opened(done, temporary))
            raise
        except OSError as exc:
            raise StorageError(
                f"cannot write under the storage directory ({exc.strerror})"
            ) from None
        return _FileWriter(file, temporary, final)

    def sign(self, key: str, expires: int) -> str:
        message = f"{key}\n{expires}".encode()
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()

    async def url(self, key: str, ttl: float) -> str:
        if self.public_url is None:
            raise StorageError("[storage] public_url is not set: no URL can be made")
        expires = int(time.time() + ttl)
        signature = self.sign(key, expires)
        return f"{self.public_url}{FILES_PATH}{key}?expires={expires}&signature={signature}"

    def verify(self, key: str, expires: str, signature: str) -> bool:
        """Whether a URL's parts name an object it may fetch: a key of the shape this store
        makes, not expired, signed by this store (compared in constant time)."""
        if not valid_key(key) or not expires.isdigit() or int(expires) < time.time():
            return False
        return hmac.compare_digest(self.sign(key, int(expires)), signature)

    async def read(self, key: str) -> AsyncIterator[bytes]:
        path = self._path(key)
        try:
            file = await asyncio.to_thread(open, path, "rb")
        except OSError:
            raise StorageError("no such image") from None
        try:
            while chunk := await asyncio.to_thread(file.read, _READ):
                yield chunk
        finally:
            file.close()

    async def delete(self, key: str) -> None:
        path = self._path(key)
        await asyncio.to_thread(path.unlink, missing_ok=True)

    async def sweep(self, older_than: datetime) -> int:
        cutoff = older_than.timestamp()

        def sweep() -> int:
            gone = 0
            for path in self.root.rglob("*"):
                try:
                    if path.is_file() and path.stat().st_mtime < cutoff:
                        path.unlink()
                        gone += path.parent.name != ".incoming"
                except OSError:
                    continue
            return gone

        return await asyncio.to_thread(sweep)

    async def aclose(self) -> None:
        return None


def _drop_opened(done: asyncio.Future[IO[bytes]], temporary: Path) -> None:
    """A file opened for a writer nobody got (its request was cancelled): closed, unlinked."""
    if done.cancelled() or done.exception() is not None:
        return
    done.result().close()
    temporary.unlink(missing_ok=True)


class _FileWriter:
    """One file being written under `.incoming/`, moved into place by `commit`."""

    def __init__(self, file: IO[bytes], temporary: Path, final: Path) -> None:
        self._file = file
        self._temporary = temporary
        self._final = final
        self._pending: list[bytes] = []
        self._size = 0
        self._done = False

    async def write(self, data: bytes) -> None:
        self._pending.append(data)
        self._size += len(data)
        if self._size >= _BATCH:
            await self._flush()

    async def _flush(self) -> None:
        pending, self._pending, self._size = self._pending, [], 0
        if pending:
            try:
                await asyncio.to_thread(self._file.write, b"".join(pending))
            except OSError as exc:
                raise StorageError(f"cannot write the image ({exc.strerror})") from None

    async def commit(self) -> None:
        await self._flush()
        file, temporary, final = self._file, self._temporary, self._final

        def finish() -> None:
            file.flush()
            os.fsync(file.fileno())
            file.close()
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(temporary, final)

        try:
            await asyncio.to_thread(finish)
        except OSError as exc:
            raise StorageError(f"cannot keep the image ({exc.strerror})") from None
        self._done = True

    async def abort(self) -> None:
        if self._done:
            return
        self._done = True
        file, temporary = self._file, self._temporary

        def drop() -> None:
            file.close()
            temporary.unlink(missing_ok=True)

        try:
            await asyncio.to_thread(drop)
        except OSError:
            return
