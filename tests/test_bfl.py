"""Black Forest Labs' FLUX API as an upstream kind: a task submitted, polled and its image
downloaded, driven by the official SDK through the proxy against a double of the API."""

from __future__ import annotations

import base64
import json
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import openai
import pytest
from conftest import served_double
from double import Exchange, UpstreamDouble
from providers import PROVIDER_KEY, client, no_secrets, png, send_json
from support import json_request_headers, raw_request, until

from imagegen_proxy.config import BflMember
from imagegen_proxy.upstream.kinds.bfl import Bfl

Start = Callable[..., str]
MODEL = "flux-pro-1.1"
POLL = 0.05  # seconds between polls, in these tests


@dataclass
class Flux:
    """The FLUX API, by path: `POST /v1/{model}` submits a task, `GET /v1/get_result`
    polls it (`pending` times Pending, then `final`), `GET /delivery/{id}.png` is its image.
    `poll_statuses` are HTTP statuses answered to the first polls; `polling_url` and
    `sample_url` replace the URLs the answers name; `download_status` answers the image."""

    image: bytes = field(default_factory=lambda: png(80, 48, pad_to=50_000))
    pending: int = 1
    final: dict[str, Any] | None = None
    poll_statuses: list[int] = field(default_factory=list)
    polling_url: str | None = None
    sample_url: str | None = None
    download_status: int = 200
    submitted: list[str] = field(default_factory=list)  # the models, as submitted
    steps: list[str] = field(default_factory=list)  # "submit", "Pending", "Ready", "download"
    polled: threading.Event = field(default_factory=threading.Event)

    @property
    def polls(self) -> int:
        return sum(step not in ("submit", "download") for step in self.steps)

    async def __call__(self, x: Exchange) -> None:
        request, base = x.request, x.double.url
        if request.method == "POST":
            task = f"task-{len(self.submitted)}"
            self.submitted.append(request.path.removeprefix("/v1/"))
            self.steps.append("submit")
            polling = self.polling_url or f"{base}/v1/get_result?id={task}"
            receipt = {"id": task, "polling_url": polling, "cost": 4.0}
            await send_json(x, 200, receipt)
        elif request.path == "/v1/get_result":
            await self._poll(x, request.query.removeprefix("id="), base)
        else:
            self.steps.append("download")
            if self.download_status != 200:
                await send_json(x, self.download_status, {"detail": "expired"})
                return
            await x.start(200, [("content-type", "image/png")])
            for at in range(0, len(self.image), 4093):
                await x.body(self.image[at : at + 4093])
            await x.body(b"", more=False)

    async def _poll(self, x: Exchange, task: str, base: str) -> None:
        self.polled.set()
        if self.poll_statuses:
            self.steps.append(str(self.poll_statuses[0]))
            await send_json(x, self.poll_statuses.pop(0), {"detail": "busy"})
            return
        seen = sum(step == "Pending" for step in self.steps)
        if seen < self.pending * len(self.submitted):
            self.steps.append("Pending")
            await send_json(x, 200, {"id": task, "status": "Pending", "progress": 0.5})
            return
        sample = self.sample_url or f"{base}/delivery/{task}.png"
        final = self.final or {"status": "Ready", "result": {"sample": sample, "seed": 7}}
        self.steps.append(str(final["status"]))
        await send_json(x, 200, {"id": task, **final})


def refusing(status: int, body: dict[str, Any], headers: Any = ()) -> Callable[..., Any]:
    """A FLUX API that refuses every submission."""

    async def answer(x: Exchange) -> None:
        await send_json(x, status, body, list(headers))

    return answer


def member(upstream: UpstreamDouble, name: str = "bfl", **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "kind": "bfl",
        "base_url": upstream.url,
        "api_key": PROVIDER_KEY,
        "poll_interval": POLL,
        "poll_max_interval": 2 * POLL,
        **extra,
    }


@pytest.fixture
def flux(upstream: UpstreamDouble) -> Flux:
    double = Flux()
    upstream.answer = double
    return double


@pytest.fixture
def other() -> Iterator[UpstreamDouble]:
    """A second double on another loopback port."""
    with served_double() as double:
        yield double


@pytest.fixture
def access(caplog: pytest.LogCaptureFixture) -> Callable[[], list[dict[str, Any]]]:
    caplog.set_level(logging.INFO, logger="imagegen_proxy.access")
    return lambda: [
        json.loads(r.getMessage()) for r in caplog.records if r.name == "imagegen_proxy.access"
    ]


def post(url: str, **body: Any) -> httpx.Response:
    return httpx.post(url + "/v1/images/generations", json={"model": MODEL, "prompt": "p", **body})


# --- The exchange --------------------------------------------------------------------


def test_a_task_is_submitted_polled_and_its_image_answered(
    upstream: UpstreamDouble, provider_proxy: Start, flux: Flux
) -> None:
    url = provider_proxy([member(upstream)])
    result = client(url).images.generate(
        model=MODEL, prompt="a red fox", size="1024x768", output_format="png"
    )
    assert result.data is not None and result.data[0].b64_json is not None
    assert base64.b64decode(result.data[0].b64_json) == flux.image
    assert result.size == "80x48" and result.output_format == "png"  # what was made
    assert result.usage is None  # FLUX is priced per image
    assert flux.steps == ["submit", "Pending", "Ready", "download"]
    submit = upstream.requests[0]
    assert (submit.method, submit.path) == ("POST", f"/v1/{MODEL}")
    assert submit.json == {
        "prompt": "a red fox",
        "width": 1024,
        "height": 768,
        "output_format": "png",
    }
    no_secrets(upstream)


def test_a_stream_ends_with_the_completed_event(
    upstream: UpstreamDouble, provider_proxy: Start, flux: Flux
) -> None:
    url = provider_proxy([member(upstream)])
    events = list(client(url).images.generate(model=MODEL, prompt="a fox", stream=True))
    assert [event.type for event in events] == ["image_generation.completed"]
    assert base64.b64decode(events[0].b64_json) == flux.image
    assert flux.steps == ["submit", "Pending", "Ready", "download"]


def test_n_images_are_n_tasks_side_by_side(
    upstream: UpstreamDouble, provider_proxy: Start, flux: Flux
) -> None:
    url = provider_proxy([member(upstream)])
    result = client(url).images.generate(model=MODEL, prompt="foxes", n=2)
    assert result.data is not None and len(result.data) == 2
    assert all(base64.b64decode(one.b64_json or "") == flux.image for one in result.data)
    assert flux.submitted == [MODEL, MODEL]
    assert flux.steps.count("download") == 2


def test_the_key_goes_to_submissions_and_polls_never_to_the_image(
    upstream: UpstreamDouble, provider_proxy: Start, flux: Flux
) -> None:
    url = provider_proxy([member(upstream)])
    client(url).images.generate(model=MODEL, prompt="p")
    submit, *polls, download = upstream.requests
    assert submit.header("x-key") == PROVIDER_KEY
    assert polls and all(poll.header("x-key") == PROVIDER_KEY for poll in polls)
    assert download.path == "/delivery/task-0.png" and download.header("x-key") is None
    assert all(r.header("authorization") is None for r in upstream.requests)
    no_secrets(upstream)


def test_busy_polls_are_polled_again(
    upstream: UpstreamDouble, provider_proxy: Start, flux: Flux
) -> None:
    flux.poll_statuses = [503, 429, 500]
    url = provider_proxy([member(upstream)])
    result = client(url).images.generate(model=MODEL, prompt="p")
    assert result.data is not None and base64.b64decode(result.data[0].b64_json or "") == flux.image
    assert flux.steps == ["submit", "503", "429", "500", "Pending", "Ready", "download"]


def test_a_model_map_names_the_path(
    upstream: UpstreamDouble, provider_proxy: Start, flux: Flux
) -> None:
    url = provider_proxy([member(upstream, models=["house"], model_map={"house": "flux-2-pro"})])
    client(url).images.generate(model="house", prompt="p", size="2048x2048")
    assert flux.submitted == ["flux-2-pro"]
    assert upstream.requests[0].json == {"prompt": "p", "width": 2048, "height": 2048}


# --- What OpenAI's parameters become -----------------------------------------------------


@pytest.mark.parametrize(
    ("model", "size", "fields"),
    [
        ("flux-pro-1.1", "1024x1024", {"width": 1024, "height": 1024}),
        ("flux-pro-1.1", "1440x960", {"width": 1440, "height": 960}),
        ("flux-dev", "256x1440", {"width": 256, "height": 1440}),
        ("flux-pro-1.1", "auto", {}),
        ("flux-pro-1.1", None, {}),
        ("flux-pro-1.1-ultra", "1536x1024", {"aspect_ratio": "3:2"}),
        ("flux-pro-1.1-ultra", "1024x1536", {"aspect_ratio": "2:3"}),
        ("flux-kontext-pro", "1024x1024", {"aspect_ratio": "1:1"}),
        ("flux-kontext-max", "2520x1080", {"aspect_ratio": "21:9"}),
        ("flux-kontext-max", "1080x2520", {"aspect_ratio": "9:21"}),
        ("flux-2-pro", "2048x2048", {"width": 2048, "height": 2048}),
        ("flux-2-flex", "64x1024", {"width": 64, "height": 1024}),
        ("flux-2-max", "1536x1024", {"width": 1536, "height": 1024}),
        ("flux-2-max", None, {}),
    ],
)
def test_sizes_become_the_models_own_fields(
    upstream: UpstreamDouble,
    provider_proxy: Start,
    flux: Flux,
    model: str,
    size: str | None,
    fields: dict[str, Any],
) -> None:
    url = provider_proxy([member(upstream)])
    asked: dict[str, Any] = {"model": model, "prompt": "p"} | ({"size": size} if size else {})
    client(url).images.generate(**asked)
    assert upstream.requests[0].json == {"prompt": "p", **fields}


@pytest.mark.parametrize(
    ("model", "size", "said"),
    [
        ("flux-pro-1.1", "1536x1024", "from 256 to 1440 pixels, multiples of 32"),
        ("flux-pro-1.1", "1000x1000", "multiples of 32"),
        ("flux-dev", "128x128", "from 256 to 1440"),
        ("flux-pro-1.1-ultra", "1000x700", "no aspect ratio"),
        ("flux-kontext-pro", "1792x1024", "no aspect ratio"),
        ("flux-2-pro", "2064x2048", "at most 4 megapixels"),
        ("flux-2-pro", "1000x1000", "multiples of 16"),
        ("flux-2-pro", "48x1024", "at least 64"),
        ("flux-pro-1.0-fill", "1024x1024", "knows no sizes"),
        ("flux-pro-1.1", "big", "Invalid size"),
    ],
)
def test_a_size_the_model_cannot_make_is_a_400_naming_size(
    upstream: UpstreamDouble, provider_proxy: Start, model: str, size: str, said: str
) -> None:
    url = provider_proxy([member(upstream)])
    with pytest.raises(openai.BadRequestError) as caught:
        client(url).images.generate(model=model, prompt="p", size=size)
    assert caught.value.param == "size"
    assert said in caught.value.message
    assert upstream.requests == []  # never shrunk to fit: refused before anything was sent


@pytest.mark.parametrize(
    ("asked", "param"),
    [
        ({"quality": "low"}, "quality"),
        ({"quality": "high"}, "quality"),
        ({"quality": "hd"}, "quality"),
        ({"output_format": "webp"}, "output_format"),
        ({"output_compression": 50}, "output_compression"),
        ({"background": "transparent"}, "background"),
        ({"response_format": "url"}, "response_format"),
        ({"n": 11}, "n"),
    ],
)
def test_what_flux_cannot_do_is_a_400_naming_the_param(
    upstream: UpstreamDouble, provider_proxy: Start, asked: dict[str, Any], param: str
) -> None:
    url = provider_proxy([member(upstream)])
    answer = post(url, **asked)
    assert answer.status_code == 400 and answer.json()["error"]["param"] == param
    assert upstream.requests == []


@pytest.mark.parametrize("asked", [{"quality": "auto"}, {"output_format": "jpeg"}])
def test_what_flux_can_do_as_asked_passes(
    upstream: UpstreamDouble, provider_proxy: Start, flux: Flux, asked: dict[str, Any]
) -> None:
    url = provider_proxy([member(upstream)])
    assert post(url, **asked).status_code == 200
    sent = {"prompt": "p"} | ({"output_format": "jpeg"} if "output_format" in asked else {})
    assert upstream.requests[0].json == sent


@pytest.mark.parametrize("model", ["../admin", "a/b", "m?q=1"])
def test_a_model_name_never_builds_a_path(
    upstream: UpstreamDouble, provider_proxy: Start, model: str
) -> None:
    url = provider_proxy([member(upstream)])
    answer = post(url, model=model)
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "model"
    assert upstream.requests == []


# --- Refusals and failures -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "status", "code"),
    [
        ("Request Moderated", 400, "content_policy_violation"),
        ("Content Moderated", 400, "content_policy_violation"),
        ("Task not found", 502, "upstream_error"),
        ("Error", 502, "upstream_error"),
        ("Failed", 502, "upstream_error"),
    ],
)
def test_a_task_that_ends_without_an_image_is_an_openai_error_and_charged(
    upstream: UpstreamDouble,
    provider_proxy: Start,
    flux: Flux,
    access: Callable[[], list[dict[str, Any]]],
    state: str,
    status: int,
    code: str,
) -> None:
    flux.final = {"status": state, "result": None, "details": {"reason": "flagged"}}
    url = provider_proxy([member(upstream)])
    answer = post(url)
    assert answer.status_code == status
    error = answer.json()["error"]
    assert error["code"] == code and state in error["message"]
    assert flux.steps[-1] == state and "download" not in flux.steps
    until(lambda: len(access()) == 1, within=5)
    [line] = access()
    assert line["images"] == 1 and line["cost_usd"] == 0.04  # taken on: spent is spent


@pytest.mark.parametrize(("image", "status"), [(b"", 200), (None, 403)])
def test_an_image_that_cannot_be_fetched_is_a_502_and_charged(
    upstream: UpstreamDouble,
    provider_proxy: Start,
    flux: Flux,
    access: Callable[[], list[dict[str, Any]]],
    image: bytes | None,
    status: int,
) -> None:
    flux.image = flux.image if image is None else image
    flux.download_status = status
    url = provider_proxy([member(upstream)])
    answer = post(url)
    assert answer.status_code == 502 and answer.json()["error"]["code"] == "upstream_error"
    assert flux.steps[-1] == "download"
    until(lambda: len(access()) == 1, within=5)
    assert access()[0]["images"] == 1


def test_polling_ends_at_the_upstreams_total_timeout(
    upstream: UpstreamDouble,
    provider_proxy: Start,
    flux: Flux,
    access: Callable[[], list[dict[str, Any]]],
) -> None:
    flux.pending = 10_000  # never ready
    url = provider_proxy([member(upstream, total_timeout=0.5)])
    answer = post(url)
    assert answer.status_code == 504
    assert flux.polls >= 2
    until(lambda: len(access()) == 1, within=5)
    assert access()[0]["images"] == 1  # the task was taken on: charged


def test_a_poll_refused_is_a_502(
    upstream: UpstreamDouble, provider_proxy: Start, flux: Flux
) -> None:
    flux.poll_statuses = [404]
    url = provider_proxy([member(upstream)])
    answer = post(url)
    assert answer.status_code == 502 and answer.json()["error"]["code"] == "upstream_error"


@pytest.mark.parametrize(
    ("status", "body", "headers", "expected", "code"),
    [
        (402, {"detail": "Insufficient credits"}, [], 429, "insufficient_quota"),
        (
            422,
            {"detail": [{"loc": ["body", "width"], "msg": "too wide"}]},
            [],
            400,
            "invalid_request",
        ),
        (403, {"detail": "Not authenticated"}, [], 502, "upstream_auth_failed"),
        (401, {"detail": "Not authenticated"}, [], 502, "upstream_auth_failed"),
        (500, {"detail": "Internal"}, [], 500, "upstream_error"),
        (503, {"detail": "Unavailable"}, [], 503, "upstream_error"),
    ],
)
def test_a_refused_submission_is_mapped(
    upstream: UpstreamDouble,
    provider_proxy: Start,
    status: int,
    body: dict[str, Any],
    headers: list[tuple[str, str]],
    expected: int,
    code: str,
) -> None:
    upstream.answer = refusing(status, body, headers)
    url = provider_proxy([member(upstream)])
    answer = post(url)
    assert answer.status_code == expected and answer.json()["error"]["code"] == code
    assert PROVIDER_KEY not in answer.text
    if status == 422:
        assert "too wide" in answer.json()["error"]["message"]


@pytest.mark.parametrize(
    ("headers", "body"),
    [
        ([("retry-after", "7")], {"error": "rate_limit_exceeded", "message": "slow down"}),
        ([], {"error": "rate_limit_exceeded", "message": "slow down", "retry_after": 7}),
    ],
)
def test_a_rate_limited_submission_is_a_429_with_its_wait(
    upstream: UpstreamDouble,
    provider_proxy: Start,
    headers: list[tuple[str, str]],
    body: dict[str, Any],
) -> None:
    upstream.answer = refusing(429, body, headers)
    url = provider_proxy([member(upstream)])
    answer = post(url)
    assert answer.status_code == 429
    assert answer.json()["error"]["code"] == "rate_limit_exceeded"
    assert answer.headers["retry-after"] == "7"


def test_a_refused_submission_fails_over_to_the_next_member(
    upstream: UpstreamDouble, other: UpstreamDouble, provider_proxy: Start
) -> None:
    upstream.answer = refusing(429, {"error": "rate_limit_exceeded"}, [("retry-after", "7")])
    second = Flux()
    other.answer = second
    url = provider_proxy([member(upstream, priority=1), member(other, "bfl-2", priority=2)])
    result = client(url).images.generate(model=MODEL, prompt="p")
    assert (
        result.data is not None and base64.b64decode(result.data[0].b64_json or "") == second.image
    )
    assert len(upstream.requests) == 1 and second.steps[0] == "submit"


def test_a_task_taken_on_never_fails_over(
    upstream: UpstreamDouble, other: UpstreamDouble, provider_proxy: Start, flux: Flux
) -> None:
    flux.final = {"status": "Error", "result": None}
    url = provider_proxy([member(upstream, priority=1), member(other, "bfl-2", priority=2)])
    answer = post(url)
    assert answer.status_code == 502
    assert flux.steps[-1] == "Error"
    assert other.requests == []  # spent on the first: the second is not asked to pay again


# --- Where the answers point ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("which", "path"),
    [("polling_url", "/v1/get_result?id=task-0"), ("sample_url", "/delivery/task-0.png")],
)
def test_a_url_on_another_origin_is_never_followed(
    upstream: UpstreamDouble,
    other: UpstreamDouble,
    provider_proxy: Start,
    flux: Flux,
    which: str,
    path: str,
) -> None:
    setattr(flux, which, other.url + path)  # the same host, another port
    url = provider_proxy([member(upstream)])
    answer = post(url)
    assert answer.status_code == 502
    assert "does not follow" in answer.json()["error"]["message"]
    assert other.requests == []


def test_a_polling_url_on_a_foreign_host_is_never_followed(
    upstream: UpstreamDouble, provider_proxy: Start, flux: Flux
) -> None:
    flux.polling_url = "http://evil.example/v1/get_result?id=task-0"
    url = provider_proxy([member(upstream)])
    answer = post(url)
    assert answer.status_code == 502 and flux.steps == ["submit"]


@pytest.mark.parametrize(
    ("url", "followed"),
    [
        ("https://api.bfl.ai/v1/get_result?id=1", True),
        ("https://api.eu2.bfl.ai/v1/get_result?id=1", True),
        ("https://delivery-eu1.bfl.ai/results/x/sample.png?sig=1", True),
        ("https://delivery.bfl.ml/x.png", True),
        ("https://bfl.ai/x.png", False),  # "*." names subdomains only
        ("http://delivery-eu1.bfl.ai/x.png", False),  # not https
        ("https://delivery-eu1.bfl.ai:8443/x.png", False),
        ("https://user@delivery-eu1.bfl.ai/x.png", False),
        ("https://delivery-eu1.bfl.ai.evil.example/x.png", False),
        ("https://evilbfl.ai/x.png", False),
        ("ftp://delivery-eu1.bfl.ai/x.png", False),
        ("https://api.bfl.ai:99999/x", False),
        ("/v1/get_result?id=1", False),
    ],
)
def test_only_https_urls_on_base_urls_origin_or_result_hosts_are_followed(
    url: str, followed: bool
) -> None:
    kind = Bfl(BflMember.model_validate({"name": "bfl", "kind": "bfl"}))
    assert kind.may_follow(url) is followed


# --- A client that leaves ---------------------------------------------------------------


def test_a_client_that_leaves_while_the_task_runs_stops_the_polls_and_is_charged(
    upstream: UpstreamDouble,
    provider_proxy: Start,
    flux: Flux,
    access: Callable[[], list[dict[str, Any]]],
) -> None:
    flux.pending = 10_000  # never ready
    url = provider_proxy([member(upstream)])
    body = json.dumps({"model": MODEL, "prompt": "p"}).encode()
    with raw_request(url, json_request_headers(body), body):
        until(lambda: flux.polls >= 2, within=10)
    until(lambda: len(access()) == 1, within=10)  # the exchange has ended
    flux.polled.clear()
    assert not flux.polled.wait(6 * POLL)  # no poll after it, over three of the longest waits
    [line] = access()
    assert line["outcome"] == "client_gone"
    assert line["images"] == 1 and line["cost_usd"] == 0.04  # the task was taken on


def test_a_kontext_edit_sends_its_images_base64_in_the_task(
    upstream: UpstreamDouble, provider_proxy: Start, flux: Flux
) -> None:
    given, second = png(300, 200, pad_to=300_000), png(20, 20)
    url = provider_proxy([member(upstream)])
    result = client(url).images.edit(
        model="flux-kontext-pro",
        image=[("in.png", given, "image/png"), ("two.png", second, "image/png")],
        prompt="make it blue",
        size="1536x1024",
    )
    assert result.data is not None and base64.b64decode(result.data[0].b64_json or "") == flux.image
    task = upstream.requests[0].json
    assert task["prompt"] == "make it blue" and task["aspect_ratio"] == "3:2"
    assert base64.b64decode(task["input_image"]) == given
    assert base64.b64decode(task["input_image_2"]) == second
    no_secrets(upstream)


@pytest.mark.parametrize(
    ("model", "files", "param"),
    [
        ("flux-pro-1.1", {"image": ("in.png", png(), "image/png")}, "model"),
        (
            "flux-kontext-pro",
            {"image": ("in.png", png(), "image/png"), "mask": ("m.png", png(), "image/png")},
            "mask",
        ),
        ("flux-kontext-pro", {"image[]": [("i.png", png(), "image/png")] * 5}, "image"),
    ],
)
def test_what_a_flux_edit_cannot_take_is_a_400(
    upstream: UpstreamDouble, provider_proxy: Start, flux: Flux, model: str, files: Any, param: str
) -> None:
    url = provider_proxy([member(upstream)])
    multipart = [
        (name, one)
        for name, value in files.items()
        for one in (value if isinstance(value, list) else [value])
    ]
    answer = httpx.post(
        url + "/v1/images/edits", data={"model": model, "prompt": "p"}, files=multipart
    )
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == param
    assert upstream.requests == []
