"""The streaming JSON scanner on its own: the value it reads is the one `json.loads`
reads, wherever the bytes are cut; its prefixes are ijson's; a long string goes through in
pieces of one chunk at C speed; whatever is not one JSON document is refused."""

from __future__ import annotations

import base64
import io
import itertools
import json
import math
import time
from typing import Any

import ijson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imagegen_proxy.wire.jsonstream import Event, JsonEvents, JsonStreamError

REFUSED = object()


def feed_all(data: bytes, cuts: list[int] | None = None, **bounds: int) -> list[Event]:
    """The events for `data` fed in the pieces that `cuts` makes, the input then ended.

    Checks what every feed promises of a string value's pieces: never empty, and no more
    than the bytes of the feed that gave it (three more when an escape was cut across)."""
    scanner = JsonEvents(**bounds)
    bounds_ = [0, *sorted(set(cuts or [])), len(data)]
    events: list[Event] = []
    for start, end in itertools.pairwise(bounds_):
        for event in scanner.feed(data[start:end]):
            if event[1] == "string":
                assert isinstance(event[2], bytes)
                assert 0 < len(event[2]) <= end - start + 3
            events.append(event)
    scanner.end()
    assert scanner.done
    return events


def merged(events: list[Event]) -> list[tuple[str, str, object]]:
    """The events with each string value's pieces joined into one `string` event of a
    `str`, as ijson gives it. Checks that a string's pieces, all with its prefix, are
    followed by exactly one `string_end` before anything else."""
    out: list[tuple[str, str, object]] = []
    pieces: list[bytes] | None = None
    prefix = ""
    for event_prefix, kind, value in events:
        if kind == "string":
            assert isinstance(value, bytes)
            if pieces is None:
                pieces, prefix = [], event_prefix
            assert event_prefix == prefix
            pieces.append(value)
        elif kind == "string_end":
            assert value is None
            if pieces is None:
                pieces, prefix = [], event_prefix
            assert event_prefix == prefix
            out.append((prefix, "string", b"".join(pieces).decode()))
            pieces = None
        else:
            assert pieces is None, f"{kind} inside a string"
            out.append((event_prefix, kind, value))
    assert pieces is None
    return out


def build(events: list[tuple[str, str, object]]) -> Any:
    """The Python value that merged events describe."""
    stack: list[Any] = []
    keys: list[str | None] = []
    result: list[Any] = []

    def add(value: Any) -> None:
        if not stack:
            result.append(value)
        elif isinstance(stack[-1], list):
            stack[-1].append(value)
        else:
            key = keys[-1]
            assert key is not None
            stack[-1][key] = value
            keys[-1] = None

    for _, kind, value in events:
        if kind in ("start_map", "start_array"):
            stack.append({} if kind == "start_map" else [])
            keys.append(None)
        elif kind in ("end_map", "end_array"):
            keys.pop()
            add(stack.pop())
        elif kind == "map_key":
            assert isinstance(value, str) and keys[-1] is None
            keys[-1] = value
        else:
            add(value)
    assert not stack and len(result) == 1
    return result[0]


def ijson_events(data: bytes) -> list[tuple[str, str, object]]:
    # The pure-Python backend: yajl's overflows on integers past 64 bits.
    backend = ijson.get_backend("python")
    return list(backend.parse(io.BytesIO(data), use_float=True))


def refused(data: bytes, cuts: list[int], **bounds: int) -> bool:
    scanner = JsonEvents(**bounds)
    try:
        for start, end in zip([0, *cuts], [*cuts, len(data)], strict=True):
            scanner.feed(data[start:end])
        scanner.end()
    except JsonStreamError:
        return True
    return False


# Strings that need escapes (quotes, backslashes, control characters, `/`, characters past
# the BMP that ensure_ascii writes as surrogate pairs) far more often than plain text would.
texts = st.text(st.characters(codec="utf-8") | st.sampled_from('"\\/\b\f\n\r\t\x00\x1f\x7fé😀'))
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | texts
)
values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(texts, children, max_size=4),
    max_leaves=16,
)
# Upstream answers are objects; a bare top-level number has its own test below.
documents = st.lists(values, max_size=4) | st.dictionaries(texts, values, max_size=4)


@st.composite
def encoded(draw: st.DrawFn) -> bytes:
    """A document as some JSON writer might send it: ASCII or not, indented or not, with
    `/` escaped (as PHP and some Java writers do) or not, whitespace around it."""
    text = json.dumps(
        draw(documents),
        ensure_ascii=draw(st.booleans()),
        indent=draw(st.sampled_from([None, 1])),
    )
    if draw(st.booleans()):
        text = text.replace("/", "\\/")  # `/` only occurs inside strings
    around = st.sampled_from(["", " ", "\n", "\r\n\t "])
    return (draw(around) + text + draw(around)).encode()


@settings(max_examples=200, deadline=None)
@given(data=encoded(), cuts=st.lists(st.integers(0, 1 << 16), max_size=8))
def test_the_value_read_is_json_loads_whole_or_cut_anywhere(data: bytes, cuts: list[int]) -> None:
    expected = json.loads(data)
    whole = merged(feed_all(data))
    assert build(whole) == expected
    assert whole == ijson_events(data)
    cut = merged(feed_all(data, [c % (len(data) + 1) for c in cuts]))
    assert cut == whole
    assert merged(feed_all(data, list(range(len(data))))) == whole  # one byte a feed


def strict(value: Any) -> bool:
    """Whether RFC 8259 JSON can say `value`: json.loads also reads NaN and Infinity, and
    lone surrogates (escaped, or encoded as UTF-8), which are refused here."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, str):
        return not any(0xD800 <= ord(c) < 0xE000 for c in value)
    if isinstance(value, list):
        return all(strict(v) for v in value)
    if isinstance(value, dict):
        return all(strict(k) and strict(v) for k, v in value.items())
    return True


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A document with a few bytes replaced, put in or taken out: mostly not JSON."""
    data = bytearray(draw(encoded()))
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(data)))
        byte = draw(st.sampled_from(b'"\\/{}[],:. 0e-+tu\x00\x1f\xc3\xff') | st.integers(0, 255))
        how = draw(st.sampled_from(["put", "replace", "remove"]))
        if how == "put" or at == len(data):
            data.insert(at, byte)
        elif how == "replace":
            data[at] = byte
        else:
            del data[at]
    return bytes(data)


@settings(max_examples=200, deadline=None)
@given(data=mutated(), cuts=st.lists(st.integers(0, 1 << 16), max_size=4))
def test_broken_documents_are_refused_or_read_as_json_loads_reads_them(
    data: bytes, cuts: list[int]
) -> None:
    try:
        expected = json.loads(data)
    except ValueError:
        expected = REFUSED
    try:
        # A space after it changes no document's fate, and lets a bare number give its event.
        got = build(merged(feed_all(data + b" ", [c % (len(data) + 1) for c in cuts])))
    except JsonStreamError:
        got = REFUSED
    if got is REFUSED and expected is not REFUSED:
        # json.loads reads more than JSON: UTF-16 and UTF-32 too (when it sees NULs where
        # they would be), a byte order mark, and what strict() names.
        assert json.detect_encoding(data) != "utf-8" or not strict(expected)
    else:
        assert got == expected


@pytest.mark.parametrize(
    "data",
    [
        b'{"a": {"b": [1, {"c": "d"}, [true, null]], "e": 2.5}, "f": []}',
        b'[[], [[]], {}, [{"x": [0]}]]',
        b'{"": {"": [1, {"": 2}]}, "a.b": {"c": "dotted keys are joined as they are"}}',
        b'{"k\\u00e9y": "v\\u00e9\\ud83d\\ude00\\n", "esc": "\\"\\\\\\/\\b\\f\\r\\t"}',
    ],
)
def test_prefixes_are_ijsons(data: bytes) -> None:
    expected = list(ijson.parse(io.BytesIO(data), use_float=True))
    assert merged(feed_all(data)) == expected
    assert merged(feed_all(data, list(range(0, len(data), 3)))) == expected


@pytest.mark.parametrize(
    ("data", "value"),
    [
        (b'"x"', "x"),
        (b"true", True),  # a literal is whole once read
        (b"false", False),
        (b" null\n", None),
        (b"-1.5e3 ", -1500.0),  # a number is whole once whitespace ends it
        (b"12\n", 12),
    ],
)
def test_a_top_level_scalar_is_a_document(data: bytes, value: object) -> None:
    assert build(merged(feed_all(data))) == value


def test_a_bare_top_level_number_is_checked_at_end() -> None:
    # Nothing after `42` says it is whole, and `end` returns no events: it is only checked.
    scanner = JsonEvents()
    assert scanner.feed(b"42") == []
    assert not scanner.done
    scanner.end()
    assert scanner.done
    assert refused(b"4.", [])
    assert refused(b"4x", [])


def test_a_long_base64_string_passes_in_pieces_of_one_chunk_at_c_speed() -> None:
    image = base64.b64encode(bytes(range(256)) * (3 * 4096))  # 4 MiB of base64
    data = b'{"images": ["' + image + b'"]}'
    chunk = 64 * 1024
    scanner = JsonEvents()
    pieces: list[bytes] = []
    started = time.perf_counter()
    for start in range(0, len(data), chunk):
        for prefix, kind, value in scanner.feed(data[start : start + chunk]):
            if kind == "string":
                assert prefix == "images.item"
                assert isinstance(value, bytes)
                pieces.append(value)
    scanner.end()
    elapsed = time.perf_counter() - started
    assert b"".join(pieces) == image
    assert max(len(piece) for piece in pieces) <= chunk
    assert len(pieces) >= len(image) // chunk
    # It takes milliseconds (bytes.find runs at GB/s); a loop over the characters in Python
    # would take seconds. The bound is loose so that a loaded CI machine never fails it.
    assert elapsed < 5


# Documents that are not JSON, and that json.loads refuses too.
NOT_JSON = [
    b"",
    b" \n",
    b"{",
    b"[1,",
    b'{"a"',
    b'{"a":',
    b'{"a": 1',
    b'"abc',
    b'"\\',
    b'"\\u12',
    b'["\\ud83d',
    b"[1,]",
    b"[,1]",
    b"{,}",
    b'{"a": 1,}',
    b'{"a" 1}',
    b"{1: 2}",
    b"[1 2]",
    b"]",
    b"}",
    b"[}",
    b"{]",
    b'{"a": 1]',
    b"[01]",
    b"[1.]",
    b"[.5]",
    b"[-]",
    b"[1e]",
    b"[+1]",
    b"[1.5.2]",
    b"[0x10]",
    b"[tru]",
    b"[truex]",
    b"[nul]",
    b"[True]",
    b"[None]",
    b"['a']",
    b'["\\x"]',
    b'["\\u12g4"]',
    b'["\\U0041"]',
    b'["\\u 123"]',
    b'["a\x00b"]',
    b'["\n"]',
    b'["\x1f"]',
    b'{"a\tb": 1}',
    b"[] []",
    b"{}x",
    b"1 2",
    b'"a" "b"',
    b"[]]",
    b"[\xc3\xa9]",
    b'["\xff"]',
    b'["\xc3"]',
    b'["\xc3\\n"]',
    b'{"\xff": 1}',
    b"[" + b"1" * 5000 + b"]",  # more digits than int() takes
]
# Documents json.loads reads although they are not JSON (RFC 8259): refused here.
NOT_JSON_BUT_LOADED = [
    b"[NaN]",
    b"[Infinity]",
    b"[-Infinity]",
    b'["\\ud83d"]',
    b'["\\ude00"]',
    b'["\\ud83dx"]',
    b'["\\ud83d\\u0041"]',
    b'["\\ud83d\\n"]',
    b'["\xed\xa0\x80"]',  # a surrogate, encoded as UTF-8 (json.loads lets it pass)
]


@pytest.mark.parametrize("data", NOT_JSON + NOT_JSON_BUT_LOADED)
def test_what_is_not_one_json_document_is_refused(data: bytes) -> None:
    if data in NOT_JSON:
        with pytest.raises(ValueError):
            json.loads(data)
    else:
        json.loads(data)
    assert refused(data, [])
    assert refused(data, list(range(1, len(data))))


@pytest.mark.parametrize(
    ("data", "bounds"),
    [
        (b"[" * 65 + b"]" * 65, {}),
        (b'{"a": ' * 65 + b"1" + b"}" * 65, {}),
        (b"[[[1]]]", {"max_depth": 2}),
        (b'{"abcdefghi": 1}', {"max_token": 8}),
        (b'{"\\u00e9\\u00e9\\u00e9\\u00e9\\u00e9": 1}', {"max_token": 8}),  # 10 bytes decoded
        (b"[1234567890]", {"max_token": 8}),
    ],
)
def test_the_bounds_are_kept(data: bytes, bounds: dict[str, int]) -> None:
    assert refused(data, [], **bounds)
    assert refused(data, list(range(1, len(data))), **bounds)


def test_within_the_bounds_all_is_read() -> None:
    deep = b"[" * 64 + b"]" * 64
    assert build(merged(feed_all(deep))) == json.loads(deep)
    # max_token bounds keys and numbers, not string values.
    data = b'{"abcdefgh": ["a string value longer than max_token", 12345678]}'
    assert build(merged(feed_all(data, max_token=8))) == json.loads(data)


def test_after_an_error_every_call_raises() -> None:
    scanner = JsonEvents()
    with pytest.raises(JsonStreamError, match="at byte 3"):
        scanner.feed(b"[1,]")
    with pytest.raises(JsonStreamError):
        scanner.feed(b" ")
    with pytest.raises(JsonStreamError):
        scanner.end()


def test_a_gemini_answer() -> None:
    data = json.dumps(
        {
            "candidates": [
                {
                    "content": {
                        "parts": [
                            {"text": "Here it is."},
                            {"inlineData": {"mimeType": "image/png", "data": "iVBORw0KGgo="}},
                        ],
                        "role": "model",
                    },
                    "finishReason": "STOP",
                    "index": 0,
                }
            ],
            "usageMetadata": {"promptTokenCount": 9, "totalTokenCount": 1299},
        }
    ).encode()
    parts = "candidates.item.content.parts"
    assert merged(feed_all(data, list(range(0, len(data), 7)))) == [
        ("", "start_map", None),
        ("", "map_key", "candidates"),
        ("candidates", "start_array", None),
        ("candidates.item", "start_map", None),
        ("candidates.item", "map_key", "content"),
        ("candidates.item.content", "start_map", None),
        ("candidates.item.content", "map_key", "parts"),
        (parts, "start_array", None),
        (f"{parts}.item", "start_map", None),
        (f"{parts}.item", "map_key", "text"),
        (f"{parts}.item.text", "string", "Here it is."),
        (f"{parts}.item", "end_map", None),
        (f"{parts}.item", "start_map", None),
        (f"{parts}.item", "map_key", "inlineData"),
        (f"{parts}.item.inlineData", "start_map", None),
        (f"{parts}.item.inlineData", "map_key", "mimeType"),
        (f"{parts}.item.inlineData.mimeType", "string", "image/png"),
        (f"{parts}.item.inlineData", "map_key", "data"),
        (f"{parts}.item.inlineData.data", "string", "iVBORw0KGgo="),
        (f"{parts}.item.inlineData", "end_map", None),
        (f"{parts}.item", "end_map", None),
        (parts, "end_array", None),
        ("candidates.item.content", "map_key", "role"),
        ("candidates.item.content.role", "string", "model"),
        ("candidates.item.content", "end_map", None),
        ("candidates.item", "map_key", "finishReason"),
        ("candidates.item.finishReason", "string", "STOP"),
        ("candidates.item", "map_key", "index"),
        ("candidates.item.index", "number", 0),
        ("candidates.item", "end_map", None),
        ("candidates", "end_array", None),
        ("", "map_key", "usageMetadata"),
        ("usageMetadata", "start_map", None),
        ("usageMetadata", "map_key", "promptTokenCount"),
        ("usageMetadata.promptTokenCount", "number", 9),
        ("usageMetadata", "map_key", "totalTokenCount"),
        ("usageMetadata.totalTokenCount", "number", 1299),
        ("usageMetadata", "end_map", None),
        ("", "end_map", None),
    ]


def test_a_bedrock_answer() -> None:
    first, second = base64.b64encode(b"\x89PNG one" * 1000), base64.b64encode(b"\x89PNG two")
    data = b'{"images": ["' + first + b'", "' + second + b'"], "error": null}'
    events = feed_all(data, list(range(0, len(data), 1000)))
    # The first image comes in pieces as its bytes come (one per feed), each image ends.
    assert next(e for e in events if e[1] == "string") == ("images.item", "string", first[:987])
    assert merged(events) == [
        ("", "start_map", None),
        ("", "map_key", "images"),
        ("images", "start_array", None),
        ("images.item", "string", first.decode()),
        ("images.item", "string", second.decode()),
        ("images", "end_array", None),
        ("", "map_key", "error"),
        ("error", "null", None),
        ("", "end_map", None),
    ]
