"""Following a Server-Sent Events stream as it passes, without holding its data lines.

Image events carry `data:` lines of several megabytes, split by the upstream at any
byte. The relay only needs to know where events end and which ones are final, so the
scanner keeps the first bytes of each line (enough for `event:` and the JSON `type`)
and counts lengths for the rest.

It also checks that each event is one the SDK can read: an event must have a `data:`
line whose value starts as a JSON object (anything else crashes the SDK's loop with a
decode error). Until the first bytes of that value are seen, the event's bytes are held
back (`hold`), so that a malformed event is never half sent and an `error` event can
take its place. Only those first bytes are checked: the rest of a data line is not parsed.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from .usage import Tail, Usage, tokens_in

_TYPE = re.compile(rb'"type"\s*:\s*"([^"]*)"')
_HEAD = 128
# An event's bytes held back before its data line shows up: more than this is malformed.
MAX_HELD = 64 * 1024


class EventScanner:
    """Finds where the stream's final event ends.

    An event is final when its name (the `event:` field, else the `type` in its data)
    ends with `.completed`, after `finals` of them (one per image asked for), or when
    it is an `error` event. `feed` returns what may be sent on; once `malformed` says why
    the stream is not one the SDK can read, nothing more is.
    """

    def __init__(self, finals: int = 1) -> None:
        self.remaining = finals
        self._head = bytearray()  # the first _HEAD bytes of the line being read
        self._in_line = False  # some bytes of the current line have been seen
        self._cr = False  # the last chunk ended with CR: a leading LF belongs to it
        self._fields = False  # the current event has seen a field line
        self._open = False  # an event has started (a line other than a comment)
        self._verified = True  # the current event's data was seen to start as JSON
        self._held = b""  # the current event's bytes, while it is not verified
        self._hold: int | None = None  # where, in the chunk being read, they start
        self.malformed: str | None = None
        self._name = b""
        self._type = b""
        self._line_tail = Tail()  # the last bytes of the line being read
        self._data_tail = b""  # ...of the current event's last data line
        self.completed = 0
        self.usage = Usage()  # added up over the completed events
        self.on_event: Callable[[bytes], None] | None = None  # told each event's name

    @property
    def done(self) -> bool:
        return self.remaining <= 0

    @property
    def at_boundary(self) -> bool:
        """True when what was let through ends between events: a whole new event can be
        written after it without mixing (an event still held back was not let through)."""
        return (not self._in_line and not self._fields) or not self._verified

    def feed(self, chunk: bytes) -> bytes:
        """Scan `chunk`; return the bytes that may go to the client now.

        That is everything up to the end of the final event once it is found (`done`),
        and never a byte of an event not yet known to be well formed, nor of a bad one.
        """
        if self.malformed or self.done:
            return b""
        end = self._scan(chunk)
        held, hold = self._held, self._hold
        if end is not None:
            self._held = b""
            return held + chunk[:end]
        if self.malformed:
            self._held = b""
            return held + chunk[:hold] if hold else b""  # the events before the bad one
        if hold is None:
            self._held = b""
            return held + chunk
        if hold == 0:
            self._held = held + chunk
            if len(self._held) > MAX_HELD:
                self.malformed = f"an event with no data in its first {MAX_HELD} bytes"
                self._held = b""
            return b""
        self._held = chunk[hold:]
        return held + chunk[:hold]

    def _scan(self, chunk: bytes) -> int | None:
        """Read `chunk`; return the offset just past the final event if it ends in it."""
        # bytes.find (memchr) rather than a regex: data lines are megabytes of base64, and
        # a regex alternation tried at every byte costs milliseconds per event.
        pos, size = 0, len(chunk)
        self._hold = None if self._verified else 0
        if self._cr:
            self._cr = False
            if chunk[:1] == b"\n":
                pos = 1
        cr = chunk.find(b"\r", pos)
        while pos < size:
            lf = chunk.find(b"\n", pos)
            if cr != -1 and cr < pos:
                cr = chunk.find(b"\r", pos)
            if cr != -1 and (lf == -1 or cr < lf):
                start = cr
                end = cr + 2 if chunk[cr + 1 : cr + 2] == b"\n" else cr + 1
                self._cr = end == size and end == cr + 1  # CR last: a LF may follow
            elif lf != -1:
                start, end = lf, lf + 1
            else:
                break
            self._take(chunk, pos, start)
            pos = end
            if self._end_line() or self.malformed:
                return None if self.malformed else end
        self._take(chunk, pos, size)
        return None

    def _take(self, chunk: bytes, start: int, end: int) -> None:
        if start == end or self.malformed:
            return
        if not self._in_line and not self._open and chunk[start] != 0x3A:  # not ":"
            self._open, self._verified, self._hold = True, False, start
        self._in_line = True
        room = _HEAD - len(self._head)
        if room > 0:
            self._head += chunk[start : min(end, start + room)]
            if not self._verified:
                self._verify()
        self._line_tail.feed(memoryview(chunk)[start:end])

    def _verify(self) -> None:
        head = self._head
        if not head.startswith(b"data:"):
            return
        value = 6 if head[5:6] == b" " else 5
        if len(head) > value:
            if head[value] == 0x7B:  # "{"
                self._verified, self._hold = True, None
            else:
                self.malformed = "an event whose data is not a JSON object"

    def _end_line(self) -> bool:
        line, had_line = bytes(self._head), self._in_line
        tail, self._line_tail.data = self._line_tail.data, b""
        self._head.clear()
        self._in_line = False
        if not had_line:
            return self._dispatch()
        if line.startswith(b":"):
            return False  # a comment, e.g. a keep-alive ping
        self._fields = True
        if line.startswith(b"event:"):
            self._name = line[6:].strip()
        elif line.startswith(b"data:"):
            self._data_tail = tail
            found = None if self._type else _TYPE.search(line)
            if found:
                self._type = found.group(1)
        return False

    def _dispatch(self) -> bool:
        if not self._fields:
            return False
        if not self._verified:
            self.malformed = "an event without a JSON data line"
            return False
        self._open = False
        name = self._name or self._type
        data, self._data_tail = self._data_tail, b""
        self._fields, self._name, self._type = False, b"", b""
        if self.on_event is not None:
            self.on_event(name)
        if name == b"error":
            self.remaining = 0
        elif name.endswith(b".completed"):
            self.remaining -= 1
            self.completed += 1
            self.usage = self.usage + (tokens_in(data) or Usage())
        return self.done
