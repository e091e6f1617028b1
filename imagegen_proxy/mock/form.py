"""Reading a multipart/form-data body (image edits and variations) as it arrives.

python-multipart's push parser is fed each ASGI body chunk as it comes; the mock keeps the
parts in memory (the total body is capped), text fields as strings and files as bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from ..types import Receive, Scope
from ..wire.errors import ProxyError
from ..wire.parts import boundary_of
from ..wire.request import header, read_body

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

# Fields that are files whatever their part says: some clients send them without a filename.
FILE_FIELDS = frozenset({"image", "image[]", "mask"})
# Sixteen images, a mask and a dozen text fields fit easily; a flood of tiny parts does not.
MAX_PARTS = 100


@dataclass(slots=True)
class Form:
    """The parts of a form: text fields by name (the last one sent wins) and the files sent
    under each name, in order."""

    fields: dict[str, str] = field(default_factory=dict)
    files: dict[str, list[bytes]] = field(default_factory=dict)


async def read_form(scope: Scope, receive: Receive, limit: int) -> Form:
    """Read and parse the request's multipart body; ProxyError for a body that is not
    multipart/form-data (415), larger than `limit` bytes (413), malformed or cut short (400);
    ClientGone if the client leaves first. The mock may hold it: its size is capped."""
    reader = _Reader(boundary_of(header(scope, b"content-type") or b""))
    reader.feed(await read_body(scope, receive, limit))
    return reader.finish()


class _Reader:
    """Collects the parts as the parser reports them."""

    def __init__(self, boundary: bytes) -> None:
        self.form = Form()
        self.ended = False
        self._parts = 0
        self._headers: dict[str, bytes] = {}
        self._name = b""
        self._value = b""
        self._data: list[bytes] = []
        callbacks: MultipartCallbacks = {
            "on_part_begin": self._begin,
            "on_header_field": self._header_field,
            "on_header_value": self._header_value,
            "on_header_end": self._header_end,
            "on_part_data": self._part_data,
            "on_part_end": self._end,
            "on_end": self._finished,
        }
        self._parser = MultipartParser(boundary, callbacks)

    def feed(self, chunk: bytes) -> None:
        try:
            self._parser.write(chunk)
        except MultipartParseError as exc:
            raise _malformed(str(exc).rstrip(".")) from None

    def finish(self) -> Form:
        if not self.ended:
            raise _malformed("the body ended before the closing boundary")
        return self.form

    def _begin(self) -> None:
        self._parts += 1
        if self._parts > MAX_PARTS:
            raise _malformed(f"more than {MAX_PARTS} parts")
        self._headers = {}
        self._data = []

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._name += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._name.decode("latin-1").lower()] = self._value
        self._name = self._value = b""

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        self._data.append(data[start:end])

    def _end(self) -> None:
        kind, options = parse_options_header(self._headers.get("content-disposition"))
        if kind != b"form-data" or b"name" not in options:
            raise _malformed("a part has no Content-Disposition: form-data header with a name")
        name = options[b"name"].decode("utf-8", "replace")
        data = b"".join(self._data)
        if b"filename" in options or name in FILE_FIELDS:
            self.form.files.setdefault(name, []).append(data)
            return
        try:
            self.form.fields[name] = data.decode()
        except UnicodeDecodeError:
            raise ProxyError(
                400, f"Invalid '{name}': not UTF-8 text.", param=name, code="invalid_value"
            ) from None

    def _finished(self) -> None:
        self.ended = True


def _malformed(reason: str) -> ProxyError:
    return ProxyError(
        400,
        f"We could not parse the multipart/form-data body of your request: {reason}.",
        code="invalid_multipart_body",
    )
