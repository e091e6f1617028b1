"""How an upstream exchange fails before its answer starts, once per kind of failure:
what the client gets, whether it may have been billed, whether a pool may try the next."""

from __future__ import annotations

from dataclasses import dataclass

import httpx

from ..wire.errors import ProxyError, server_error


@dataclass(frozen=True, slots=True)
class Failure:
    """How an upstream exchange failed before its answer started: one row of `FAILURES`."""

    kind: str  # for the access log and metrics
    status: int
    code: str
    message: str
    retry: bool = True  # whether a client's retry may help (else x-should-retry: false)
    reached: bool = True  # whether the request may have reached the upstream, and be billed there
    failover: bool = False  # whether a pool may try the next upstream instead

    def error(self) -> ProxyError:
        return server_error(self.status, self.message, self.code, retry=self.retry)


TIMED_OUT = Failure(
    "timeout",
    504,
    "upstream_timeout",
    "The upstream did not answer in time.",
    retry=False,  # a retry would most likely wait just as long, and may be billed again
    reached=True,
)
BROKEN = Failure(
    "protocol",
    502,
    "upstream_error",
    "The upstream connection failed.",
    retry=True,
    reached=True,
    failover=True,  # refused or reset before any answer
)
INVALID_STATUS = Failure(
    "protocol",
    502,
    "upstream_error",
    "The upstream answered with an invalid status.",
    retry=True,
    reached=True,
)
_NO_CONNECTION = Failure(
    "pool",
    503,
    "proxy_overloaded",
    "The proxy has no free upstream connection.",
    retry=True,
    reached=False,
)
_CONNECT_TIMEOUT = Failure(
    "connect",
    504,
    "upstream_timeout",
    "Timed out connecting to the upstream.",
    retry=True,
    reached=False,
    failover=True,
)
_UNREACHABLE = Failure(
    "connect",
    502,
    "upstream_unreachable",
    "Could not connect to the upstream.",
    retry=True,
    reached=False,
    failover=True,
)

# Each upstream failure once, most specific first (as httpx maps httpcore's exceptions).
# Only a request that provably never left the proxy is free: anything that may have
# reached the upstream may be generating there, and be billed.
FAILURES: tuple[tuple[type[Exception], Failure], ...] = (
    (httpx.PoolTimeout, _NO_CONNECTION),
    (httpx.ConnectTimeout, _CONNECT_TIMEOUT),
    (httpx.ConnectError, _UNREACHABLE),
    (httpx.TimeoutException, TIMED_OUT),
    (TimeoutError, TIMED_OUT),  # total_timeout, before the answer started
    (Exception, BROKEN),
)


def failure(exc: Exception) -> Failure:
    """The row of `FAILURES` for `exc`."""
    for kind, row in FAILURES:
        if isinstance(exc, kind):
            return row
    raise AssertionError("FAILURES ends with Exception")  # pragma: no cover
