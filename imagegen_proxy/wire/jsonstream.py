"""Reading a JSON answer as it arrives, without holding its long strings.

Some upstreams answer with one JSON document that carries megabytes of base64 inside
strings (Gemini's `candidates[].content.parts[].inlineData.data`, Bedrock's `images[]`).
`JsonEvents` turns the bytes into ijson-style events as they come, and hands the value of
a string on in pieces, one per `feed` at most, so that a relay can pass an image on (or
count it) while it holds no more than one chunk of it.

Inside a string the scan is done by `bytes.find` and `bytes.translate`, which run at C
speed: Python code runs once per escape and once per chunk, never once per character of
the string. Only the structure between strings (brackets, keys, numbers, whitespace) is
read a byte at a time, and that part of these answers is small.
"""

from __future__ import annotations

import codecs
import re

Event = tuple[str, str, object]
"""(prefix, kind, value): the dotted path of map keys (`item` for an array's elements),
what was read (`start_map`, `map_key`, `string`, `string_end`, `number`, ...) and its value."""


class JsonStreamError(ValueError):
    """The bytes are not one JSON document (or break a bound)."""


# What is expected next, outside a string or a number.
_VALUE = 0  # a value (at the top, after `:` or after `,` in an array)
_FIRST = 1  # a value or `]`: just after `[`
_FIRST_KEY = 2  # a key or `}`: just after `{`
_KEY = 3  # a key: after `,` in a map
_COLON = 4
_AFTER = 5  # `,` or the container's closing bracket, after one of its values
_DONE = 6  # the document is whole: only whitespace may follow
# Reading a token.
_STRING = 7  # a string value: its pieces go out as they are read
_KEY_STRING = 8  # a map key: gathered whole, within max_token
_TOKEN = 9  # a number or a literal: gathered whole, within max_token

_WS = re.compile(rb"[ \t\n\r]+")
_WS_BYTES = frozenset(b" \t\n\r")
_TOKEN_START = frozenset(b"-0123456789tfn")
_TOKEN_CHARS = re.compile(rb"[0-9A-Za-z.+\-]*")  # what a number or a literal is made of
_NUMBER = re.compile(rb"-?(?:0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?")
_LITERALS: dict[bytes, tuple[str, object]] = {
    b"true": ("boolean", True),
    b"false": ("boolean", False),
    b"null": ("null", None),
}
_HEX4 = re.compile(rb"[0-9A-Fa-f]{4}")
_HEX_START = re.compile(rb"[0-9A-Fa-f]{0,3}")  # the start of a cut-off `\uXXXX`
_LOW_START = re.compile(rb"(?:\\(?:u[0-9A-Fa-f]{0,3})?)?")  # ...of the `\uXXXX` that must follow
_SIMPLE_ESCAPES = {
    ord('"'): b'"',
    ord("\\"): b"\\",
    ord("/"): b"/",
    ord("b"): b"\b",
    ord("f"): b"\f",
    ord("n"): b"\n",
    ord("r"): b"\r",
    ord("t"): b"\t",
}
_CONTROL = bytes(range(0x20))  # not allowed raw inside a string
_QUOTE = ord('"')
_U = ord("u")


class JsonEvents:
    """Incremental JSON tokenizer: feed it bytes as they arrive, get events.

    `feed` takes the next bytes, cut anywhere, and returns the events they complete.
    Map keys, numbers and literals come whole (each within `max_token` bytes); a string
    value comes as `string` events, each a non-empty piece of its UTF-8 bytes with the
    escapes resolved, then one `string_end`. A piece holds what one `feed` read (an
    escape cut across two feeds can add up to three bytes to it), so a string of any
    length passes through without being held.

    Whatever is not JSON (or nests deeper than `max_depth`) raises `JsonStreamError`, and
    so does every call after that. `end` says the input is over and checks that exactly
    one document came.
    """

    def __init__(self, *, max_token: int = 65536, max_depth: int = 64) -> None:
        self._max_token = max_token
        self._max_depth = max_depth
        self._state = _VALUE
        self._maps: list[bool] = []  # per open container, innermost last: is it a map
        self._prefixes: list[str] = []  # ...and its prefix
        self._prefix = ""  # the prefix of the next value
        self._parts: list[bytes] = []  # the string read in this feed (a key: so far)
        self._key_size = 0  # the bytes in _parts, while reading a key
        self._carry = b""  # an escape cut off by the end of the last feed
        self._token = bytearray()  # the number or literal read so far
        self._utf8 = codecs.getincrementaldecoder("utf-8")()  # checks non-ASCII strings
        self._utf8_pending = False  # a multibyte character is cut off by the last feed
        self._seen = 0  # the bytes before this feed's, for the offsets in error messages
        self._error: str | None = None

    @property
    def done(self) -> bool:
        """One complete top-level value has been read (a bare top-level number only
        once something ends it: whitespace, or `end`)."""
        return self._state == _DONE

    def feed(self, data: bytes) -> list[Event]:
        """The events completed by the next bytes of the document."""
        if self._error is not None:
            raise JsonStreamError(self._error)
        if type(data) is not bytes:
            data = bytes(data)
        if self._carry:
            # Rare (an escape cut by a chunk's end) and short: joining is simplest.
            data = self._carry + data
            self._seen -= len(self._carry)
            self._carry = b""
        events: list[Event] = []
        try:
            self._run(data, events)
        except JsonStreamError as exc:
            self._error = str(exc)
            raise
        self._seen += len(data)
        return events

    def end(self) -> None:
        """The input is over: raises unless exactly one whole document was fed.

        A bare top-level number (`42`) has nothing after it to say it is whole, so it is
        checked here; its event, having no call left to return it, is not given."""
        if self._error is not None:
            raise JsonStreamError(self._error)
        try:
            if self._state == _TOKEN and not self._maps:
                self._end_token([], 0)
            if self._state != _DONE:
                what = "empty" if self._state == _VALUE and not self._maps else "cut short"
                raise JsonStreamError(f"the JSON document is {what}")
        except JsonStreamError as exc:
            self._error = str(exc)
            raise

    def _fail(self, message: str, at: int) -> JsonStreamError:
        return JsonStreamError(f"{message} at byte {self._seen + at}")

    def _run(self, data: bytes, events: list[Event]) -> None:
        i = 0
        n = len(data)
        while i < n:
            state = self._state
            if state in (_STRING, _KEY_STRING):
                i = self._string(data, i, events)
            elif state == _TOKEN:
                m = _TOKEN_CHARS.match(data, i)
                assert m is not None  # the pattern matches the empty string
                j = m.end()
                if len(self._token) + j - i > self._max_token:
                    raise self._fail("a number or literal longer than max_token", i)
                self._token += data[i:j]
                # A literal is whole once read (more letters would make it no literal);
                # a number only once a byte that is no part of it follows.
                if j < n or (self._token[0] > 0x40 and bytes(self._token) in _LITERALS):
                    self._end_token(events, j)
                i = j
            elif data[i] in _WS_BYTES:
                m = _WS.match(data, i)
                assert m is not None
                i = m.end()
            else:
                i = self._structure(data, i, events)
        if self._state == _STRING and self._parts:
            self._flush(events)

    def _structure(self, data: bytes, i: int, events: list[Event]) -> int:
        """Reads the byte at `i`, outside any token; returns where to go on."""
        c = data[i]
        state = self._state
        if state in (_VALUE, _FIRST):
            if c == _QUOTE:
                self._state = _STRING
            elif c == 0x7B:  # {
                self._open(True, events, i)
                self._state = _FIRST_KEY
            elif c == 0x5B:  # [
                self._open(False, events, i)
                self._state = _FIRST
            elif c in _TOKEN_START:
                self._state = _TOKEN
                return i  # the token's first byte is read with the rest
            elif c == 0x5D and state == _FIRST:  # ]
                self._close(events)
            else:
                raise self._fail(f"unexpected {chr(c)!r}, a value was expected", i)
        elif state in (_FIRST_KEY, _KEY):
            if c == _QUOTE:
                self._state = _KEY_STRING
                self._key_size = 0
            elif c == 0x7D and state == _FIRST_KEY:  # }
                self._close(events)
            else:
                raise self._fail(f"unexpected {chr(c)!r}, a key was expected", i)
        elif state == _COLON:
            if c != 0x3A:  # :
                raise self._fail(f"unexpected {chr(c)!r}, ':' was expected", i)
            self._state = _VALUE
        elif state == _AFTER:
            in_map = self._maps[-1]
            if c == 0x2C:  # ,
                self._state = _KEY if in_map else _VALUE
            elif c == (0x7D if in_map else 0x5D):
                self._close(events)
            else:
                expected = "',' or '}'" if in_map else "',' or ']'"
                raise self._fail(f"unexpected {chr(c)!r}, {expected} was expected", i)
        else:  # _DONE
            raise self._fail("data after the JSON document", i)
        return i + 1

    def _open(self, is_map: bool, events: list[Event], at: int) -> None:
        if len(self._maps) >= self._max_depth:
            raise self._fail("nested deeper than max_depth", at)
        prefix = self._prefix
        events.append((prefix, "start_map" if is_map else "start_array", None))
        self._maps.append(is_map)
        self._prefixes.append(prefix)
        if not is_map:
            self._prefix = f"{prefix}.item" if len(self._maps) > 1 else "item"

    def _close(self, events: list[Event]) -> None:
        is_map = self._maps.pop()
        prefix = self._prefixes.pop()
        events.append((prefix, "end_map" if is_map else "end_array", None))
        self._prefix = prefix
        self._state = _AFTER if self._maps else _DONE

    def _string(self, data: bytes, i: int, events: list[Event]) -> int:
        """Reads a string's content from `i`, up to its closing quote or the end of the
        data; returns where to go on."""
        n = len(data)
        quote = data.find(b'"', i)
        while True:
            if 0 <= quote < i:  # an escaped quote was the one found
                quote = data.find(b'"', i)
            end = n if quote < 0 else quote
            backslash = data.find(b"\\", i, end)
            stop = end if backslash < 0 else backslash
            if stop > i:
                piece = data[i:stop]
                if len(piece.translate(None, _CONTROL)) != len(piece):
                    at = i + next(k for k, b in enumerate(piece) if b < 0x20)
                    raise self._fail("a control character inside a string", at)
                if self._utf8_pending or not piece.isascii():
                    self._check_utf8(piece, stop < n, i)
                self._take(piece, i)
            elif self._utf8_pending and stop < n:
                self._check_utf8(b"", True, i)
            if backslash >= 0:
                i = self._escape(data, backslash)
                if i >= n:
                    return n
            elif quote < 0:
                return n
            else:
                self._end_string(events)
                return quote + 1

    def _check_utf8(self, piece: bytes, final: bool, at: int) -> None:
        """Raises unless `piece` goes on the string's UTF-8 so far; `final`: nothing raw
        follows it (an escape or the closing quote does), so no character may be cut."""
        try:
            self._utf8.decode(piece, final)
        except UnicodeDecodeError:
            raise self._fail("invalid UTF-8 inside a string", at) from None
        self._utf8_pending = not final and bool(self._utf8.getstate()[0])

    def _take(self, piece: bytes, at: int) -> None:
        self._parts.append(piece)
        if self._state == _KEY_STRING:
            self._key_size += len(piece)
            if self._key_size > self._max_token:
                raise self._fail("a key longer than max_token", at)

    def _escape(self, data: bytes, j: int) -> int:
        """Resolves the escape whose backslash is at `j`; returns where it ends, or the
        end of the data when the data ends before it does (it is read again, whole, with
        the next feed)."""
        n = len(data)
        if j + 1 >= n:
            return self._cut(data, j)
        c = data[j + 1]
        if c != _U:
            out = _SIMPLE_ESCAPES.get(c)
            if out is None:
                raise self._fail(f"a bad escape \\{chr(c)!r} inside a string", j)
            self._take(out, j)
            return j + 2
        if j + 6 > n:
            if not _HEX_START.fullmatch(data, j + 2, n):
                raise self._fail("a bad \\u escape inside a string", j)
            return self._cut(data, j)
        if not _HEX4.fullmatch(data, j + 2, j + 6):
            raise self._fail("a bad \\u escape inside a string", j)
        code = int(data[j + 2 : j + 6], 16)
        if 0xDC00 <= code < 0xE000:
            raise self._fail("a lone surrogate escape inside a string", j)
        if code < 0xD800 or code >= 0xE000:
            self._take(chr(code).encode(), j)
            return j + 6
        # A high surrogate: the low one must follow, and the two make one character.
        if j + 12 > n:
            if not _LOW_START.fullmatch(data, j + 6, n):
                raise self._fail("a lone surrogate escape inside a string", j)
            return self._cut(data, j)
        if data[j + 6 : j + 8] != b"\\u" or not _HEX4.fullmatch(data, j + 8, j + 12):
            raise self._fail("a lone surrogate escape inside a string", j)
        low = int(data[j + 8 : j + 12], 16)
        if not 0xDC00 <= low < 0xE000:
            raise self._fail("a lone surrogate escape inside a string", j)
        code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00)
        self._take(chr(code).encode(), j)
        return j + 12

    def _cut(self, data: bytes, j: int) -> int:
        self._carry = data[j:]
        return len(data)

    def _flush(self, events: list[Event]) -> None:
        parts = self._parts
        piece = parts[0] if len(parts) == 1 else b"".join(parts)
        parts.clear()
        events.append((self._prefix, "string", piece))

    def _end_string(self, events: list[Event]) -> None:
        if self._state == _STRING:
            if self._parts:
                self._flush(events)
            events.append((self._prefix, "string_end", None))
            self._state = _AFTER if self._maps else _DONE
            return
        key = b"".join(self._parts).decode()  # valid: checked as it was read
        self._parts.clear()
        prefix = self._prefixes[-1]
        events.append((prefix, "map_key", key))
        self._prefix = f"{prefix}.{key}" if len(self._maps) > 1 else key
        self._state = _COLON

    def _end_token(self, events: list[Event], at: int) -> None:
        token = bytes(self._token)
        self._token.clear()
        literal = _LITERALS.get(token)
        if literal is not None:
            kind, value = literal
        else:
            m = _NUMBER.fullmatch(token)
            if m is None:
                raise self._fail(f"{token[:20]!r} is not a number or a literal", at)
            kind = "number"
            try:
                value = float(token) if m.lastindex else int(token)
            except ValueError:  # more digits than int() takes (sys.get_int_max_str_digits)
                raise self._fail("a number with too many digits", at) from None
        events.append((self._prefix, kind, value))
        self._state = _AFTER if self._maps else _DONE
