"""Following a Server-Sent Events stream as it passes, without holding its data lines.

Image events carry `data:` lines of several megabytes, split by the upstream at any
byte. The relay only needs to know where events end and which ones are final, so the
scanner keeps the first bytes of each line (enough for `event:` and the JSON `type`)
and counts lengths for the rest.
"""

from __future__ import annotations

import re

from .usage import Tail, Usage, tokens_in

_TYPE = re.compile(rb'"type"\s*:\s*"([^"]*)"')
_HEAD = 128


class EventScanner:
    """Finds where the stream's final event ends.

    An event is final when its name (the `event:` field, else the `type` in its data)
    ends with `.completed`, after `finals` of them (one per image asked for), or when
    it is an `error` event.
    """

    def __init__(self, finals: int = 1) -> None:
        self.remaining = finals
        self._head = bytearray()  # the first _HEAD bytes of the line being read
        self._in_line = False  # some bytes of the current line have been seen
        self._cr = False  # the last chunk ended with CR: a leading LF belongs to it
        self._fields = False  # the current event has seen a field line
        self._name = b""
        self._type = b""
        self._line_tail = Tail()  # the last bytes of the line being read
        self._data_tail = b""  # ...of the current event's last data line
        self.completed = 0
        self.usage = Usage()  # added up over the completed events

    @property
    def done(self) -> bool:
        return self.remaining <= 0

    @property
    def at_boundary(self) -> bool:
        """True between events: a whole new event can be written here without mixing."""
        return not self._in_line and not self._fields

    def feed(self, chunk: bytes) -> int | None:
        """Scan `chunk`; return the offset just past the final event if it ends in it."""
        # bytes.find (memchr) rather than a regex: data lines are megabytes of base64, and
        # a regex alternation tried at every byte costs milliseconds per event.
        pos, size = 0, len(chunk)
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
            if self._end_line():
                return end
        self._take(chunk, pos, size)
        return None

    def _take(self, chunk: bytes, start: int, end: int) -> None:
        if start == end:
            return
        self._in_line = True
        room = _HEAD - len(self._head)
        if room > 0:
            self._head += chunk[start : min(end, start + room)]
        self._line_tail.feed(memoryview(chunk)[start:end])

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
        name = self._name or self._type
        data, self._data_tail = self._data_tail, b""
        self._fields, self._name, self._type = False, b"", b""
        if name == b"error":
            self.remaining = 0
        elif name.endswith(b".completed"):
            self.remaining -= 1
            self.completed += 1
            self.usage = self.usage + (tokens_in(data) or Usage())
        return self.done
