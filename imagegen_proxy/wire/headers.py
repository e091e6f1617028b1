"""Which headers cross the proxy: two allow-lists, one for each direction.

Everything not listed is dropped, so a client credential, a cookie, the operator's
organization id or an upstream's HSTS policy cannot cross by accident, whatever it is called.
"""

from __future__ import annotations

from collections.abc import Iterable

Headers = list[tuple[bytes, bytes]]

# Client -> upstream: what the client may tell the upstream about itself.
FORWARDED_REQUEST = frozenset({b"accept", b"user-agent"})
FORWARDED_REQUEST_PREFIX = b"x-stainless-"

# Upstream -> client: what a client of the OpenAI API reads, and nothing about the operator.
RELAYED_RESPONSE = frozenset(
    {
        b"content-type",
        b"content-length",
        b"content-encoding",  # the body is relayed as it came, encoded or not
        b"x-request-id",
        b"openai-processing-ms",
        b"openai-version",
        b"retry-after",
        b"retry-after-ms",
        b"x-should-retry",
        b"apim-request-id",
        b"x-ms-region",
    }
)
RELAYED_RESPONSE_PREFIX = b"x-ratelimit-"

# Hop-by-hop (RFC 9110 7.6.1): never relayed, whatever the configuration says.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)


def is_forwarded_upstream(name: str) -> bool:
    """Whether a request header of this (lower-case) name goes to the upstream."""
    raw = name.encode("latin-1")
    return raw in FORWARDED_REQUEST or raw.startswith(FORWARDED_REQUEST_PREFIX)


class ResponseHeaders:
    """Filters an upstream answer's headers through the allow-list, plus `extra` names."""

    __slots__ = ("_allowed",)

    def __init__(self, extra: Iterable[str] = ()) -> None:
        self._allowed = RELAYED_RESPONSE | {name.lower().encode("latin-1") for name in extra}

    def filter(self, raw: Iterable[tuple[bytes, bytes]], dropped: frozenset[bytes]) -> Headers:
        """The headers of `raw` to relay; `dropped` names are left out even if allowed."""
        kept: Headers = []
        named: frozenset[bytes] = frozenset()
        for name, value in raw:
            lower = name.lower()
            if lower == b"connection":
                # RFC 9110 7.6.1: the headers it names are hop-by-hop too.
                named |= {token.strip().lower() for token in value.split(b",")}
            elif lower not in dropped and (
                lower in self._allowed or lower.startswith(RELAYED_RESPONSE_PREFIX)
            ):
                kept.append((lower, value))
        if named:
            kept = [(name, value) for name, value in kept if name not in named]
        return kept
