"""An upload's spool: where the bytes the proxy cannot send yet wait, on disk, never in
memory. Multipart uploads (`upload.py`) spool the files that come before a deciding field,
JSON uploads (`json_upload.py`) their long strings.

The spool is an anonymous temporary file, made when something must go to disk and unlinked
at creation, so nothing is left behind even by a crash; closing it deletes it.
"""

from __future__ import annotations

import asyncio
import tempfile
from typing import IO

SPOOL_STEP = 256 * 1024  # bytes per write to the spool (batched), and per read from it


class SpoolOwner:
    """An upload's spool: an anonymous temporary file (unlinked at creation) made when
    something must go to disk, and `_spooled` bytes written to it."""

    _spool: IO[bytes] | None = None
    _spooled = 0

    @property
    def spooled_bytes(self) -> int:
        """How many bytes went to disk."""
        return self._spooled

    async def _spool_file(self) -> IO[bytes]:
        """The spool, made on first use."""
        if self._spool is None:
            self._spool = await asyncio.to_thread(tempfile.TemporaryFile)
        return self._spool

    async def aclose(self) -> None:
        """Close (and so delete) the spool file."""
        spool, self._spool = self._spool, None
        if spool is not None:
            await asyncio.to_thread(spool.close)
