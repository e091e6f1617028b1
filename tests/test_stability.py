"""Stability AI's Stable Image API as an upstream kind, driven by the official SDK through
the proxy."""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest
from conftest import CLIENT_KEY
from double import Answer, Exchange, UpstreamDouble
from providers import PROVIDER_KEY, b64, client, decoded_size, no_secrets, png, send_json
from support import until

from imagegen_proxy.governance.pricing import Prices
from imagegen_proxy.wire.request import ImageGenerationBody, ImageRequest

Start = Callable[..., str]
GENERATE = "/v2beta/stable-image/generate/"


# --- Stability's answers, as its reference has them ---------------------------------------


def stability_image(
    image: bytes | None = None,
    *,
    finish: str = "SUCCESS",
    content_type: str = "image/png",
    chunk: int = 65536,
) -> Answer:
    """`accept: image/*`'s answer: the raw image, its finish reason and seed in headers."""

    async def answer(x: Exchange) -> None:
        data = image if image is not None else png()
        headers = [
            ("content-type", content_type),
            ("finish-reason", finish),
            ("seed", "1234567"),
            ("x-request-id", "stability-req-1"),
        ]
        await x.start(200, headers)
        for at in range(0, len(data), chunk):
            await x.body(data[at : at + chunk])
        await x.body(b"", more=False)

    return answer


def stability_json(
    image: bytes | None = None, *, finish: str = "SUCCESS", finish_first: bool = False
) -> Answer:
    """`accept: application/json`'s answer, sent although the proxy asked for the image."""

    async def answer(x: Exchange) -> None:
        value: dict[str, Any] = {"image": b64(image if image is not None else png())}
        value["finish_reason"] = finish
        value["seed"] = 1234567
        if finish_first:
            value = {"finish_reason": finish, **value}
        body = json.dumps(value).encode()
        await x.start(200, [("content-type", "application/json; type=image/png")])
        for at in range(0, len(body), 1000):
            await x.body(body[at : at + 1000])
        await x.body(b"", more=False)

    return answer


def stability_error(
    status: int, name: str, errors: list[str], headers: list[tuple[str, str]] | None = None
) -> Answer:
    """Stability's error body."""

    async def answer(x: Exchange) -> None:
        value = {"id": "a1b2c3", "name": name, "errors": errors}
        await send_json(x, status, value, headers)

    return answer


def stability_member(
    upstream: UpstreamDouble, name: str = "stability", **extra: Any
) -> dict[str, Any]:
    return {
        "name": name,
        "kind": "stability",
        "base_url": upstream.url,
        "api_key": PROVIDER_KEY,
        **extra,
    }


def generate(url: str, **body: Any) -> httpx.Response:
    return httpx.post(url + "/v1/images/generations", json={"prompt": "p", **body}, timeout=30)


# --- generations ----------------------------------------------------------------------------


def test_a_generation_answers_openais_images_response(
    upstream: UpstreamDouble, provider_proxy: Start
) -> None:
    image = png(96, 64)
    upstream.answer = stability_image(image)
    url = provider_proxy([stability_member(upstream)])
    result = client(url).images.generate(model="ultra", prompt="a red fox", size="1536x1024")
    assert result.data is not None and result.data[0].b64_json is not None
    assert base64.b64decode(result.data[0].b64_json) == image
    assert result.size == "96x64" and result.output_format == "png"  # what was made
    assert result.usage is None  # Stability reports none
    sent = upstream.last
    assert sent.method == "POST" and sent.path == GENERATE + "ultra"
    assert sent.header("authorization") == f"Bearer {PROVIDER_KEY}"
    assert sent.header("accept") == "image/*"
    assert (sent.header("content-type") or "").startswith("multipart/form-data; boundary=")
    assert sent.parts == [("prompt", None, b"a red fox"), ("aspect_ratio", None, b"3:2")]
    no_secrets(upstream)


def test_a_stream_ends_with_the_completed_event(
    upstream: UpstreamDouble, provider_proxy: Start
) -> None:
    image = png(64, 64)
    upstream.answer = stability_image(image)
    url = provider_proxy([stability_member(upstream)])
    events = list(client(url).images.generate(model="core", prompt="a fox", stream=True))
    assert [event.type for event in events] == ["image_generation.completed"]
    assert base64.b64decode(events[0].b64_json) == image
    assert events[0].size == "64x64"


def test_n_images_are_n_calls(upstream: UpstreamDouble, provider_proxy: Start) -> None:
    upstream.answer = stability_image(png(32, 32))
    url = provider_proxy([stability_member(upstream)])
    result = client(url).images.generate(model="core", prompt="foxes", n=2)
    assert result.data is not None and len(result.data) == 2
    assert all(decoded_size(one.b64_json or "") == (32, 32) for one in result.data)
    assert len(upstream.requests) == 2
    assert all(sent.fields == {"prompt": "foxes"} for sent in upstream.requests)


def test_a_prompt_is_sent_as_it_is(upstream: UpstreamDouble, provider_proxy: Start) -> None:
    prompt = 'a "quoted" fox\r\n--not-a-boundary\r\n\u00e9t\u00e9 \U0001f98a'
    upstream.answer = stability_image()
    url = provider_proxy([stability_member(upstream)])
    client(url).images.generate(model="core", prompt=prompt)
    assert upstream.last.fields == {"prompt": prompt}


@pytest.mark.parametrize(
    ("model", "path", "sent_model"),
    [
        ("ultra", "ultra", None),
        ("stable-image-ultra", "ultra", None),
        ("core", "core", None),
        ("stable-image-core", "core", None),
        ("sd3.5-large", "sd3", "sd3.5-large"),
        ("sd3.5-large-turbo", "sd3", "sd3.5-large-turbo"),
        ("sd3.5-medium", "sd3", "sd3.5-medium"),
        ("sd3.5-flash", "sd3", "sd3.5-flash"),
        ("sd3-large", "sd3", "sd3-large"),
    ],
)
def test_the_model_picks_the_service(
    upstream: UpstreamDouble,
    provider_proxy: Start,
    model: str,
    path: str,
    sent_model: str | None,
) -> None:
    upstream.answer = stability_image()
    url = provider_proxy([stability_member(upstream)])
    client(url).images.generate(model=model, prompt="p")
    assert upstream.last.path == GENERATE + path
    assert upstream.last.fields.get("model") == sent_model


def test_the_configured_model_serves_a_request_naming_none(
    upstream: UpstreamDouble, provider_proxy: Start
) -> None:
    upstream.answer = stability_image()
    url = provider_proxy([stability_member(upstream, model="sd3.5-medium")])
    assert generate(url).status_code == 200
    assert upstream.last.path == GENERATE + "sd3"
    assert upstream.last.fields == {"prompt": "p", "model": "sd3.5-medium"}


def test_model_map_names_the_providers_model(
    upstream: UpstreamDouble, provider_proxy: Start
) -> None:
    upstream.answer = stability_image()
    member = stability_member(upstream, models=["house"], model_map={"house": "sd3.5-large"})
    url = provider_proxy([member])
    client(url).images.generate(model="house", prompt="p")
    assert upstream.last.path == GENERATE + "sd3"
    assert upstream.last.fields["model"] == "sd3.5-large"


@pytest.mark.parametrize("model", ["dall-e-3", "stable-diffusion-xl", "../ultra"])
def test_an_unknown_model_is_a_400_naming_the_known_ones(
    upstream: UpstreamDouble, provider_proxy: Start, model: str
) -> None:
    url = provider_proxy([stability_member(upstream)])
    answer = generate(url, model=model)
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert error["param"] == "model"
    assert upstream.requests == []


def test_the_unknown_model_message_lists_the_known_ones(
    upstream: UpstreamDouble, provider_proxy: Start
) -> None:
    url = provider_proxy([stability_member(upstream)])
    message = generate(url, model="dall-e-3").json()["error"]["message"]
    assert "stable-image-ultra" in message and "sd3.5-large-turbo" in message


@pytest.mark.parametrize(
    ("size", "aspect"),
    [
        ("1024x1024", "1:1"),
        ("1536x1024", "3:2"),
        ("1024x1536", "2:3"),
        ("1920x1080", "16:9"),
        ("1080x1920", "9:16"),
        ("2100x900", "21:9"),
        ("900x2100", "9:21"),
        ("1024x1280", "4:5"),
        ("1280x1024", "5:4"),
        ("auto", None),
        (None, None),
    ],
)
def test_sizes_map_to_aspect_ratios(
    upstream: UpstreamDouble, provider_proxy: Start, size: str | None, aspect: str | None
) -> None:
    upstream.answer = stability_image()
    url = provider_proxy([stability_member(upstream)])
    assert generate(url, model="core", **({"size": size} if size else {})).status_code == 200
    assert upstream.last.fields.get("aspect_ratio") == aspect


@pytest.mark.parametrize("output_format", ["png", "jpeg", "webp"])
def test_output_format_is_sent(
    upstream: UpstreamDouble, provider_proxy: Start, output_format: str
) -> None:
    upstream.answer = stability_image()
    url = provider_proxy([stability_member(upstream)])
    assert generate(url, model="ultra", output_format=output_format).status_code == 200
    assert upstream.last.fields["output_format"] == output_format


@pytest.mark.parametrize(
    ("model", "asked", "param"),
    [
        ("core", {"size": "1000x700"}, "size"),
        ("core", {"size": "1792x1024"}, "size"),  # 7:4: no exact ratio
        ("core", {"size": "1024x768"}, "size"),  # 4:3: Stability has none
        ("core", {"size": "big"}, "size"),
        ("core", {"output_format": "gif"}, "output_format"),
        ("sd3.5-large", {"output_format": "webp"}, "output_format"),
        ("core", {"quality": "high"}, "quality"),
        ("core", {"quality": "low"}, "quality"),
        ("core", {"quality": "medium"}, "quality"),
        ("core", {"output_compression": 50}, "output_compression"),
        ("core", {"background": "transparent"}, "background"),
        ("core", {"response_format": "url"}, "response_format"),
        ("core", {"n": 11}, "n"),
        ("core", {"prompt": "x" * 10_001}, "prompt"),
    ],
)
def test_what_stability_cannot_do_is_a_400_naming_the_param(
    upstream: UpstreamDouble,
    provider_proxy: Start,
    model: str,
    asked: dict[str, Any],
    param: str,
) -> None:
    url = provider_proxy([stability_member(upstream)])
    answer = generate(url, model=model, **asked)
    assert answer.status_code == 400
    assert answer.json()["error"]["param"] == param
    assert upstream.requests == []  # refused before anything was sent


def test_quality_auto_is_accepted(upstream: UpstreamDouble, provider_proxy: Start) -> None:
    upstream.answer = stability_image()
    url = provider_proxy([stability_member(upstream)])
    assert generate(url, model="core", quality="auto").status_code == 200
    assert upstream.last.fields == {"prompt": "p"}


def test_edits_are_not_served(upstream: UpstreamDouble, provider_proxy: Start) -> None:
    url = provider_proxy([stability_member(upstream)])
    with pytest.raises(openai.NotFoundError):
        client(url).images.edit(model="core", prompt="p", image=("a.png", png(), "image/png"))
    assert upstream.requests == []


# --- what Stability refuses ------------------------------------------------------------------


def test_a_filtered_image_is_a_content_policy_violation_and_not_returned(
    upstream: UpstreamDouble, provider_proxy: Start
) -> None:
    image = png(48, 48)
    upstream.answer = stability_image(image, finish="CONTENT_FILTERED")
    url = provider_proxy([stability_member(upstream)])
    answer = generate(url, model="core")
    assert answer.status_code == 400
    assert answer.json()["error"]["code"] == "content_policy_violation"
    assert answer.headers["x-should-retry"] == "false"
    assert b64(image)[:40] not in answer.text


def test_a_filtered_image_through_the_sdk_is_a_bad_request(
    upstream: UpstreamDouble, provider_proxy: Start
) -> None:
    upstream.answer = stability_image(finish="CONTENT_FILTERED")
    url = provider_proxy([stability_member(upstream)])
    with pytest.raises(openai.BadRequestError) as caught:
        client(url).images.generate(model="ultra", prompt="p")
    assert caught.value.code == "content_policy_violation"


def test_of_n_images_the_filtered_one_is_left_out(
    upstream: UpstreamDouble, provider_proxy: Start
) -> None:
    good = png(40, 30)
    answers = [stability_image(good), stability_image(png(41, 31), finish="CONTENT_FILTERED")]

    async def answer(x: Exchange) -> None:
        await answers[len(upstream.requests) - 1](x)

    upstream.answer = answer
    url = provider_proxy([stability_member(upstream)])
    result = client(url).images.generate(model="core", prompt="p", n=2)
    assert result.data is not None
    assert [base64.b64decode(one.b64_json or "") for one in result.data] == [good]


@pytest.mark.parametrize(
    ("status", "name", "headers", "expected", "code"),
    [
        (400, "bad_request", [], 400, "invalid_request"),
        (401, "unauthorized", [], 502, "upstream_auth_failed"),
        (402, "payment_required", [], 429, "insufficient_quota"),
        (403, "content_moderation", [], 400, "content_policy_violation"),
        (403, "forbidden", [], 502, "upstream_auth_failed"),
        (413, "payload_too_large", [], 400, "invalid_request"),
        (422, "invalid_language", [], 400, "invalid_request"),
        (429, "rate_limit_exceeded", [("retry-after", "7")], 429, "rate_limit_exceeded"),
        (500, "internal_error", [], 500, "upstream_error"),
    ],
)
def test_stabilitys_errors_are_mapped(
    upstream: UpstreamDouble,
    provider_proxy: Start,
    status: int,
    name: str,
    headers: list[tuple[str, str]],
    expected: int,
    code: str,
) -> None:
    words = ["the provider's own words", "and more of them"]
    upstream.answer = stability_error(status, name, words, headers)
    url = provider_proxy([stability_member(upstream)])
    answer = generate(url, model="core")
    assert answer.status_code == expected
    error = answer.json()["error"]
    assert error["code"] == code
    assert PROVIDER_KEY not in answer.text
    if expected == 400:
        assert "the provider's own words; and more of them" in error["message"]
    if code in ("content_policy_violation", "insufficient_quota"):
        assert answer.headers["x-should-retry"] == "false"
    if status == 429:
        assert answer.headers["retry-after"] == "7"


def test_a_moderated_prompt_says_why(upstream: UpstreamDouble, provider_proxy: Start) -> None:
    words = ["Your request was flagged by our content moderation system"]
    upstream.answer = stability_error(403, "content_moderation", words)
    url = provider_proxy([stability_member(upstream)])
    with pytest.raises(openai.BadRequestError) as caught:
        client(url).images.generate(model="core", prompt="p")
    assert caught.value.code == "content_policy_violation"
    assert "flagged by our content moderation" in caught.value.message


@pytest.mark.parametrize(
    ("answer", "images"),
    [
        (stability_image(finish="CONTENT_FILTERED"), 1),  # made, so paid for
        (stability_error(403, "content_moderation", ["flagged"]), 0),  # refused up front
    ],
)
def test_a_filtered_image_counts_as_spent_and_a_moderated_prompt_does_not(
    upstream: UpstreamDouble,
    provider_proxy: Start,
    caplog: pytest.LogCaptureFixture,
    answer: Answer,
    images: int,
) -> None:
    caplog.set_level(logging.INFO, logger="imagegen_proxy.access")
    upstream.answer = answer
    url = provider_proxy([stability_member(upstream)])
    assert generate(url, model="core").status_code == 400
    until(lambda: any(r.name == "imagegen_proxy.access" for r in caplog.records), 10)
    [line] = [json.loads(r.getMessage()) for r in caplog.records if r.name.endswith("access")]
    assert line["images"] == images


def test_an_answer_that_is_not_an_image_is_a_502(
    upstream: UpstreamDouble, provider_proxy: Start
) -> None:
    upstream.answer = stability_image(b"<html>oops</html>", content_type="text/html")
    url = provider_proxy([stability_member(upstream)])
    answer = generate(url, model="core")
    assert answer.status_code == 502
    assert answer.json()["error"]["code"] == "upstream_error"


# --- large images and JSON answers ---------------------------------------------------------


def test_a_4mb_image_streams_byte_exact(upstream: UpstreamDouble, provider_proxy: Start) -> None:
    image = png(1024, 1024, pad_to=4 * 1024 * 1024)
    assert len(image) >= 4 * 1024 * 1024
    upstream.answer = stability_image(image, chunk=65536)
    url = provider_proxy([stability_member(upstream)])
    result = client(url, timeout=60).images.generate(model="ultra", prompt="p")
    assert result.data is not None
    assert base64.b64decode(result.data[0].b64_json or "") == image
    assert result.size == "1024x1024"
    events = list(client(url, timeout=60).images.generate(model="ultra", prompt="p", stream=True))
    assert base64.b64decode(events[-1].b64_json) == image


def test_a_json_answer_works_too(upstream: UpstreamDouble, provider_proxy: Start) -> None:
    image = png(80, 60, pad_to=200_000)
    upstream.answer = stability_json(image)
    url = provider_proxy([stability_member(upstream)])
    result = client(url).images.generate(model="sd3.5-large", prompt="p")
    assert result.data is not None
    assert base64.b64decode(result.data[0].b64_json or "") == image
    assert result.size == "80x60"
    events = list(client(url).images.generate(model="core", prompt="p", stream=True))
    assert base64.b64decode(events[-1].b64_json) == image


def test_a_json_answer_filtered_up_front_is_a_clean_refusal(
    upstream: UpstreamDouble, provider_proxy: Start
) -> None:
    upstream.answer = stability_json(finish="CONTENT_FILTERED", finish_first=True)
    url = provider_proxy([stability_member(upstream)])
    answer = generate(url, model="core")
    assert answer.status_code == 400
    assert answer.json()["error"]["code"] == "content_policy_violation"


def test_a_json_answer_filtered_after_its_image_fails_the_answer(
    upstream: UpstreamDouble, provider_proxy: Start
) -> None:
    # The image came first and went on as it came: the answer can only be cut short, so
    # that no client reads it as a whole answer.
    upstream.answer = stability_json(png(80, 60, pad_to=300_000), finish="CONTENT_FILTERED")
    url = provider_proxy([stability_member(upstream)])
    body = bytearray()
    asked = {"model": "core", "prompt": "p"}
    with (
        pytest.raises(httpx.RemoteProtocolError),
        httpx.stream("POST", url + "/v1/images/generations", json=asked) as answer,
    ):
        for chunk in answer.iter_bytes():
            body += chunk
    with pytest.raises(ValueError):
        json.loads(body)


def test_the_clients_key_never_reaches_stability(
    upstream: UpstreamDouble, provider_proxy: Start
) -> None:
    upstream.answer = stability_image()
    url = provider_proxy([stability_member(upstream)])
    client(url).images.generate(model="core", prompt="p", n=2)
    assert len(upstream.requests) == 2
    for sent in upstream.requests:
        assert sent.header("authorization") == f"Bearer {PROVIDER_KEY}"
        assert CLIENT_KEY not in (sent.header("authorization") or "")
    no_secrets(upstream)


@pytest.mark.parametrize(
    ("model", "dollars"),
    [
        ("ultra", 0.08),
        ("stable-image-ultra", 0.08),
        ("core", 0.03),
        ("stable-image-core", 0.03),
        ("sd3.5-large", 0.065),
        ("sd3.5-large-turbo", 0.04),
        ("sd3.5-medium", 0.035),
    ],
)
@pytest.mark.parametrize("size", [None, "1024x1024", "1536x1024", "auto"])
def test_each_model_is_priced_per_image_whatever_its_size(
    model: str, dollars: float, size: str | None
) -> None:
    body = {"prompt": "p", "model": model, "n": 2} | ({"size": size} if size else {})
    request = ImageRequest(form="openai", body=ImageGenerationBody.model_validate(body))
    price = Prices().get(model)
    assert price is not None and price.per_image
    assert price.estimate(request) == price.cost(request, None) == round(2 * dollars * 1e6)
