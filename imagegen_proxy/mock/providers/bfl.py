"""Black Forest Labs' FLUX API: submit a task, poll it, download the result from a signed URL
(docs/providers.md §3).

Routes: `POST /v1/{model}` for a model named `flux-...` (`x-key` header), `GET
/v1/get_result?id=` (`x-key`; the submit answer's `polling_url` points here), and `GET
/bfl/delivery/{id}.png?sig=` (no key: the signature in the URL is the credential, as with
BFL's delivery URLs).

Models by their size fields, as documented: `*-ultra` and `flux-kontext-*` take
`aspect_ratio` (21:9 to 9:21; Ultra about 4 MP, default 16:9; Kontext about 1 MP, default
the input image's ratio, else 1:1); `flux-2-*` take `width`/`height`, multiples of 16 from
64, at most 2048x2048 pixels in all; the others (`flux-pro-1.1`, ...) `width`/`height` from
256 to 1440 in multiples of 32. The default size is 1024x768. Validation errors are FastAPI's
422 shape.

The mock writes PNG only: the delivery is `image/png` and its URL ends `.png`. It therefore
answers an unset `output_format` with PNG (BFL's own default is JPEG on most models) and
refuses `output_format: "jpeg"` with a 422 that says so, rather than label PNG bytes JPEG.

A task is ready `delay` seconds after its submission (nothing sleeps meanwhile); tasks, and
their signed URLs, live ten minutes, as BFL's results do, and at most 10,000 are kept.
"""

from __future__ import annotations

import hmac
import json
import re
import secrets
import time
import uuid
from dataclasses import dataclass
from fractions import Fraction
from typing import Any
from urllib.parse import parse_qs

from cachetools import TTLCache

from ...types import Receive, Scope, Send
from ...wire.errors import ClientGone, ProxyError
from ...wire.request import header, read_body
from ..cache import BytesLRU
from ..decode import png_dimensions
from ..replies import JSON, Headers, base_url, respond
from .common import (
    MAX_BODY,
    Handler,
    Settings,
    Studio,
    decode_base64,
    flagged,
    parse_ratio,
    ratio_size,
    seed_of,
)

_SUBMIT = re.compile(r"/v1/(flux-[a-z0-9.-]+)")
RESULT_PATH = "/v1/get_result"
_DELIVERY = re.compile(r"/bfl/delivery/([0-9a-f-]{36})\.png")
TASK_TTL = 600.0
MAX_TASKS = 10_000
DEFAULT_SIZE = (1024, 768)
# Credits per image (1 credit = $0.01) where BFL's pricing page gives one; others 4.
COSTS = {
    "flux-pro-1.1": 4.0,
    "flux-pro-1.1-ultra": 6.0,
    "flux-kontext-pro": 4.0,
    "flux-kontext-max": 8.0,
    "flux-pro-1.0-fill": 5.0,
}
DEFAULT_COST = 4.0
WIDEST, TALLEST = Fraction(21, 9), Fraction(9, 21)
FLUX2_MAX_PIXELS = 2048 * 2048

_TEXT = (b"content-type", b"text/plain; charset=utf-8")


@dataclass(frozen=True, slots=True)
class _Task:
    """A submitted task: what to draw, when it is ready, the signature of its URL, and
    its moderation verdict ("Request Moderated" at once, "Content Moderated" once ready)."""

    id: str
    prompt: str
    seed: int
    width: int
    height: int
    created: float
    ready_at: float
    signature: str
    moderation: str | None


class _Invalid(Exception):
    """422 with FastAPI's list of validation errors."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        super().__init__("validation failed")
        self.errors = errors


class BlackForestLabs:
    """BFL's asynchronous API: tasks in a bounded in-memory table, PNGs rendered on download."""

    def __init__(self, settings: Settings, studio: Studio, api_key: str | None) -> None:
        self._settings = settings
        self._studio = studio
        self._key = None if api_key is None else api_key.encode()
        self._tasks: TTLCache[str, _Task] = TTLCache(maxsize=MAX_TASKS, ttl=TASK_TTL)
        # Kontext's input images, kept for the download's edit while they fit.
        self._inputs = BytesLRU(max_bytes=256 * 1024 * 1024)

    def route(self, path: str) -> Handler | None:
        """The handler of a submit, poll or delivery path."""
        if path == RESULT_PATH:
            return self._result
        match = _DELIVERY.fullmatch(path)
        if match is not None:
            task_id = match.group(1)

            async def deliver(scope: Scope, receive: Receive, send: Send) -> None:
                await self._deliver(scope, send, task_id)

            return deliver
        match = _SUBMIT.fullmatch(path)
        if match is not None:
            model = match.group(1)

            async def submit(scope: Scope, receive: Receive, send: Send) -> None:
                await self._submit(scope, receive, send, model)

            return submit
        return None

    def _authorized(self, scope: Scope) -> bytes | None:
        """None when the request may go on, else the 401 body."""
        if self._key is None:
            return None
        given = header(scope, b"x-key")
        if given is None:
            return b'{"detail":"Not authenticated"}'
        if not hmac.compare_digest(given, self._key):
            return b'{"detail":"Invalid API key"}'
        return None

    async def _submit(self, scope: Scope, receive: Receive, send: Send, model: str) -> None:
        if scope["method"] != "POST":
            await _method_not_allowed(send, b"POST")
            return
        refused = self._authorized(scope)
        if refused is not None:
            await respond(send, 401, refused, [JSON])
            return
        try:
            body = await read_body(scope, receive, MAX_BODY)
        except ClientGone:
            return
        except ProxyError as exc:
            await respond(send, exc.status, json.dumps({"detail": exc.message}).encode(), [JSON])
            return
        try:
            prompt, seed, width, height, image = _parse(model, body)
        except _Invalid as exc:
            await respond(send, 422, json.dumps({"detail": exc.errors}).encode(), [JSON])
            return
        now = time.time()
        if flagged(prompt, "forbidden"):
            moderation: str | None = "Request Moderated"
        elif flagged(prompt, "unsafe"):
            moderation = "Content Moderated"
        else:
            moderation = None
        task = _Task(
            id=str(uuid.uuid4()),
            prompt=prompt,
            seed=seed,
            width=width,
            height=height,
            created=now,
            ready_at=now + self._settings.delay,
            signature=secrets.token_urlsafe(24),
            moderation=moderation,
        )
        self._tasks[task.id] = task
        input_mp = 0.0
        if image is not None:
            self._inputs.put(task.id, image)
            dimensions = png_dimensions(image)
            if dimensions is not None:
                input_mp = round(dimensions[0] * dimensions[1] / 1e6, 2)
        payload = {
            "id": task.id,
            "polling_url": f"{base_url(scope)}{RESULT_PATH}?id={task.id}",
            "cost": COSTS.get(model, DEFAULT_COST),
            "input_mp": input_mp,
            "output_mp": round(width * height / 1e6, 2),
        }
        await respond(send, 200, json.dumps(payload).encode(), [JSON])

    async def _result(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] != "GET":
            await _method_not_allowed(send, b"GET")
            return
        refused = self._authorized(scope)
        if refused is not None:
            await respond(send, 401, refused, [JSON])
            return
        ids = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("id")
        if not ids:
            error = _error("missing", "id", "Field required", None)
            error["loc"] = ["query", "id"]
            await respond(send, 422, json.dumps({"detail": [error]}).encode(), [JSON])
            return
        task_id = ids[0]
        task = self._tasks.get(task_id)
        payload: dict[str, Any]
        if task is None:
            payload = {"id": task_id, "status": "Task not found"}
        else:
            payload = _status(task, scope, time.time())
        await respond(send, 200, json.dumps(payload).encode(), [JSON])

    async def _deliver(self, scope: Scope, send: Send, task_id: str) -> None:
        if scope["method"] != "GET":
            await _method_not_allowed(send, b"GET")
            return
        task = self._tasks.get(task_id)
        if task is None or task.moderation is not None or time.time() < task.ready_at:
            await respond(send, 404, b"The specified blob does not exist.", [_TEXT])
            return
        signatures = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("sig")
        given = signatures[0].encode() if signatures else b""
        if not hmac.compare_digest(given, task.signature.encode()):
            await respond(send, 403, b"Signature missing or not valid.", [_TEXT])
            return
        image = await self._studio.edit_or_render(
            self._inputs.get(task.id), task.prompt, task.width, task.height, task.seed
        )
        await respond(send, 200, image, [(b"content-type", b"image/png")])


def _status(task: _Task, scope: Scope, now: float) -> dict[str, Any]:
    """What polling `task` answers at `now`."""
    payload: dict[str, Any] = {"id": task.id}
    if task.moderation == "Request Moderated":
        payload.update(status=task.moderation, result=None, progress=None, details=None)
    elif now < task.ready_at:
        spent = (now - task.created) / (task.ready_at - task.created)
        payload.update(status="Pending", result=None, progress=round(min(spent, 0.99), 2))
        payload["details"] = None
    elif task.moderation is not None:
        payload.update(status=task.moderation, result=None, progress=None, details=None)
    else:
        sample = f"{base_url(scope)}/bfl/delivery/{task.id}.png?sig={task.signature}"
        result = {
            "sample": sample,
            "prompt": task.prompt,
            "seed": task.seed,
            "start_time": task.created,
            "end_time": task.ready_at,
            "duration": task.ready_at - task.created,
        }
        payload.update(status="Ready", result=result, progress=None, details=None)
    return payload


async def _method_not_allowed(send: Send, allow: bytes) -> None:
    headers: Headers = [JSON, (b"allow", allow)]
    await respond(send, 405, b'{"detail":"Method Not Allowed"}', headers)


def _error(kind: str, field: str, message: str, value: Any, **ctx: Any) -> dict[str, Any]:
    error: dict[str, Any] = {"type": kind, "loc": ["body", field], "msg": message, "input": value}
    if ctx:
        error["ctx"] = ctx
    return error


def _parse(model: str, body: bytes) -> tuple[str, int, int, int, bytes | None]:
    """The prompt, seed, size and input image of a submit body; _Invalid lists every error."""
    try:
        data: Any = json.loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        error = _error("json_invalid", "", "JSON decode error", {}, error=str(exc).split(":")[0])
        error["loc"] = ["body", 0]
        raise _Invalid([error]) from None
    if not isinstance(data, dict):
        message = "Input should be a valid dictionary or object to extract fields from"
        error = _error("model_attributes_type", "", message, data)
        error["loc"] = ["body"]
        raise _Invalid([error])
    errors: list[dict[str, Any]] = []
    prompt = data.get("prompt")
    if prompt is None:
        errors.append(_error("missing", "prompt", "Field required", None))
    elif not isinstance(prompt, str):
        errors.append(_error("string_type", "prompt", "Input should be a valid string", prompt))
    seed = _integer(data, "seed", errors)
    tolerance = _integer(data, "safety_tolerance", errors)
    if tolerance is not None:
        _bounds("safety_tolerance", tolerance, 0, 6, errors)
    output_format = data.get("output_format")
    if output_format == "jpeg":
        errors.append(
            _error(
                "value_error",
                "output_format",
                "Value error, the mock writes png only: ask for output_format 'png'",
                output_format,
            )
        )
    elif output_format not in (None, "png"):
        errors.append(
            _error(
                "enum",
                "output_format",
                "Input should be 'jpeg' or 'png'",
                output_format,
                expected="'jpeg' or 'png'",
            )
        )
    # Kontext and FLUX.2 edit `input_image`; the others know no such field, and ignore it.
    edits = model.startswith(("flux-kontext-", "flux-2-"))
    image = _image(data, "input_image", errors) if edits else None
    _image(data, "image_prompt", errors)
    width, height = _size(model, data, image, errors)
    if errors:
        raise _Invalid(errors)
    assert isinstance(prompt, str)
    return prompt, seed_of(prompt) if seed is None else seed, width, height, image


def _integer(data: dict[str, Any], name: str, errors: list[dict[str, Any]]) -> int | None:
    value = data.get(name)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    errors.append(_error("int_type", name, "Input should be a valid integer", value))
    return None


def _bounds(name: str, value: int, low: int, high: int, errors: list[dict[str, Any]]) -> bool:
    if value < low:
        message = f"Input should be greater than or equal to {low}"
        errors.append(_error("greater_than_equal", name, message, value, ge=low))
        return False
    if value > high:
        message = f"Input should be less than or equal to {high}"
        errors.append(_error("less_than_equal", name, message, value, le=high))
        return False
    return True


def _image(data: dict[str, Any], name: str, errors: list[dict[str, Any]]) -> bytes | None:
    """An image field's bytes: base64 (or a base64 data URL) is decoded; an http(s) URL is
    accepted and never fetched (None)."""
    value = data.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        errors.append(_error("string_type", name, "Input should be a valid string", value))
        return None
    if value.startswith(("http://", "https://")):
        return None
    head, comma, payload = value.partition(",")
    if comma and head.startswith("data:") and head.endswith(";base64"):
        value = payload
    decoded = decode_base64(value)
    if decoded is None:
        message = f"Value error, {name} is neither a URL nor valid base64"
        errors.append(_error("value_error", name, message, value[:64]))
    return decoded


def _size(
    model: str, data: dict[str, Any], image: bytes | None, errors: list[dict[str, Any]]
) -> tuple[int, int]:
    """The output size: from `aspect_ratio` on Ultra and Kontext, else `width`/`height`."""
    if model.endswith("-ultra") or model.startswith("flux-kontext-"):
        ultra = model.endswith("-ultra")
        given = data.get("aspect_ratio")
        ratio = parse_ratio(given)
        if given is None:
            dimensions = None if ultra or image is None else png_dimensions(image)
            ratio = Fraction(16, 9) if ultra else Fraction(*(dimensions or (1, 1)))
            ratio = min(max(ratio, TALLEST), WIDEST)
        elif ratio is None or not TALLEST <= ratio <= WIDEST:
            message = "Value error, aspect_ratio must be W:H between 21:9 and 9:21"
            errors.append(_error("value_error", "aspect_ratio", message, given))
            return DEFAULT_SIZE
        area = 2048 * 2048 if ultra else 1024 * 1024
        return ratio_size(ratio, area)
    flux2 = model.startswith("flux-2-")
    low, high, multiple = (64, 4096, 16) if flux2 else (256, 1440, 32)
    sides = []
    for name, default in zip(("width", "height"), DEFAULT_SIZE, strict=True):
        value = _integer(data, name, errors)
        if value is None:
            sides.append(default)
            continue
        if _bounds(name, value, low, high, errors) and value % multiple:
            message = f"Input should be a multiple of {multiple}"
            errors.append(_error("multiple_of", name, message, value, multiple_of=multiple))
        sides.append(value)
    width, height = sides
    if flux2 and width * height > FLUX2_MAX_PIXELS:
        message = f"Value error, width x height must be at most {FLUX2_MAX_PIXELS} pixels"
        errors.append(_error("value_error", "width", message, width))
    return width, height
