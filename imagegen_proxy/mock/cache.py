"""Caches of rendered bytes, bounded by total size: padded images are megabytes each."""

from __future__ import annotations

from collections.abc import Hashable

from cachetools import LRUCache


class BytesLRU(LRUCache[Hashable, bytes]):
    """An LRU of byte strings holding at most `max_bytes` in all (not thread-safe: the mock
    renders on the event loop)."""

    def __init__(self, *, max_bytes: int) -> None:
        super().__init__(maxsize=max_bytes, getsizeof=len)

    def put(self, key: Hashable, value: bytes) -> None:
        if len(value) <= self.maxsize:  # a larger one would not fit at all
            self[key] = value
