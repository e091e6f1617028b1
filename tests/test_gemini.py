"""Gemini image models as an upstream kind, driven by the official SDK through the proxy."""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest
from double import UpstreamDouble
from providers import (
    PROVIDER_KEY,
    client,
    decoded_size,
    gemini_blocked,
    gemini_image,
    gemini_member,
    google_error,
    no_secrets,
    png,
)

Start = Callable[..., str]
MODEL = "gemini-3.1-flash-image"


def test_a_generation_answers_openais_images_response(
    upstream: UpstreamDouble, provider_proxy: Start
) -> None:
    image = png(96, 64)
    upstream.answer = gemini_image(image)
    url = provider_proxy([gemini_member(upstream)])
    result = client(url).images.generate(model=MODEL, prompt="a red fox", size="1536x1024")
    assert result.data is not None and result.data[0].b64_json is not None
    assert base64.b64decode(result.data[0].b64_json) == image
    assert result.size == "96x64" and result.output_format == "png"  # what was made
    assert result.usage is not None
    assert (result.usage.input_tokens, result.usage.output_tokens) == (12, 1120)
    sent = upstream.last
    assert sent.path == f"/v1beta/models/{MODEL}:generateContent"
    assert sent.header("x-goog-api-key") == PROVIDER_KEY
    assert sent.header("authorization") is None
    assert sent.json == {
        "contents": [{"role": "user", "parts": [{"text": "a red fox"}]}],
        "generationConfig": {
            "responseModalities": ["IMAGE"],
            "imageConfig": {"aspectRatio": "3:2"},
        },
    }
    no_secrets(upstream)


def test_a_stream_ends_with_the_completed_event(
    upstream: UpstreamDouble, provider_proxy: Start
) -> None:
    image = png(64, 64)
    upstream.answer = gemini_image(image)
    url = provider_proxy([gemini_member(upstream)])
    events = list(client(url).images.generate(model=MODEL, prompt="a fox", stream=True))
    assert [event.type for event in events] == ["image_generation.completed"]
    assert base64.b64decode(events[0].b64_json) == image
    assert events[0].usage.output_tokens == 1120


def test_n_images_are_n_calls(upstream: UpstreamDouble, provider_proxy: Start) -> None:
    upstream.answer = gemini_image(png(32, 32), image_tokens=1000)
    url = provider_proxy([gemini_member(upstream)])
    result = client(url).images.generate(model=MODEL, prompt="foxes", n=3)
    assert result.data is not None and len(result.data) == 3
    assert all(decoded_size(one.b64_json or "") == (32, 32) for one in result.data)
    assert len(upstream.requests) == 3
    assert result.usage is not None and result.usage.output_tokens == 3000


@pytest.mark.parametrize(
    ("size", "quality", "config"),
    [
        ("1024x1024", None, {"aspectRatio": "1:1"}),
        ("1024x1536", None, {"aspectRatio": "2:3"}),
        ("1600x900", None, {"aspectRatio": "16:9"}),
        ("2048x2048", None, {"aspectRatio": "1:1", "imageSize": "2K"}),
        ("4096x4096", None, {"aspectRatio": "1:1", "imageSize": "4K"}),
        ("1024x1024", "high", {"aspectRatio": "1:1", "imageSize": "2K"}),
        ("auto", "low", None),
        (None, None, None),
    ],
)
def test_sizes_map_to_aspect_ratios_and_tiers(
    upstream: UpstreamDouble,
    provider_proxy: Start,
    size: str | None,
    quality: str | None,
    config: dict[str, str] | None,
) -> None:
    upstream.answer = gemini_image()
    url = provider_proxy([gemini_member(upstream)])
    asked: dict[str, Any] = {"model": MODEL, "prompt": "p"}
    asked |= {"size": size} if size else {}
    asked |= {"quality": quality} if quality else {}
    client(url).images.generate(**asked)
    assert upstream.last.json["generationConfig"].get("imageConfig") == config


@pytest.mark.parametrize(
    ("asked", "param"),
    [
        ({"size": "1000x700"}, "size"),
        ({"size": "1792x1024"}, "size"),  # 7:4, dall-e-3's: no exact ratio
        ({"size": "big"}, "size"),
        ({"output_format": "jpeg"}, "output_format"),
        ({"output_compression": 50}, "output_compression"),
        ({"background": "transparent"}, "background"),
        ({"response_format": "url"}, "response_format"),
    ],
)
def test_what_gemini_cannot_do_is_a_400_naming_the_param(
    upstream: UpstreamDouble, provider_proxy: Start, asked: dict[str, Any], param: str
) -> None:
    url = provider_proxy([gemini_member(upstream)])
    with pytest.raises(openai.BadRequestError) as caught:
        client(url).images.generate(model=MODEL, prompt="p", **asked)
    assert caught.value.param == param
    assert upstream.requests == []  # refused before anything was sent


@pytest.mark.parametrize("prompt", [True, False])
def test_a_blocked_request_is_a_content_policy_violation(
    upstream: UpstreamDouble, provider_proxy: Start, prompt: bool
) -> None:
    upstream.answer = gemini_blocked(
        "IMAGE_SAFETY" if not prompt else "PROHIBITED_CONTENT", prompt=prompt
    )
    url = provider_proxy([gemini_member(upstream)])
    answer = httpx.post(url + "/v1/images/generations", json={"model": MODEL, "prompt": "p"})
    assert answer.status_code == 400
    assert answer.json()["error"]["code"] == "content_policy_violation"
    assert answer.headers["x-should-retry"] == "false"


@pytest.mark.parametrize(
    ("status", "grpc", "headers", "expected", "code"),
    [
        (429, "RESOURCE_EXHAUSTED", [("retry-after", "7")], 429, "rate_limit_exceeded"),
        (400, "INVALID_ARGUMENT", [], 400, "invalid_request"),
        (403, "PERMISSION_DENIED", [], 502, "upstream_auth_failed"),
        (401, "UNAUTHENTICATED", [], 502, "upstream_auth_failed"),
        (500, "INTERNAL", [], 500, "upstream_error"),
        (503, "UNAVAILABLE", [], 503, "upstream_error"),
    ],
)
def test_googles_errors_are_mapped(
    upstream: UpstreamDouble,
    provider_proxy: Start,
    status: int,
    grpc: str,
    headers: list[tuple[str, str]],
    expected: int,
    code: str,
) -> None:
    upstream.answer = google_error(status, grpc, "the provider's own words", headers)
    url = provider_proxy([gemini_member(upstream)])
    answer = httpx.post(url + "/v1/images/generations", json={"model": MODEL, "prompt": "p"})
    assert answer.status_code == expected
    error = answer.json()["error"]
    assert error["code"] == code
    assert PROVIDER_KEY not in answer.text
    if status == 429:
        assert answer.headers["retry-after"] == "7"


def test_model_map_names_the_providers_model(
    upstream: UpstreamDouble, provider_proxy: Start
) -> None:
    upstream.answer = gemini_image()
    member = gemini_member(upstream, models=["house-style"], model_map={"house-style": MODEL})
    url = provider_proxy([member])
    client(url).images.generate(model="house-style", prompt="p")
    assert upstream.last.path == f"/v1beta/models/{MODEL}:generateContent"


@pytest.mark.parametrize("model", ["../admin", "a/b", "x y", "m?q=1"])
def test_a_model_name_never_builds_a_path(
    upstream: UpstreamDouble, provider_proxy: Start, model: str
) -> None:
    url = provider_proxy([gemini_member(upstream)])
    answer = httpx.post(url + "/v1/images/generations", json={"model": model, "prompt": "p"})
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "model"
    assert upstream.requests == []


def test_an_edit_sends_its_images_inline(upstream: UpstreamDouble, provider_proxy: Start) -> None:
    made, given, second = png(40, 30), png(300, 200, pad_to=400_000), png(20, 20)
    upstream.answer = gemini_image(made)
    url = provider_proxy([gemini_member(upstream)])
    result = client(url).images.edit(
        model=MODEL,
        image=[("in.png", given, "image/png"), ("two.png", second, "image/png")],
        prompt="make it blue",
        size="1024x1024",
        n=2,
    )
    assert result.data is not None and len(result.data) == 2
    assert base64.b64decode(result.data[1].b64_json or "") == made
    assert len(upstream.requests) == 2  # one image a call, each with the inputs
    for sent in upstream.requests:
        parts = sent.json["contents"][0]["parts"]
        assert parts[0] == {"text": "make it blue"}
        assert [base64.b64decode(p["inlineData"]["data"]) for p in parts[1:]] == [given, second]
        assert {p["inlineData"]["mimeType"] for p in parts[1:]} == {"image/png"}
        assert sent.json["generationConfig"]["imageConfig"] == {"aspectRatio": "1:1"}
    no_secrets(upstream)


def test_an_edit_streams_the_edit_event(upstream: UpstreamDouble, provider_proxy: Start) -> None:
    upstream.answer = gemini_image(png(16, 16))
    url = provider_proxy([gemini_member(upstream)])
    events = list(
        client(url).images.edit(
            model=MODEL, image=("in.png", png(), "image/png"), prompt="p", stream=True
        )
    )
    assert [event.type for event in events] == ["image_edit.completed"]


@pytest.mark.parametrize(
    ("files", "param"),
    [
        ({"image": ("in.png", png(), "image/png"), "mask": ("m.png", png(), "image/png")}, "mask"),
        ({"image": ("in.gif", b"GIF89a...", "image/gif")}, "image"),
        (
            {"image": ("in.png", png(), "image/png"), "background": (None, "transparent")},
            "background",
        ),
    ],
)
def test_what_a_gemini_edit_cannot_take_is_a_400(
    upstream: UpstreamDouble, provider_proxy: Start, files: dict[str, Any], param: str
) -> None:
    url = provider_proxy([gemini_member(upstream)])
    answer = httpx.post(url + "/v1/images/edits", data={"model": MODEL, "prompt": "p"}, files=files)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == param
    assert upstream.requests == []


def test_geminis_models_are_priced_by_their_tokens(
    upstream: UpstreamDouble, provider_proxy: Start
) -> None:
    from imagegen_proxy.governance.pricing import Prices

    for model in ("gemini-3.1-flash-image", "gemini-3-pro-image"):
        price = Prices().get(model)
        assert price is not None and not price.per_image
    upstream.answer = gemini_image(prompt_tokens=10, image_tokens=1120)
    url = provider_proxy([gemini_member(upstream)])
    answer = httpx.post(url + "/v1/images/generations", json={"model": MODEL, "prompt": "p"})
    assert answer.status_code == 200
    # 10 input tokens at $0.50/1M and 1120 image tokens at $60/1M: $0.067205.
    assert answer.json()["usage"]["output_tokens_details"]["image_tokens"] == 1120


def service_account(path: Any, token_uri: str) -> None:
    """A service account's key file, with a key made for the test, its tokens from
    `token_uri`."""
    import json

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    path.write_text(
        json.dumps(
            {
                "type": "service_account",
                "project_id": "image-team",
                "private_key_id": "k1",
                "private_key": pem,
                "client_email": "gateway@image-team.iam.gserviceaccount.com",
                "client_id": "1",
                "token_uri": token_uri,
            }
        )
    )


def test_vertex_ai_with_a_service_accounts_token(
    upstream: UpstreamDouble,
    provider_proxy: Start,
    tmp_path: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    import json
    import logging

    from double import Exchange

    image = gemini_image(png(24, 24))

    async def answer(x: Exchange) -> None:
        if x.request.path == "/token":
            body = json.dumps(
                {
                    "access_token": "ya29.vertex-token-secret",
                    "expires_in": 3600,
                    "token_type": "Bearer",
                }
            ).encode()
            await x.start(200, [("content-type", "application/json")])
            await x.body(body, more=False)
        else:
            await image(x)

    upstream.answer = answer
    keyfile = tmp_path / "sa.json"
    service_account(keyfile, upstream.url + "/token")
    member = gemini_member(
        upstream,
        api_key=None,
        vertex_project="image-team",
        vertex_location="us-central1",
        credentials_file=str(keyfile),
    )
    url = provider_proxy([member])
    caplog.set_level(logging.DEBUG)
    for _ in range(2):
        client(url).images.generate(model=MODEL, prompt="p")
    calls = [r for r in upstream.requests if r.path != "/token"]
    assert [r.path for r in upstream.requests].count("/token") == 1  # kept until near expiry
    assert calls[0].path == (
        "/v1/projects/image-team/locations/us-central1/publishers/google/models/"
        f"{MODEL}:generateContent"
    )
    assert all(r.header("authorization") == "Bearer ya29.vertex-token-secret" for r in calls)
    assert all(r.header("x-goog-api-key") is None for r in calls)
    assert "ya29.vertex-token-secret" not in caplog.text


def test_n_images_answer_those_made_when_some_calls_fail(
    upstream: UpstreamDouble, provider_proxy: Start
) -> None:
    from double import Exchange

    made, refused = gemini_image(png(8, 8)), google_error(500, "INTERNAL", "oops")
    calls: list[int] = []

    async def answer(x: Exchange) -> None:
        calls.append(1)
        await (refused if len(calls) == 2 else made)(x)

    upstream.answer = answer
    url = provider_proxy([gemini_member(upstream)])
    result = client(url).images.generate(model=MODEL, prompt="p", n=3)
    assert result.data is not None and len(result.data) == 2  # what was paid for is not lost
    assert result.usage is not None and result.usage.output_tokens == 2 * 1120


def test_n_images_all_refused_answer_the_refusal(
    upstream: UpstreamDouble, provider_proxy: Start
) -> None:
    upstream.answer = gemini_blocked()
    url = provider_proxy([gemini_member(upstream)])
    with pytest.raises(openai.BadRequestError) as caught:
        client(url).images.generate(model=MODEL, prompt="p", n=2)
    assert caught.value.code == "content_policy_violation"


def test_n_streamed_images_are_n_completed_events(
    upstream: UpstreamDouble, provider_proxy: Start
) -> None:
    upstream.answer = gemini_image(png(8, 8))
    url = provider_proxy([gemini_member(upstream)])
    events = list(client(url).images.generate(model=MODEL, prompt="p", n=2, stream=True))
    assert [e.type for e in events] == ["image_generation.completed"] * 2
    assert all(decoded_size(e.b64_json) == (8, 8) for e in events)
    assert sum(e.usage.output_tokens for e in events) == 2 * 1120
