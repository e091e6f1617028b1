"""The SSE scanner on its own: event ends found at any split, with any line ending."""

from __future__ import annotations

import pytest
from double import completed, partial

from imagegen_proxy.wire.sse import EventScanner


def stream(eol: bytes) -> bytes:
    body = b": ping\n\n" + partial(0, "QUJD" * 5000) + partial(1) + completed() + b"event: late\n"
    return body.replace(b"\n", eol)


def scan(data: bytes, cuts: list[int], finals: int = 1) -> tuple[int | None, EventScanner]:
    """Feed `data` cut at `cuts`: the offset where the final event ends (if found) and the
    scanner. Whatever was let through must be exactly the data up to there."""
    scanner = EventScanner(finals)
    out = b""
    for start, end in zip([0, *cuts], [*cuts, len(data)], strict=True):
        out += scanner.feed(data[start:end])
        if scanner.done:
            assert data.startswith(out)
            return len(out), scanner
    assert data.startswith(out)
    return None, scanner


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"])
def test_the_end_of_completed_is_found_wherever_the_stream_is_split(eol: bytes) -> None:
    data = stream(eol)
    expected = data.index(b"event: late")
    boundaries = [i for i in range(1, len(data)) if data[i - 1 : i + 1] != b"AA"]
    for cut in [*boundaries[::7], len(data) - 20, expected - 1, expected - 2]:
        end, scanner = scan(data, [cut])
        # A chunk ending between the final CR and LF: CR alone ends a line, and waiting
        # for the LF could wait forever on an upstream that holds its connection.
        split_crlf = eol == b"\r\n" and cut == expected - 1
        assert end == (expected - 1 if split_crlf else expected), (eol, cut)
        assert scanner.completed == 1
        assert scanner.usage.tokens == 10


def test_the_stream_split_into_single_bytes() -> None:
    data = stream(b"\n")
    end, _ = scan(data, list(range(1, len(data))))
    assert end == data.index(b"event: late")


def test_one_completed_per_image_is_awaited() -> None:
    data = completed() + partial(0) + completed() + b"tail"
    end, scanner = scan(data, [])
    assert end is None or end == len(completed())  # finals=1 stops at the first
    end, scanner = scan(data, [5, 40], finals=2)
    assert end == len(data) - 4 and scanner.completed == 2 and scanner.usage.tokens == 20


def test_an_error_event_ends_the_stream() -> None:
    data = partial(0) + b'event: error\ndata: {"error": {"message": "x"}}\n\n' + b"more"
    end, _ = scan(data, [10])
    assert end == len(data) - 4


def test_boundaries_are_known_between_events_only() -> None:
    scanner = EventScanner()
    assert scanner.at_boundary
    scanner.feed(partial(0))
    assert scanner.at_boundary
    scanner.feed(b'event: x\ndata: {"a"')
    assert not scanner.at_boundary
    scanner.feed(b": 1}\n")
    assert not scanner.at_boundary  # a field seen, the event not dispatched
    scanner.feed(b"\n")
    assert scanner.at_boundary


def test_type_in_data_names_an_event_without_an_event_line() -> None:
    data = b'data: {"type":"image_generation.completed","b64_json":"x"}\n\nrest'
    end, _ = scan(data, [3])
    assert end == len(data) - 4


def test_an_event_is_let_through_once_its_data_starts_as_json() -> None:
    scanner = EventScanner()
    start = b"event: image_generation.partial_image\nda"
    assert scanner.feed(b": ping\n\n") == b": ping\n\n"  # comments are never held
    assert scanner.feed(partial(0) + start) == partial(0)
    assert scanner.at_boundary  # the held start was not let through
    rest = b'ta: {"type": "image_generation.partial_image", "b64_json": "QUJD'
    assert scanner.feed(rest) == start + rest
    assert not scanner.at_boundary


MALFORMED = [
    b"event: image_generation.partial_image\ndata: not json\n\n",
    b"data: [DONE]\n\n",
    b"event: image_generation.completed\n\n",  # no data at all
    b"id: 7\n\n",
]


@pytest.mark.parametrize("bad", MALFORMED, ids=range(len(MALFORMED)))
def test_a_malformed_event_is_never_let_through(bad: bytes) -> None:
    data = partial(0) + bad + completed()
    good = len(partial(0))
    for cuts in ([], [good - 3, good + 3], [good + 1], list(range(1, 400))):
        scanner = EventScanner()
        out = b""
        for start, end in zip([0, *cuts], [*cuts, len(data)], strict=True):
            out += scanner.feed(data[start:end])
        assert out == partial(0), cuts
        assert scanner.malformed and not scanner.done
        assert scanner.at_boundary  # an error event can take the bad one's place


def test_an_event_held_back_too_long_is_malformed() -> None:
    scanner = EventScanner()
    data = partial(0) + b"event: x\n" * 10_000  # never any data: held, but not forever
    out = b"".join(scanner.feed(data[i : i + 1000]) for i in range(0, len(data), 1000))
    assert out == partial(0)
    assert scanner.malformed and "no data" in scanner.malformed
