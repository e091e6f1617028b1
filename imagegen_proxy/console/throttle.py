"""Wrong admin keys at the console's sign-in, slowed per client address: a guesser gets a
few tries a minute, and an operator elsewhere is never locked out."""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable

from cachetools import TTLCache

ATTEMPTS = 5  # wrong keys an address may try in any WINDOW
WINDOW = 60.0  # seconds


class SignInThrottle:
    """Counts each address's wrong keys in a sliding window; `wait` says how long an
    address must wait before its next try (0: it may try now)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        # Bounded: a flood from many addresses forgets the oldest, never grows without end.
        self._failures: TTLCache[str, deque[float]] = TTLCache(10_000, WINDOW, timer=clock)

    def wait(self, address: str) -> float:
        failures = self._failures.get(address)
        if failures is None:
            return 0.0
        now = self._clock()
        while failures and failures[0] <= now - WINDOW:
            failures.popleft()
        if len(failures) < ATTEMPTS:
            return 0.0
        return failures[-ATTEMPTS] + WINDOW - now

    def failed(self, address: str) -> None:
        failures = self._failures.get(address) or deque(maxlen=ATTEMPTS)
        failures.append(self._clock())
        self._failures[address] = failures  # its time to live starts again

    def succeeded(self, address: str) -> None:
        self._failures.pop(address, None)


def retry_after(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))
