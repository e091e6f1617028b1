"""The parts of a multipart edit or variation: which fields are files and which the proxy
decides on, the limits on them, how one part is checked as it begins, and how it is written
in the body the upstream gets. `Upload` (`upload.py`) reads a body with these.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from python_multipart.multipart import parse_options_header

from .errors import ProxyError, gif_refusal

# The fields the proxy decides on (model, price, limits): a client that sends one of them
# after a file part that already went upstream is refused (see `Upload.head`).
DECIDING = frozenset({"model", "n", "stream", "partial_images", "size", "quality", "prompt"})
# Fields the proxy checks (ImageFormBody's): one copy each, or the upstream could act on a
# copy other than the one checked.
CHECKED = DECIDING | {"output_compression", "frame_count", "frame_duration_ms"}
# Fields that are files whatever their part says.
FILE_FIELDS = frozenset({"image", "image[]", "mask"})
MAX_TEXT_BYTES = 1024 * 1024  # all text fields together: a prompt is at most 32,000 characters
# Sixteen images, a mask and a few dozen fields are a large request; a flood of empty parts
# would make the proxy keep a list of them.
MAX_PARTS = 1000


@dataclass(slots=True)
class Part:
    """One part's name and what it says it holds, as sent (latin-1, so bytes round-trip)."""

    name: str
    filename: str | None
    content_type: str | None

    @property
    def is_file(self) -> bool:
        return self.filename is not None or self.name in FILE_FIELDS

    def head(self, boundary: bytes) -> bytes:
        """The part's opening lines in the body the proxy sends."""
        disposition = f'form-data; name="{_quoted(self.name)}"'
        if self.filename is not None:
            disposition += f'; filename="{_quoted(self.filename)}"'
        lines = [b"--" + boundary, b"Content-Disposition: " + disposition.encode("latin-1")]
        if self.content_type is not None:
            lines.append(b"Content-Type: " + self.content_type.encode("latin-1"))
        return b"\r\n".join(lines) + b"\r\n\r\n"


def _quoted(value: str) -> str:
    # As browsers and httpx do (WHATWG's multipart/form-data encoding): a name or filename
    # cannot close its quotes, or start a header line.
    return value.replace("\\", "\\\\").replace('"', "%22").replace("\r", "%0D").replace("\n", "%0A")


def invalid(message: str, param: str | None = None, code: str = "invalid_multipart") -> ProxyError:
    """A 400 for a multipart body the proxy will not send on."""
    return ProxyError(400, message, param=param, code=code)


def boundary_of(content_type: bytes) -> bytes:
    """The boundary of a `multipart/form-data` Content-Type; 415 for another media type."""
    media, options = parse_options_header(content_type)
    if media != b"multipart/form-data":
        raise ProxyError(
            415,
            "Content-Type must be multipart/form-data on image variations, and "
            "multipart/form-data or application/json on image edits.",
            code="unsupported_media_type",
        )
    boundary = options.get(b"boundary", b"")
    # RFC 2046: 1 to 70 characters, none of them a line break.
    if not 0 < len(boundary) <= 70 or b"\r" in boundary or b"\n" in boundary:
        raise invalid("The multipart/form-data Content-Type has no valid boundary.")
    return boundary


def part_of(headers: Mapping[bytes, bytes], number: int) -> Part:
    """The body's `number`th part, from its headers; 400 past `MAX_PARTS`, or without a
    name."""
    if number > MAX_PARTS:
        raise invalid(f"Too many parts: at most {MAX_PARTS}.", None, "too_many_parts")
    disposition, options = parse_options_header(headers.get(b"content-disposition", b""))
    name = options.get(b"name")
    if disposition != b"form-data" or not name:
        raise invalid(
            f"Part {number} of the multipart body has no name "
            '(Content-Disposition: form-data; name="...").',
            f"part {number}",
        )
    filename = options.get(b"filename")
    content_type = headers.get(b"content-type")
    return Part(
        name.decode("latin-1"),
        None if filename is None else filename.decode("latin-1"),
        None if content_type is None else content_type.decode("latin-1"),
    )


def check_file(part: Part, fields: Mapping[str, str], *, images: int, max_files: int) -> None:
    """Refuse a file part the request cannot take, the text `fields` and the `images` (file
    parts besides the mask) before it known: a file for a field the proxy decides on, a mask
    for a GIF, an image beyond `max_files`."""
    if part.name in DECIDING:
        raise invalid(
            f"Invalid value for '{part.name}': expected a text field, got a file.",
            part.name,
            "invalid_type",
        )
    if part.name == "mask" and fields.get("output_format", "").lower() == "gif":
        raise gif_refusal("mask", "GIFs are not made with a mask")
    if part.name != "mask" and images == max_files:
        raise invalid(
            f"Too many files: at most {max_files} images in one request.",
            part.name,
            "too_many_files",
        )


def add_field(fields: dict[str, str], name: str, raw: bytes) -> None:
    """Keep a text field in `fields` for the request's checks; it goes upstream as sent,
    whatever its bytes, but one the proxy decides on must be UTF-8, and a checked one come
    once."""
    if name in CHECKED and name in fields:
        raise invalid(
            f"'{name}' was sent more than once: send each parameter once.",
            name,
            "duplicate_field",
        )
    try:
        fields[name] = raw.decode()
    except UnicodeDecodeError:
        if name in DECIDING:
            raise invalid(f"Invalid value for '{name}': not UTF-8.", name) from None
