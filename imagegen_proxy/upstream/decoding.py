"""An upstream answer's body as plain bytes: the proxy asks for none, but an upstream may
compress all the same, and the usage tail and the event scanner must read plain bytes.
A compressed answer is inflated in bounded steps, so a small body cannot become a huge one
in memory."""

from __future__ import annotations

import logging
import zlib
from collections.abc import Iterable, Iterator

from ..wire.errors import ProxyError
from .call import Answer

logger = logging.getLogger("imagegen_proxy")

# zlib's wbits: 47 takes a gzip or a zlib header (RFC 9110's "gzip" and "deflate").
_DECODABLE = {b"gzip": 47, b"x-gzip": 47, b"deflate": 47}
_INFLATE_STEP = 1024 * 1024  # output per step: a compressed answer is inflated in bounded steps


def inflater(answer: Answer) -> zlib._Decompress | None:
    """A decoder for a compressed answer (the proxy asks for none, but an upstream may
    ignore that): the usage tail and the event scanner must read plain bytes."""
    encoding = (answer.header("content-encoding") or "").strip().lower().encode()
    if encoding in (b"", b"identity"):
        return None
    wbits = _DECODABLE.get(encoding)
    if wbits is None:
        # Neither its usage nor its events could be read: refuse it rather than let it
        # pass uncounted. The generation is charged all the same.
        logger.warning("upstream answered with content-encoding %r", encoding.decode())
        raise ProxyError(
            502,
            f"The upstream answered with an unsupported content-encoding: {encoding.decode()!r}.",
            type="server_error",
            code="upstream_error",
        )
    return zlib.decompressobj(wbits)


def decoded(chunk: bytes, inflate: zlib._Decompress | None) -> Iterable[bytes]:
    """`chunk` as plain bytes, in steps of bounded size. A plain answer's chunk as it is,
    without a generator: this runs for every chunk (it is an upstream that compresses
    anyway that gets `_inflated`)."""
    return (chunk,) if inflate is None else _inflated(chunk, inflate)


def _inflated(chunk: bytes, inflate: zlib._Decompress) -> Iterator[bytes]:
    yield inflate.decompress(chunk, _INFLATE_STEP)
    while inflate.unconsumed_tail:
        yield inflate.decompress(inflate.unconsumed_tail, _INFLATE_STEP)
