"""The mock's other providers' wires (Gemini, Black Forest Labs, Stability, Bedrock) over
real sockets: the happy paths with their PNGs read back, each error shape, the credentials
refused, BFL's submit-poll-download flow, and Bedrock signed by botocore."""

from __future__ import annotations

import base64
import json
import struct
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from starlette.applications import Starlette
from starlette.routing import Mount
from support import serve
from test_mock import Recorder

from imagegen_proxy.mock import MockUpstream, decode_png, encode_rgba
from imagegen_proxy.mock.edit import COLOURS
from imagegen_proxy.mock.providers import sigv4
from imagegen_proxy.mock.providers.bedrock import ACCESS_KEY_ID

KEY = "mock-provider-key-0123456789"
GEMINI = "/v1beta/models/gemini-3.1-flash-image:generateContent"
VERTEX = (
    "/v1/projects/demo/locations/us-central1/publishers/google/models/gemini-3-pro-image"
    ":generateContent"
)
STABILITY = "/v2beta/stable-image/generate/"
NOVA = "/model/amazon.nova-canvas-v1%3A0/invoke"
RED = COLOURS["red"]


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    with serve(MockUpstream(api_key=KEY)) as base:
        yield base


@pytest.fixture(scope="module")
def slow_url() -> Iterator[str]:
    with serve(MockUpstream(api_key=KEY, delay=0.3)) as base:
        yield base


@pytest.fixture(scope="module")
def padded_url() -> Iterator[str]:
    with serve(MockUpstream(pad_to=300_000)) as base:
        yield base


def png_size(data: bytes) -> tuple[int, int]:
    """A PNG's size from its IHDR, after checking the mock's own decoder reads it whole."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    bitmap = decode_png(data)
    assert bitmap is not None
    width, height = struct.unpack(">II", data[16:24])
    assert (bitmap.width, bitmap.height) == (width, height)
    return width, height


def solid_png(width: int, height: int, pixel: tuple[int, int, int, int]) -> bytes:
    return encode_rgba(width, height, bytes(pixel) * (width * height))


def pixel(data: bytes, x: int, y: int) -> tuple[int, ...]:
    bitmap = decode_png(data)
    assert bitmap is not None
    at = 4 * (y * bitmap.width + x)
    return tuple(bitmap.rgba[at : at + 4])


# --- Gemini ----------------------------------------------------------------------------------


def gemini_body(prompt: str, **image_config: str) -> dict[str, Any]:
    config: dict[str, Any] = {"responseModalities": ["TEXT", "IMAGE"]}
    if image_config:
        config["imageConfig"] = image_config
    return {"contents": [{"role": "user", "parts": [{"text": prompt}]}], "generationConfig": config}


def gemini(base: str, body: Any, path: str = GEMINI, **headers: str) -> httpx.Response:
    return httpx.post(base + path, json=body, headers={"x-goog-api-key": KEY, **headers})


def inline_png(answer: dict[str, Any]) -> bytes:
    [candidate] = answer["candidates"]
    [blob] = [part["inlineData"] for part in candidate["content"]["parts"] if "inlineData" in part]
    assert blob["mimeType"] == "image/png"
    return base64.b64decode(blob["data"])


def test_gemini_answers_an_image_with_its_usage(url: str) -> None:
    prompt = "a lighthouse at dusk"
    response = gemini(url, gemini_body(prompt, aspectRatio="3:2", imageSize="1K"))
    assert response.status_code == 200
    answer = response.json()
    [candidate] = answer["candidates"]
    assert candidate["finishReason"] == "STOP"
    assert candidate["index"] == 0
    assert candidate["content"]["role"] == "model"
    assert candidate["content"]["parts"][0] == {"text": "Here is your image."}
    assert png_size(inline_png(answer)) == (1248, 832)
    prompt_tokens = len(prompt) // 4 + 1
    assert answer["usageMetadata"] == {
        "promptTokenCount": prompt_tokens,
        "candidatesTokenCount": 1120,
        "totalTokenCount": prompt_tokens + 1120,
        "candidatesTokensDetails": [{"modality": "IMAGE", "tokenCount": 1120}],
    }
    assert answer["modelVersion"] == "gemini-3.1-flash-image"
    assert answer["responseId"]


@pytest.mark.parametrize(
    ("ratio", "size", "expected", "tokens"),
    [
        ("1:1", "1K", (1024, 1024), 1120),
        ("16:9", "1K", (1360, 768), 1120),
        ("1:1", "2K", (2048, 2048), 1680),
        ("16:9", "4K", (2048, 1152), 2520),  # 4K is rendered at most 2048 a side
        ("1:8", "512", (176, 1456), 750),
    ],
)
def test_gemini_sizes_and_image_tokens(
    url: str, ratio: str, size: str, expected: tuple[int, int], tokens: int
) -> None:
    response = gemini(url, gemini_body("p", aspectRatio=ratio, imageSize=size))
    assert response.status_code == 200, response.text
    assert png_size(inline_png(response.json())) == expected
    assert response.json()["usageMetadata"]["candidatesTokenCount"] == tokens


def test_gemini_2_5_flash_image_counts_1290_tokens_and_refuses_the_newer_options(url: str) -> None:
    path = "/v1beta/models/gemini-2.5-flash-image:generateContent"
    response = gemini(url, gemini_body("p"), path)
    assert response.json()["usageMetadata"]["candidatesTokenCount"] == 1290
    for option in ({"aspectRatio": "1:8"}, {"imageSize": "512"}):
        response = gemini(url, gemini_body("p", **option), path)
        assert response.status_code == 400
        assert response.json()["error"]["status"] == "INVALID_ARGUMENT"


def test_gemini_modalities_choose_the_parts(url: str) -> None:
    body = gemini_body("p")
    body["generationConfig"]["responseModalities"] = ["IMAGE"]
    parts = gemini(url, body).json()["candidates"][0]["content"]["parts"]
    assert [set(part) for part in parts] == [{"inlineData"}]
    body["generationConfig"]["responseModalities"] = ["TEXT"]
    answer = gemini(url, body).json()
    parts = answer["candidates"][0]["content"]["parts"]
    assert [set(part) for part in parts] == [{"text"}]
    assert answer["usageMetadata"]["candidatesTokensDetails"][0]["modality"] == "TEXT"
    body["generationConfig"]["responseModalities"] = ["PICTURE"]
    assert gemini(url, body).json()["error"]["status"] == "INVALID_ARGUMENT"


def test_gemini_reads_proto_field_names_too(url: str) -> None:
    body = {
        "contents": [{"parts": [{"text": "p"}]}],
        "generation_config": {"image_config": {"aspect_ratio": "2:3"}},
    }
    response = gemini(url, body)
    assert png_size(inline_png(response.json())) == (832, 1248)


@pytest.mark.parametrize(
    "config",
    [{"aspectRatio": "7:3"}, {"aspectRatio": "1:8"}, {"imageSize": "1k"}, {"imageSize": "8K"}],
)
def test_gemini_refuses_sizes_it_does_not_offer(url: str, config: dict[str, str]) -> None:
    path = "/v1beta/models/gemini-3-pro-image:generateContent"
    response = gemini(url, gemini_body("p", **config), path)
    assert response.status_code == 400
    error = response.json()["error"]
    assert set(error) == {"code", "message", "status"}
    assert (error["code"], error["status"]) == (400, "INVALID_ARGUMENT")


def test_gemini_edits_an_inline_png_and_refuses_bad_base64(url: str) -> None:
    source = base64.b64encode(solid_png(8, 8, (255, 255, 255, 255))).decode()
    body = gemini_body("make it red")
    body["contents"][0]["parts"].append({"inlineData": {"mimeType": "image/png", "data": source}})
    image = inline_png(gemini(url, body).json())
    assert png_size(image) == (1024, 1024)
    assert pixel(image, 5, 5) == (255, 127, 127, 255)  # halfway from white to red
    body["contents"][0]["parts"][1]["inlineData"]["data"] = "not base64!"
    response = gemini(url, body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["status"] == "INVALID_ARGUMENT"
    assert "Base64 decoding failed" in error["message"]


def test_gemini_blocks_a_forbidden_prompt_and_withholds_an_unsafe_image(url: str) -> None:
    blocked = gemini(url, gemini_body("something forbidden")).json()
    assert "candidates" not in blocked
    assert blocked["promptFeedback"] == {"blockReason": "PROHIBITED_CONTENT"}
    assert blocked["usageMetadata"]["promptTokenCount"] >= 1
    unsafe = gemini(url, gemini_body("an unsafe scene")).json()
    [candidate] = unsafe["candidates"]
    assert candidate["finishReason"] == "IMAGE_SAFETY"
    assert "content" not in candidate


def test_gemini_api_key_is_checked_as_google_does(url: str) -> None:
    body = gemini_body("p")
    missing = httpx.post(url + GEMINI, json=body)
    assert missing.status_code == 403
    assert missing.json()["error"]["status"] == "PERMISSION_DENIED"
    wrong = gemini(url, body, **{"x-goog-api-key": "wrong"})
    assert wrong.status_code == 400
    error = wrong.json()["error"]
    assert error["status"] == "INVALID_ARGUMENT"
    assert error["details"][0]["reason"] == "API_KEY_INVALID"
    by_query = httpx.post(url + GEMINI, params={"key": KEY}, json=body)
    assert by_query.status_code == 200


def test_vertex_wants_a_bearer_token(url: str) -> None:
    body = gemini_body("p")
    bearer = {"authorization": f"Bearer {KEY}"}
    response = httpx.post(url + VERTEX, json=body, headers=bearer)
    assert response.status_code == 200
    assert response.json()["modelVersion"] == "gemini-3-pro-image"
    for headers in ({}, {"authorization": "Bearer wrong"}, {"x-goog-api-key": KEY}):
        refused = httpx.post(url + VERTEX, json=body, headers=headers)
        assert refused.status_code == 401
        assert refused.json()["error"] == {
            "code": 401,
            "message": refused.json()["error"]["message"],
            "status": "UNAUTHENTICATED",
        }
    beta = VERTEX.replace("/v1/", "/v1beta1/", 1)
    assert httpx.post(url + beta, json=body, headers=bearer).status_code == 200


def test_gemini_other_methods_and_text_models(url: str) -> None:
    count = gemini(url, gemini_body("p"), GEMINI.replace("generateContent", "countTokens"))
    assert count.status_code == 404
    assert count.json()["error"]["status"] == "NOT_FOUND"
    text_model = gemini(url, gemini_body("p"), "/v1beta/models/gemini-2.5-flash:generateContent")
    assert text_model.status_code == 400
    assert gemini(url, {"contents": []}).json()["error"]["status"] == "INVALID_ARGUMENT"
    assert gemini(url, [1]).status_code == 400


# --- Black Forest Labs -------------------------------------------------------------------------


def bfl(base: str, model: str, body: Any, key: str | None = KEY) -> httpx.Response:
    headers = {} if key is None else {"x-key": key}
    return httpx.post(f"{base}/v1/{model}", json=body, headers=headers)


def poll(polling_url: str, within: float = 5) -> dict[str, Any]:
    """Poll until the task is no longer Pending; at least one poll."""
    deadline = time.monotonic() + within
    while True:
        answer: dict[str, Any] = httpx.get(polling_url, headers={"x-key": KEY}).json()
        if answer["status"] != "Pending" or time.monotonic() > deadline:
            return answer
        time.sleep(0.05)


def test_bfl_submit_poll_download(slow_url: str) -> None:
    submitted = bfl(slow_url, "flux-pro-1.1", {"prompt": "a fox", "seed": 7})
    assert submitted.status_code == 200
    task = submitted.json()
    assert set(task) == {"id", "polling_url", "cost", "input_mp", "output_mp"}
    assert task["polling_url"] == f"{slow_url}/v1/get_result?id={task['id']}"
    assert (task["cost"], task["input_mp"], task["output_mp"]) == (4.0, 0.0, 0.79)
    pending = httpx.get(task["polling_url"], headers={"x-key": KEY}).json()
    assert pending["status"] == "Pending"
    assert pending["result"] is None
    assert 0 <= pending["progress"] < 1
    ready = poll(task["polling_url"])
    assert ready["status"] == "Ready"
    assert (ready["progress"], ready["details"]) == (None, None)
    result = ready["result"]
    assert (result["prompt"], result["seed"]) == ("a fox", 7)
    assert result["duration"] == pytest.approx(0.3)
    assert result["end_time"] - result["start_time"] == pytest.approx(0.3)
    sample = result["sample"]
    assert sample.startswith(f"{slow_url}/bfl/delivery/{task['id']}.png?sig=")
    image = httpx.get(sample)  # a signed URL: no key
    assert image.status_code == 200
    assert image.headers["content-type"] == "image/png"
    assert int(image.headers["content-length"]) == len(image.content)
    assert png_size(image.content) == (1024, 768)
    unsigned = sample.split("?")[0]
    assert httpx.get(unsigned).status_code == 403
    assert httpx.get(unsigned + "?sig=forged").status_code == 403


def test_bfl_sizes_by_model_family(url: str) -> None:
    cases = [
        ("flux-pro-1.1", {"width": 1440, "height": 256}, (1440, 256), 4.0),
        ("flux-kontext-pro", {"aspect_ratio": "16:9"}, (1360, 768), 4.0),
        ("flux-kontext-max", {}, (1024, 1024), 8.0),
        ("flux-pro-1.1-ultra", {}, (2736, 1536), 6.0),
        ("flux-2-pro", {"width": 1008, "height": 64}, (1008, 64), 4.0),
    ]
    for model, size, expected, cost in cases:
        task = bfl(url, model, {"prompt": "p", **size}).json()
        assert task["cost"] == cost
        assert task["output_mp"] == round(expected[0] * expected[1] / 1e6, 2)
        ready = poll(task["polling_url"])
        assert png_size(httpx.get(ready["result"]["sample"]).content) == expected, model


def test_bfl_validation_is_fastapis_422(url: str) -> None:
    missing = bfl(url, "flux-pro-1.1", {"width": 1024})
    assert missing.status_code == 422
    assert missing.json()["detail"] == [
        {"type": "missing", "loc": ["body", "prompt"], "msg": "Field required", "input": None}
    ]
    wrong = bfl(url, "flux-pro-1.1", {"prompt": "p", "width": 1000, "height": 2048})
    assert wrong.status_code == 422
    errors = {tuple(error["loc"]): error["type"] for error in wrong.json()["detail"]}
    assert errors == {("body", "width"): "multiple_of", ("body", "height"): "less_than_equal"}
    flux2 = bfl(url, "flux-2-pro", {"prompt": "p", "width": 1000})
    assert flux2.json()["detail"][0]["ctx"] == {"multiple_of": 16}
    ratio = bfl(url, "flux-kontext-pro", {"prompt": "p", "aspect_ratio": "4:1"})
    assert ratio.json()["detail"][0]["loc"] == ["body", "aspect_ratio"]
    jpeg = bfl(url, "flux-pro-1.1", {"prompt": "p", "output_format": "jpeg"})
    assert jpeg.status_code == 422
    assert "png only" in jpeg.json()["detail"][0]["msg"]
    webp = bfl(url, "flux-pro-1.1", {"prompt": "p", "output_format": "webp"})
    assert webp.json()["detail"][0]["type"] == "enum"
    tolerance = bfl(url, "flux-pro-1.1", {"prompt": "p", "safety_tolerance": 7})
    assert tolerance.json()["detail"][0]["loc"] == ["body", "safety_tolerance"]
    image = bfl(url, "flux-kontext-pro", {"prompt": "p", "input_image": "%%%"})
    assert image.json()["detail"][0]["loc"] == ["body", "input_image"]
    not_json = httpx.post(url + "/v1/flux-pro-1.1", content=b"{", headers={"x-key": KEY})
    assert not_json.json()["detail"][0]["type"] == "json_invalid"


def test_bfl_key_is_required_on_submit_and_poll(url: str) -> None:
    for key in (None, "wrong"):
        refused = bfl(url, "flux-pro-1.1", {"prompt": "p"}, key=key)
        assert refused.status_code == 401
        assert isinstance(refused.json()["detail"], str)
    task = bfl(url, "flux-pro-1.1", {"prompt": "p"}).json()
    assert httpx.get(task["polling_url"]).status_code == 401


def test_bfl_unknown_tasks_and_moderation(url: str) -> None:
    unknown = httpx.get(url + "/v1/get_result", params={"id": "nope"}, headers={"x-key": KEY})
    assert unknown.status_code == 200
    assert unknown.json() == {"id": "nope", "status": "Task not found"}
    no_id = httpx.get(url + "/v1/get_result", headers={"x-key": KEY})
    assert no_id.status_code == 422
    for prompt, status in (("forbidden", "Request Moderated"), ("unsafe", "Content Moderated")):
        task = bfl(url, "flux-pro-1.1", {"prompt": f"an {prompt} thing"}).json()
        answer = poll(task["polling_url"])
        assert (answer["status"], answer["result"]) == (status, None)
        assert httpx.get(f"{url}/bfl/delivery/{task['id']}.png?sig=x").status_code == 404


def test_bfl_kontext_edits_its_input_image(url: str) -> None:
    source = solid_png(64, 32, (255, 255, 255, 255))
    body = {"prompt": "make it red", "input_image": base64.b64encode(source).decode()}
    task = bfl(url, "flux-kontext-pro", body).json()
    assert task["input_mp"] == 0.0  # 2048 pixels, rounded
    image = httpx.get(poll(task["polling_url"])["result"]["sample"]).content
    assert png_size(image) == (1456, 720)  # the input's 2:1 at about 1 MP
    assert pixel(image, 3, 3) == (255, 127, 127, 255)


# --- Stability ---------------------------------------------------------------------------------


def stability(
    base: str,
    service: str,
    fields: dict[str, str],
    accept: str = "application/json",
    key: str | None = KEY,
    files: dict[str, bytes] | None = None,
) -> httpx.Response:
    headers = {"accept": accept}
    if key is not None:
        headers["authorization"] = f"Bearer {key}"
    # A file part forces multipart/form-data even for text-only requests, as clients send it.
    parts: dict[str, Any] = {"none": (None, "")} if files is None else dict(files)
    return httpx.post(base + STABILITY + service, data=fields, files=parts, headers=headers)


def test_stability_json_answer(url: str) -> None:
    response = stability(url, "core", {"prompt": "a cat", "aspect_ratio": "3:2", "seed": "42"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    answer = response.json()
    assert (answer["finish_reason"], answer["seed"]) == ("SUCCESS", 42)
    assert png_size(base64.b64decode(answer["image"])) == (1216, 832)


@pytest.mark.parametrize(
    ("ratio", "size"),
    [("1:1", (1024, 1024)), ("21:9", (1536, 640)), ("9:21", (640, 1536)), ("4:5", (896, 1120))],
)
def test_stability_image_answer(url: str, ratio: str, size: tuple[int, int]) -> None:
    response = stability(url, "ultra", {"prompt": "a cat", "aspect_ratio": ratio}, "image/*")
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    assert response.headers["finish-reason"] == "SUCCESS"
    assert int(response.headers["seed"]) > 0  # no seed sent: one is picked and reported
    assert png_size(response.content) == size


def test_stability_sd3_models_and_image_to_image(url: str) -> None:
    ok = stability(url, "sd3", {"prompt": "p", "model": "sd3.5-medium"})
    assert ok.status_code == 200
    bad = stability(url, "sd3", {"prompt": "p", "model": "sd9"})
    assert bad.status_code == 400
    assert bad.json()["errors"][0].startswith("model:")
    source = solid_png(40, 30, (255, 255, 255, 255))
    fields = {"prompt": "make it red", "mode": "image-to-image", "strength": "0.5"}
    edited = stability(url, "sd3", fields, "image/*", files={"image": source})
    assert png_size(edited.content) == (40, 30)
    assert pixel(edited.content, 1, 1) == (255, 127, 127, 255)
    no_strength = stability(url, "ultra", {"prompt": "p"}, files={"image": source})
    assert no_strength.status_code == 400


def test_stability_errors(url: str) -> None:
    as_json = httpx.post(
        url + STABILITY + "core",
        json={"prompt": "p"},
        headers={"authorization": f"Bearer {KEY}"},
    )
    assert as_json.status_code == 400
    body = as_json.json()
    assert set(body) == {"id", "name", "errors"}
    assert body["name"] == "bad_request"
    missing = stability(url, "core", {"aspect_ratio": "7:5"})
    assert missing.status_code == 400
    errors = missing.json()["errors"]
    assert [error.split(":")[0] for error in errors] == ["prompt", "aspect_ratio"]
    for fmt in ("jpeg", "webp"):
        refused = stability(url, "core", {"prompt": "p", "output_format": fmt})
        assert refused.status_code == 400
        assert "png only" in refused.json()["errors"][0]
    assert stability(url, "core", {"prompt": "p", "output_format": "gif"}).status_code == 400
    assert stability(url, "core", {"prompt": "p"}, accept="text/html").status_code == 400
    too_long = stability(url, "core", {"prompt": "x" * 10_001})
    assert too_long.status_code == 400


def test_stability_moderation(url: str) -> None:
    filtered = stability(url, "core", {"prompt": "unsafe"}, "image/*")
    assert filtered.status_code == 200
    assert filtered.headers["finish-reason"] == "CONTENT_FILTERED"
    png_size(filtered.content)
    assert stability(url, "core", {"prompt": "unsafe"}).json()["finish_reason"] == (
        "CONTENT_FILTERED"
    )
    blocked = stability(url, "core", {"prompt": "forbidden"})
    assert blocked.status_code == 403
    assert blocked.json()["name"] == "content_moderation"
    assert "content moderation" in blocked.json()["errors"][0]


def test_stability_key(url: str) -> None:
    for key in (None, "wrong"):
        refused = stability(url, "core", {"prompt": "p"}, key=key)
        assert refused.status_code == 401
        body = refused.json()
        assert body["name"] == "unauthorized"
        assert len(body["id"]) == 32


# --- Bedrock -----------------------------------------------------------------------------------


def nova_body(text: str = "a boat", **config: Any) -> bytes:
    body = {
        "taskType": "TEXT_IMAGE",
        "textToImageParams": {"text": text},
        "imageGenerationConfig": {"width": 512, "height": 768, "numberOfImages": 1, **config},
    }
    return json.dumps(body).encode()


def signed(
    base: str,
    body: bytes,
    *,
    path: str = NOVA,
    secret: str = KEY,
    access_key: str = ACCESS_KEY_ID,
    service: str = "bedrock",
) -> tuple[str, dict[str, str]]:
    request = AWSRequest(
        method="POST",
        url=base + path,
        data=body,
        headers={"content-type": "application/json", "accept": "application/json"},
    )
    SigV4Auth(Credentials(access_key, secret), service, "us-east-1").add_auth(request)
    return request.url, dict(request.headers.items())


def error_type(response: httpx.Response) -> str:
    """The error's type, without the namespace Bedrock's own errors carry after a colon."""
    kind, _, namespace = response.headers["x-amzn-errortype"].partition(":")
    assert namespace in ("", "http://internal.amazon.com/coral/com.amazon.bedrock/")
    return kind


def invoke(base: str, body: bytes, **signing: Any) -> httpx.Response:
    target, headers = signed(base, body, **signing)
    return httpx.post(target, content=body, headers=headers)


def test_bedrock_signed_by_botocore(url: str) -> None:
    response = invoke(url, nova_body(numberOfImages=2, seed=5, quality="premium"))
    assert response.status_code == 200, response.text
    assert response.headers["x-amzn-requestid"]
    images = [base64.b64decode(image) for image in response.json()["images"]]
    assert [png_size(image) for image in images] == [(512, 768), (512, 768)]
    assert images[0] != images[1]
    titan = "/model/amazon.titan-image-generator-v2:0/invoke"
    assert invoke(url, nova_body(), path=titan).status_code == 200


def test_bedrock_refuses_a_tampered_or_wrongly_signed_request(url: str) -> None:
    body = nova_body()
    target, headers = signed(url, body)
    tampered = httpx.post(target, content=nova_body("another boat"), headers=headers)
    assert tampered.status_code == 403
    assert tampered.headers["x-amzn-errortype"] == "InvalidSignatureException"
    assert tampered.json()["message"].startswith("The request signature we calculated")
    assert invoke(url, body, secret="wrong").status_code == 403
    service = invoke(url, body, service="s3")
    assert "correct service" in service.json()["message"]
    stranger = invoke(url, body, access_key="AKIDEXAMPLE")
    assert stranger.status_code == 403
    assert stranger.headers["x-amzn-errortype"] == "UnrecognizedClientException"
    unsigned = dict(headers, Authorization=headers["Authorization"].split(", Signature=")[0])
    incomplete = httpx.post(target, content=body, headers=unsigned)
    assert incomplete.status_code == 400
    assert incomplete.headers["x-amzn-errortype"] == "IncompleteSignatureException"
    for headers in ({}, {"authorization": f"AWS4-HMAC-SHA256 Credential={ACCESS_KEY_ID}/x"}):
        missing = httpx.post(url + NOVA, content=body, headers=headers)
        assert missing.status_code == 403
        assert missing.headers["x-amzn-errortype"] == "MissingAuthenticationTokenException"
        assert missing.json() == {"message": "Missing Authentication Token"}


def test_bedrock_api_key(url: str) -> None:
    ok = httpx.post(url + NOVA, content=nova_body(), headers={"authorization": f"Bearer {KEY}"})
    assert ok.status_code == 200
    wrong = httpx.post(url + NOVA, content=nova_body(), headers={"authorization": "Bearer no"})
    assert wrong.status_code == 403


def test_sigv4_time_window() -> None:
    body = b"{}"
    request = AWSRequest(method="POST", url="http://127.0.0.1:9/model/m/invoke", data=body)
    SigV4Auth(Credentials(ACCESS_KEY_ID, KEY), "bedrock", "eu-west-1").add_auth(request)
    headers = [(k.lower().encode(), v.encode()) for k, v in request.headers.items()]
    headers.append((b"host", b"127.0.0.1:9"))
    scope = {
        "method": "POST",
        "path": "/model/m/invoke",
        "raw_path": b"/model/m/invoke",
        "query_string": b"",
        "headers": headers,
    }
    amz_date = request.headers["X-Amz-Date"]
    credential = sigv4.parse_authorization(request.headers["Authorization"])
    assert credential.region == "eu-west-1"
    options: dict[str, Any] = {"secret": KEY, "service": "bedrock", "amz_date": amz_date}
    sigv4.verify(scope, body, credential, **options)
    with pytest.raises(sigv4.SignatureError, match="Signature expired"):
        sigv4.verify(scope, body, credential, now=time.time() + 600, **options)
    with pytest.raises(sigv4.SignatureError, match="not yet current"):
        sigv4.verify(scope, body, credential, now=time.time() - 600, **options)


@pytest.mark.parametrize(
    ("config", "text"),
    [
        ({"width": 5000}, "a boat"),
        ({"width": 1000}, "a boat"),
        ({"width": 320, "height": 2048}, "a boat"),  # 1:6.4
        ({"numberOfImages": 6}, "a boat"),
        ({"quality": "ultra"}, "a boat"),
        ({"cfgScale": 11}, "a boat"),
        ({}, "x" * 1025),
        ({}, ""),
    ],
)
def test_bedrock_validation(url: str, config: dict[str, Any], text: str) -> None:
    response = invoke(url, nova_body(text, **config))
    assert response.status_code == 400
    assert error_type(response) == "ValidationException"
    assert set(response.json()) == {"message"}


def test_bedrock_content_filter_throttling_and_models(url: str) -> None:
    blocked = invoke(url, nova_body("a forbidden boat"))
    assert blocked.status_code == 400
    assert blocked.json() == {"message": "This request has been blocked by our content filters."}
    throttled = invoke(url, nova_body("throttle me"))
    assert throttled.status_code == 429
    assert error_type(throttled) == "ThrottlingException"
    assert throttled.json()["message"].startswith("Too many requests")
    unknown = invoke(url, nova_body(), path="/model/anthropic.claude-v2/invoke")
    assert unknown.status_code == 400
    not_implemented = invoke(url, json.dumps({"taskType": "OUTPAINTING"}).encode())
    assert not_implemented.status_code == 400
    assert "mock" in not_implemented.json()["message"]


def test_bedrock_inpainting(url: str) -> None:
    source = solid_png(32, 32, (255, 255, 255, 255))
    mask = bytes((0, 0, 0, 255)) * (16 * 32) + bytes((255, 255, 255, 255)) * (16 * 32)
    params = {
        "text": "make it red",
        "image": base64.b64encode(source).decode(),
        "maskImage": base64.b64encode(encode_rgba(32, 32, mask)).decode(),
    }
    body = json.dumps({"taskType": "INPAINTING", "inPaintingParams": params}).encode()
    response = invoke(url, body)
    assert response.status_code == 200, response.text
    [image] = [base64.b64decode(image) for image in response.json()["images"]]
    assert png_size(image) == (32, 32)
    assert pixel(image, 3, 3) == (*RED, 255)  # black in the mask: painted
    assert pixel(image, 3, 28) == (255, 127, 127, 255)  # white: kept, tinted
    assert invoke(url, json.dumps({"taskType": "INPAINTING"}).encode()).status_code == 400
    del params["maskImage"]
    body = json.dumps({"taskType": "INPAINTING", "inPaintingParams": params}).encode()
    assert invoke(url, body).status_code == 400  # neither mask
    params["maskPrompt"] = "the sky"
    body = json.dumps({"taskType": "INPAINTING", "inPaintingParams": params}).encode()
    assert invoke(url, body).status_code == 200
    params["image"] = "***"
    body = json.dumps({"taskType": "INPAINTING", "inPaintingParams": params}).encode()
    assert invoke(url, body).status_code == 400


# --- across providers --------------------------------------------------------------------------


def test_pad_to_is_honoured_everywhere(padded_url: str) -> None:
    gemini_image = inline_png(gemini(padded_url, gemini_body("p")).json())
    task = bfl(padded_url, "flux-pro-1.1", {"prompt": "p"}, key=None).json()
    bfl_image = httpx.get(poll(task["polling_url"])["result"]["sample"]).content
    stability_image = stability(padded_url, "core", {"prompt": "p"}, "image/*", key=None).content
    nova = httpx.post(
        padded_url + NOVA,
        content=nova_body(),
        headers={"authorization": "AWS4-HMAC-SHA256 Credential=x", "x-amz-date": "x"},
    )
    bedrock_image = base64.b64decode(nova.json()["images"][0])
    for image in (gemini_image, bfl_image, stability_image, bedrock_image):
        assert len(image) >= 300_000
        png_size(image)


def test_delay_is_honoured_and_abandoned_with_the_client() -> None:
    recorder = Recorder(MockUpstream(delay=30))
    with serve(recorder) as base:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(base + GEMINI, json=gemini_body("p"), timeout=0.2)
        assert recorder.finished.wait(5), "the request kept sleeping after the client left"
    assert recorder.errors == []


def test_slow_answers_take_the_delay(slow_url: str) -> None:
    started = time.monotonic()
    assert gemini(slow_url, gemini_body("p")).status_code == 200
    assert stability(slow_url, "core", {"prompt": "p"}).status_code == 200
    assert invoke(slow_url, nova_body()).status_code == 200
    assert time.monotonic() - started >= 0.9


def test_mounted_under_a_prefix() -> None:
    host = Starlette(routes=[Mount("/_mock", app=MockUpstream())])
    with serve(host) as base:
        mock = base + "/_mock"
        assert gemini(mock, gemini_body("p")).status_code == 200
        task = bfl(mock, "flux-pro-1.1", {"prompt": "p"}).json()
        assert task["polling_url"].startswith(mock + "/v1/get_result?id=")
        sample = poll(task["polling_url"])["result"]["sample"]
        assert sample.startswith(mock + "/bfl/delivery/")
        assert png_size(httpx.get(sample).content) == (1024, 768)
        assert invoke(mock, nova_body()).status_code == 200


def test_openai_paths_are_untouched(url: str) -> None:
    response = httpx.post(
        url + "/v1/images/generations",
        json={"prompt": "p", "size": "64x64"},
        headers={"authorization": f"Bearer {KEY}"},
    )
    assert response.status_code == 200
    assert png_size(base64.b64decode(response.json()["data"][0]["b64_json"])) == (64, 64)
    assert httpx.post(url + "/v1/flux-pro-1.1/images/generations", json={}).status_code == 401
