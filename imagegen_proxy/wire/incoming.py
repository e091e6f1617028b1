"""The body of an edit or variation: opened from its headers (multipart, or JSON for an
edit), then read until the fields that decide the request are known."""

from __future__ import annotations

from ..types import Receive, Scope
from .errors import too_large
from .json_upload import Incoming, JsonUpload
from .parts import boundary_of
from .request import ImageRequest, header, is_json, parse_form, parse_json_edit
from .routing import ImageOperation, Route
from .upload import Upload


def open_upload(
    scope: Scope,
    receive: Receive,
    operation: ImageOperation,
    *,
    max_bytes: int,
    max_files: int,
    within: float,
) -> Incoming:
    """The upload, refused from its headers if it can be: neither multipart nor (for an
    edit) JSON (415), or declaring more than `max_bytes` (413). `within`: seconds each
    piece of the body may take."""
    content_type = header(scope, b"content-type") or b""
    json_edit = operation == "edit" and is_json(content_type)
    boundary = b"" if json_edit else boundary_of(content_type)
    declared = header(scope, b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise too_large(max_bytes)
    if json_edit:
        return JsonUpload(receive, max_bytes=max_bytes, within=within)
    return Upload(receive, boundary, max_bytes=max_bytes, max_files=max_files, within=within)


async def read_upload(route: Route, upload: Incoming) -> ImageRequest:
    """Read an upload until the fields that decide the request are known: the model (the
    Azure form has it in the path) and, for an edit, the prompt. A JSON edit is read to its
    end (its images to disk)."""
    if isinstance(upload, JsonUpload):
        return parse_json_edit(route, await upload.read(), upload)
    needed = {"model"} if route.form == "openai" else set()
    if route.operation == "edit":
        needed.add("prompt")
    fields = await upload.head(needed)
    # Until the body has been read to its end, more images may follow.
    images = upload.images if upload.done.is_set() else upload.max_files
    return parse_form(route, fields, images)
