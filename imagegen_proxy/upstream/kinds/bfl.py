"""Black Forest Labs' FLUX API (`kind = "bfl"`): a task is submitted (`POST /v1/{model}`,
`x-key`), polled at the `polling_url` its receipt names until it is ready, and its image
fetched from the signed URL the result names, without the key.

From the receipt on, the task is the provider's: whatever happens next (a moderated
result, a failed task, a client that left) is billed, and no other upstream is tried. The
polling and result URLs come from the answers, so they are followed only on `base_url`'s
own origin or on a host of `result_hosts`. FLUX makes one image per task: `n` images are
`n` tasks side by side. Edits (FLUX.1 Kontext, FLUX.2) send the input images base64 in
the task's JSON, read back from the upload's spool. The mapping of OpenAI's parameters is
the table in docs/providers.md.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import httpx

from ...config import BflMember
from ...wire.request import ImageEditBody, ImageRequest
from ...wire.upload import Spooled, Upload
from ..call import Answer, Call, Content, SendUpstream, TextHeaders
from ..translated import (
    Base64Pieces,
    ImageDone,
    Pieces,
    ProviderError,
    content_policy,
    refused,
    translate,
)
from .base import Job, Located
from .provider import (
    ProviderKind,
    base64_of,
    check_common,
    dimensions,
    edit_images,
    failed,
    loads,
    ratio,
    read_small,
    unsupported,
)

NAME = "FLUX"
FORMATS = ("png", "jpeg")
# The ratios of the models sized by `aspect_ratio` (FLUX1.1 [pro] Ultra, Kontext).
RATIOS = {
    "1:1": (1, 1),
    "4:3": (4, 3),
    "3:4": (3, 4),
    "16:9": (16, 9),
    "9:16": (9, 16),
    "3:2": (3, 2),
    "2:3": (2, 3),
    "21:9": (21, 9),
    "9:21": (9, 21),
}
# FLUX.1 models sized by `width` and `height`: each side within 256-1440, a multiple of 32.
PIXEL_SIZED = frozenset({"flux-pro-1.1", "flux-pro", "flux-dev"})
FLUX1_SIDES, FLUX1_STEP = (256, 1440), 32
# FLUX.2: sides multiples of 16, at least 64, at most 4 MP (2048x2048) in all.
FLUX2_STEP, FLUX2_SIDE, FLUX2_PIXELS = 16, 64, 2048 * 2048
# The models that edit: an input image (`input_image`, then `input_image_2`...) and a prompt.
EDITING = ("flux-kontext-", "flux-2-")
KONTEXT_INPUTS, FLUX2_INPUTS = 4, 8
_MODERATED = frozenset({"Request Moderated", "Content Moderated"})
_FAILED = frozenset({"Task not found", "Error", "Failed"})
_DEFAULT_PORTS = {"http": 80, "https": 443}


def size_fields(model: str, size: str | None) -> dict[str, Any]:
    """The size fields of `model`'s request for `size` (none: FLUX's default); a 400 naming
    `size` when the model cannot make it as asked."""
    if size is None or size == "auto":
        return {}
    if model.startswith("flux-2-"):
        width, height = dimensions(size)
        if (
            width % FLUX2_STEP
            or height % FLUX2_STEP
            or min(width, height) < FLUX2_SIDE
            or width * height > FLUX2_PIXELS
        ):
            raise unsupported(
                "size",
                f"{model} makes sides that are multiples of {FLUX2_STEP}, at least "
                f"{FLUX2_SIDE}, and at most 4 megapixels (2048x2048) in all: not {size!r}.",
            )
        return {"width": width, "height": height}
    if model.endswith("-ultra") or model.startswith("flux-kontext"):
        return {"aspect_ratio": ratio(size, RATIOS)}
    if model in PIXEL_SIZED:
        width, height = dimensions(size)
        least, most = FLUX1_SIDES
        if any(side % FLUX1_STEP or not least <= side <= most for side in (width, height)):
            raise unsupported(
                "size",
                f"{model} makes sides from {least} to {most} pixels, multiples of "
                f"{FLUX1_STEP}: not {size!r}.",
            )
        return {"width": width, "height": height}
    raise unsupported(
        "size", f"The gateway knows no sizes of {model}: omit size to get its default."
    )


class Bfl(ProviderKind):
    """Black Forest Labs' API at `base_url` (the global, EU or US cluster)."""

    name = NAME
    system = "black_forest_labs"
    operations = ("generation", "edit")

    def __init__(self, member: BflMember) -> None:
        super().__init__(member)
        self.poll_interval = member.poll_interval
        self.poll_max_interval = member.poll_max_interval
        base = urlsplit(member.base_url)
        self._origin = _origin(base.scheme, base.hostname, base.port)
        self._schemes = {"https", base.scheme}  # http only for a base_url that is http
        self._hosts = [host.lower() for host in member.result_hosts]

    def credentials(self, key: str | None) -> TextHeaders:
        return [] if key is None else [("x-key", key)]

    def check(self, request: ImageRequest) -> None:
        check_common(request, NAME, formats=FORMATS)
        if request.operation == "edit":
            model = self.model_for(request)
            if not model.startswith(EDITING):
                raise unsupported(
                    "model",
                    f"{NAME} edits with FLUX.1 Kontext or FLUX.2 models ({', '.join(EDITING)}"
                    f"...), not {model}.",
                )
            if isinstance(request.body, ImageEditBody):
                raise unsupported(
                    "images",
                    f"{NAME} edits take the images as files (multipart), not by URL or file id.",
                )
        if request.quality not in (None, "auto"):
            raise unsupported(
                "quality", f"{NAME} has no quality setting: omit quality or set it to auto."
            )
        size_fields(self.model_for(request), request.size)

    def locate(self, request: ImageRequest, pooled: bool) -> Located:
        model = self.model_for(request)
        return Located(f"{self.base_url}/v1/{self.quoted(model)}", model)

    def body(self, request: ImageRequest, model: str) -> bytes:
        """The task's JSON: the prompt, and only the fields the client asked for."""
        task: dict[str, Any] = {"prompt": request.prompt, **size_fields(model, request.size)}
        if request.body.output_format is not None:
            task["output_format"] = request.body.output_format
        return json.dumps(task).encode()

    async def exchange(self, job: Job, send: SendUpstream) -> Answer:
        request, upload = job.request, job.upload
        files: list[tuple[str, Spooled]] = []
        if isinstance(upload, Upload):
            most = FLUX2_INPUTS if job.model.startswith("flux-2-") else KONTEXT_INPUTS
            try:
                files = await edit_images(upload, NAME, max_images=most, stored=request.stored)
            except ProviderError as error:
                return refused(error)
        url = self.locate(request, True).url
        headers = [*job.headers, ("content-type", "application/json")]

        def shot() -> Pieces:
            task = self.body(request, job.model)
            content: Content = task
            if files:
                assert isinstance(upload, Upload)
                content = _with_images(task, upload, files)
            return self._task(job, send, Call(url, headers, content, job.timeouts))

        return await translate(request, shot, request.images)

    async def _task(self, job: Job, send: SendUpstream, submit: Call) -> Pieces:
        """One task: submitted, polled until ready, its image's base64 pieces as they are
        downloaded."""
        answer = await send(submit)
        try:
            data = await read_small(answer)
            if not 200 <= answer.status < 300:
                raise bfl_error(answer, data)
        finally:
            await answer.aclose()
        receipt = loads(data)
        polling = receipt.get("polling_url") if isinstance(receipt, dict) else None
        sample = await self._result(job, send, self._followed(polling, "polling URL"))
        # A signed URL, on a host of its own: the key never goes there.
        headers = [(name, value) for name, value in job.headers if name != "x-key"]
        download = Call(self._followed(sample, "result URL"), headers, b"", job.timeouts, "GET")
        async for piece in _image(send, download):
            yield piece

    async def _result(self, job: Job, send: SendUpstream, url: str) -> object:
        """Poll the task at `url` until it is ready; its `result.sample`. Pending (or any
        state not known to be final), a 429, a 5xx and a failed connection poll again, for
        as long as the relay's `total_timeout` lets the exchange run."""
        poll = Call(url, job.headers, b"", job.timeouts, "GET")
        wait = self.poll_interval
        while True:
            await asyncio.sleep(wait)
            wait = min(wait * 1.5, self.poll_max_interval)
            try:
                answer = await send(poll)
                try:
                    data = await read_small(answer)
                finally:
                    await answer.aclose()
            except httpx.HTTPError:
                continue
            if answer.status == 429 or answer.status >= 500:
                continue
            if not 200 <= answer.status < 300:
                raise _lost(f"{NAME} refused to say how the task went (status {answer.status}).")
            found = loads(data)
            state = found.get("status") if isinstance(found, dict) else None
            if not isinstance(state, str):
                raise _lost(f"{NAME} answered a poll without the task's status.")
            if state == "Ready":
                result = found.get("result")
                return result.get("sample") if isinstance(result, dict) else None
            if state in _MODERATED:
                said = _said(found)
                raise content_policy(f"{NAME} refused the request: {state}{said}.", billed=True)
            if state in _FAILED:
                raise _lost(f"{NAME}'s task ended without an image: {state}{_said(found)}.")

    def may_follow(self, url: str) -> bool:
        """Whether a URL an answer names may be followed: https (http too when `base_url`
        is), on `base_url`'s own origin, or on a host of `result_hosts` (exactly, or "*."
        and any subdomain) at its scheme's port; never with credentials in it."""
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            return False
        host, scheme = parts.hostname, parts.scheme
        if scheme not in self._schemes or host is None or parts.username is not None:
            return False
        if _origin(scheme, host, port) == self._origin:
            return True
        return port in (None, _DEFAULT_PORTS[scheme]) and any(
            host == allowed or (allowed.startswith("*.") and host.endswith(allowed[1:]))
            for allowed in self._hosts
        )

    def _followed(self, url: object, what: str) -> str:
        """`url` when it may be followed; a 502 (billed) otherwise."""
        if not isinstance(url, str):
            raise _lost(f"{NAME} answered without a {what}.")
        if not self.may_follow(url):
            raise _lost(
                f"{NAME} answered a {what} the gateway does not follow: not https, or on a "
                "host that is neither base_url's nor on result_hosts."
            )
        return url


async def _with_images(
    task: bytes, upload: Upload, files: list[tuple[str, Spooled]]
) -> AsyncIterator[bytes]:
    """A task's JSON with an edit's images added as `input_image`, `input_image_2`, ...,
    base64 inside it as they are read back from the spool."""
    yield task[:-1]  # the object, open
    for number, (_, spooled) in enumerate(files, start=1):
        name = "input_image" if number == 1 else f"input_image_{number}"
        yield f',"{name}":"'.encode()
        async for piece in base64_of(upload, spooled):
            yield piece
        yield b'"'
    yield b"}"


async def _image(send: SendUpstream, download: Call) -> Pieces:
    """The task's image, downloaded, as base64 pieces as it arrives; then its end."""
    try:
        answer = await send(download)
        try:
            if not 200 <= answer.status < 300:
                raise _lost(f"{NAME}'s image could not be fetched (status {answer.status}).")
            pieces = Base64Pieces()
            size = 0
            async for chunk in answer.chunks():
                size += len(chunk)
                for piece in pieces.feed(chunk):
                    yield piece
            if size == 0:
                raise _lost(f"{NAME}'s image was empty.")
            if rest := pieces.end():
                yield rest
        finally:
            await answer.aclose()
    except httpx.HTTPError as exc:
        raise _lost(f"{NAME}'s image could not be fetched ({type(exc).__name__}).") from None
    yield ImageDone()


def bfl_error(answer: Answer, body: bytes) -> ProviderError:
    """A refused submission as the client is told: BFL's words (FastAPI's `detail`, or a
    `message`), and a 429's wait from its header or its body's `retry_after`."""
    found = loads(body)
    message = None
    if isinstance(found, dict):
        detail = found.get("detail")
        if isinstance(detail, list) and detail and isinstance(detail[0], dict):
            detail = detail[0].get("msg")
        message = detail if isinstance(detail, str) else found.get("message")
    error = failed(NAME, answer.status, message if isinstance(message, str) else None, answer)
    wait = found.get("retry_after") if isinstance(found, dict) else None
    if error.retry_after is None and isinstance(wait, int | float) and 0 <= wait <= 3600:
        error.retry_after = float(wait)
    return error


def _lost(message: str) -> ProviderError:
    """A failure once the task was taken on: a 502, billed."""
    return ProviderError(502, message, type="server_error", code="upstream_error", billed=True)


def _said(found: object) -> str:
    """What a poll's answer says of a failed task, short: its `details` or `error`."""
    if isinstance(found, dict):
        found = found.get("details") or found.get("error")
    if isinstance(found, dict):
        found = json.dumps(found)
    return f" ({found[:200]})" if isinstance(found, str) and found else ""


def _origin(scheme: str, host: str | None, port: int | None) -> tuple[str, str | None, int]:
    return scheme, host, port or _DEFAULT_PORTS.get(scheme, 0)
