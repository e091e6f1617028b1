"""Amazon Bedrock (Nova Canvas, Titan v2) as an upstream kind, driven by the official SDK
through the proxy, against a double that checks every SigV4 signature as AWS would."""

from __future__ import annotations

import base64
import contextvars
import dataclasses
import datetime
import logging
import re
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.utils import percent_encode
from conftest import CLIENT_KEY, HostApp
from double import Exchange, Recorded, UpstreamDouble
from providers import b64, client, decoded_size, no_secrets, png, send_json
from support import serve

from imagegen_proxy import ImageGenProxy, ProxyConfig
from imagegen_proxy.config import ConfigError
from imagegen_proxy.governance.pricing import Prices
from imagegen_proxy.wire.request import ImageGenerationBody, ImageRequest

Start = Callable[..., str]
MODEL = "amazon.nova-canvas-v1:0"
REGION = "us-east-1"
ACCESS_KEY = "AKIAIOSFODNN7EXAMPLE"
SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
SECRET_ENV = "TEST_BEDROCK_SECRET_ACCESS_KEY"
API_KEY = "bedrock-api-key-ABSKQmVkcm9ja0FQSUtleS0"
_AUTH = re.compile(
    r"AWS4-HMAC-SHA256 Credential=(?P<key>[^/]+)/(?P<day>\d{8})/(?P<region>[^/]+)/"
    r"(?P<service>[^/]+)/aws4_request, SignedHeaders=(?P<signed>[a-z0-9;-]+), "
    r"Signature=(?P<signature>[0-9a-f]{64})"
)


# The path of the request being answered, as it came over the wire (the double records it
# decoded): what a signature covers.
_RAW_PATH: contextvars.ContextVar[str] = contextvars.ContextVar("raw_path")


class AwsDouble(UpstreamDouble):
    """The upstream double, keeping each request's path as it came over the wire."""

    raw_paths: list[str]

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            raw = scope["raw_path"].decode("latin-1")
            self.raw_paths.append(raw)
            _RAW_PATH.set(raw)
        await super().__call__(scope, receive, send)


@pytest.fixture
def aws() -> Iterator[AwsDouble]:
    double = AwsDouble()
    double.raw_paths = []
    with serve(double) as url:
        double.url = url
        yield double


@pytest.fixture
def keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SECRET_ENV, SECRET)


def member(double: UpstreamDouble, **extra: Any) -> dict[str, Any]:
    """A Bedrock member signing with the test's key pair (never the real credential chain)."""
    signing: dict[str, Any] = {
        "aws_access_key_id": ACCESS_KEY,
        "aws_secret_access_key_env": SECRET_ENV,
    }
    if "api_key" in extra:
        signing = {}
    return {
        "name": "bedrock",
        "kind": "bedrock",
        "base_url": double.url,
        "region": REGION,
        "model": MODEL,
        **signing,
        **extra,
    }


def signature_holds(request: Recorded, raw_path: str, secret: str = SECRET) -> bool:
    """Whether `request`'s Authorization is the SigV4 signature of what arrived (method,
    path as sent, the headers it names, body), made with `secret`, as AWS checks it."""
    found = _AUTH.fullmatch(request.header("authorization") or "")
    stamp = request.header("x-amz-date") or ""
    if found is None or found["key"] != ACCESS_KEY or not stamp.startswith(found["day"]):
        return False
    if (found["region"], found["service"]) != (REGION, "bedrock"):
        return False
    made = datetime.datetime.strptime(stamp, "%Y%m%dT%H%M%SZ").replace(tzinfo=datetime.UTC)
    if abs((datetime.datetime.now(datetime.UTC) - made).total_seconds()) > 300:
        return False
    signed = found["signed"].split(";")
    headers = {name: request.header(name) or "" for name in signed}
    host = headers.get("host", "")
    again = AWSRequest(request.method, f"http://{host}{raw_path}", data=request.body)
    for name, value in headers.items():
        again.headers[name] = value
    again.context["timestamp"] = stamp
    auth = SigV4Auth(Credentials(ACCESS_KEY, secret), "bedrock", REGION)
    canonical = auth.canonical_request(again)
    expected = auth.signature(auth.string_to_sign(again, canonical), again)
    return bool(expected == found["signature"])


async def _signed(x: Exchange) -> bool:
    """Whether the request is signed (or carries a bearer API key); when its signature does
    not hold, it is answered as AWS answers it."""
    if (x.request.header("authorization") or "").startswith("Bearer "):
        return True
    if signature_holds(x.request, _RAW_PATH.get()):
        return True
    message = "The request signature we calculated does not match the signature you provided."
    await aws_error("InvalidSignatureException", 403, message)(x)
    return False


def nova_images(*images: bytes, chunk: int = 65536, error: str | None = None) -> Any:
    """`InvokeModel`'s answer: the images, base64 in one JSON array, sent in chunks."""

    async def answer(x: Exchange) -> None:
        if await _signed(x):
            value = {"images": [b64(image) for image in images], "error": error}
            await send_json(x, 200, value, [("x-amzn-requestid", "req-1")], chunk=chunk)

    return answer


def aws_error(kind: str, status: int, message: str) -> Any:
    """Bedrock's error: its type in `x-amzn-errortype`, `{"message"}` in the body."""

    async def answer(x: Exchange) -> None:
        header = f"{kind}:http://internal.amazon.com/coral/com.amazon.bedrock/"
        await send_json(x, status, {"message": message}, [("x-amzn-errortype", header)])

    return answer


def test_a_generation_is_signed_and_answers_openais_images_response(
    aws: AwsDouble, provider_proxy: Start, keys: None
) -> None:
    image = png(96, 64)
    aws.answer = nova_images(image)
    url = provider_proxy([member(aws)])
    result = client(url).images.generate(model=MODEL, prompt="a red fox", size="1536x1024")
    assert result.data is not None and result.data[0].b64_json is not None
    assert base64.b64decode(result.data[0].b64_json) == image
    assert result.size == "96x64" and result.output_format == "png"
    sent = aws.last
    # The model id's ":" is escaped as botocore escapes a URI label, and signed so.
    assert aws.raw_paths == [f"/model/{percent_encode(MODEL)}/invoke"]
    assert aws.raw_paths[0] == "/model/amazon.nova-canvas-v1%3A0/invoke"
    assert signature_holds(sent, aws.raw_paths[0])
    assert sent.header("content-type") == "application/json"
    assert sent.header("accept") == "application/json"
    assert sent.json == {
        "taskType": "TEXT_IMAGE",
        "textToImageParams": {"text": "a red fox"},
        "imageGenerationConfig": {"width": 1536, "height": 1024},
    }
    no_secrets(aws)


def test_a_tampered_request_fails_the_signature_check(
    aws: AwsDouble, provider_proxy: Start, keys: None
) -> None:
    aws.answer = nova_images(png())
    client(provider_proxy([member(aws)])).images.generate(model=MODEL, prompt="p")
    sent, path = aws.last, aws.raw_paths[-1]
    assert signature_holds(sent, path)
    assert not signature_holds(dataclasses.replace(sent, body=sent.body + b" "), path)
    assert not signature_holds(sent, path.replace("%3A", ":"))
    assert not signature_holds(sent, path, secret=SECRET[:-1] + "X")
    headers = [(k, "wrong" if k == "content-type" else v) for k, v in sent.headers]
    assert not signature_holds(dataclasses.replace(sent, headers=headers), path)


def test_a_wrong_secret_is_the_gateways_problem_and_named_nowhere(
    aws: AwsDouble, provider_proxy: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(SECRET_ENV, "not-the-secret-the-double-knows")
    aws.answer = nova_images(png())
    url = provider_proxy([member(aws)])
    answer = httpx.post(url + "/v1/images/generations", json={"model": MODEL, "prompt": "p"})
    assert answer.status_code == 502
    assert answer.json()["error"]["code"] == "upstream_auth_failed"
    assert "not-the-secret" not in answer.text and "signature we calculated" not in answer.text


def test_a_stream_has_one_completed_event_per_image(
    aws: AwsDouble, provider_proxy: Start, keys: None
) -> None:
    images = [png(64, 64), png(32, 48)]
    aws.answer = nova_images(*images, chunk=997)
    url = provider_proxy([member(aws)])
    events = list(client(url).images.generate(model=MODEL, prompt="p", n=2, stream=True))
    assert [event.type for event in events] == ["image_generation.completed"] * 2
    assert [base64.b64decode(event.b64_json) for event in events] == images


def test_n_images_are_one_call(aws: AwsDouble, provider_proxy: Start, keys: None) -> None:
    images = [png(32, 32), png(48, 32), png(32, 48)]
    aws.answer = nova_images(*images)
    url = provider_proxy([member(aws)])
    result = client(url).images.generate(model=MODEL, prompt="foxes", n=3)
    assert result.data is not None
    assert [base64.b64decode(one.b64_json or "") for one in result.data] == images
    assert len(aws.requests) == 1
    assert aws.last.json["imageGenerationConfig"]["numberOfImages"] == 3


def test_more_than_five_images_is_a_400_naming_n(
    aws: AwsDouble, provider_proxy: Start, keys: None
) -> None:
    url = provider_proxy([member(aws)])
    with pytest.raises(openai.BadRequestError) as caught:
        client(url).images.generate(model=MODEL, prompt="p", n=6)
    assert caught.value.param == "n"
    assert aws.requests == []


def test_images_of_megabytes_stream_through_byte_exact(
    aws: AwsDouble, provider_proxy: Start, keys: None
) -> None:
    images = [png(64, 64, pad_to=4_000_000), png(48, 48, pad_to=4_200_000)]
    aws.answer = nova_images(*images)
    url = provider_proxy([member(aws)])
    result = client(url, timeout=60).images.generate(model=MODEL, prompt="p", n=2)
    assert result.data is not None
    assert [base64.b64decode(one.b64_json or "") for one in result.data] == images


@pytest.mark.parametrize(
    ("size", "width", "height"),
    [
        (None, 1024, 1024),
        ("auto", 1024, 1024),
        ("1024x1024", 1024, 1024),
        ("1024x1536", 1024, 1536),
        ("2048x2048", 2048, 2048),
        ("320x1280", 320, 1280),  # 1:4
        ("4096x1024", 4096, 1024),  # 4:1, 4,194,304 pixels
        ("1280x720", 1280, 720),
    ],
)
def test_sizes_nova_canvas_makes_are_sent_as_width_and_height(
    aws: AwsDouble, provider_proxy: Start, keys: None, size: str | None, width: int, height: int
) -> None:
    aws.answer = nova_images(png())
    url = provider_proxy([member(aws)])
    client(url).images.generate(model=MODEL, prompt="p", **({"size": size} if size else {}))
    config = aws.last.json["imageGenerationConfig"]
    assert (config["width"], config["height"]) == (width, height)


@pytest.mark.parametrize(
    "size",
    [
        "256x256",  # a side below 320
        "4112x1024",  # a side above 4096
        "1000x1000",  # not multiples of 16
        "320x1296",  # taller than 1:4
        "2048x2064",  # more than 4,194,304 pixels
        "1792x1024x",
        "big",
    ],
)
def test_sizes_nova_canvas_cannot_make_are_a_400_naming_size(
    aws: AwsDouble, provider_proxy: Start, keys: None, size: str
) -> None:
    url = provider_proxy([member(aws)])
    with pytest.raises(openai.BadRequestError) as caught:
        client(url).images.generate(model=MODEL, prompt="p", size=size)  # type: ignore[arg-type]
    assert caught.value.param == "size"
    assert aws.requests == []


@pytest.mark.parametrize(
    ("quality", "sent"),
    [
        ("low", "standard"),
        ("medium", "standard"),
        ("auto", "standard"),
        ("standard", "standard"),
        ("high", "premium"),
        ("hd", "premium"),
        (None, None),
    ],
)
def test_qualities_map_to_standard_and_premium(
    aws: AwsDouble, provider_proxy: Start, keys: None, quality: str | None, sent: str | None
) -> None:
    aws.answer = nova_images(png())
    url = provider_proxy([member(aws)])
    asked = {"quality": quality} if quality else {}
    client(url).images.generate(model=MODEL, prompt="p", **asked)  # type: ignore[arg-type]
    assert aws.last.json["imageGenerationConfig"].get("quality") == sent


@pytest.mark.parametrize(
    ("asked", "param"),
    [
        ({"quality": "ultra"}, "quality"),
        ({"output_format": "jpeg"}, "output_format"),
        ({"output_format": "webp"}, "output_format"),
        ({"output_compression": 50}, "output_compression"),
        ({"background": "transparent"}, "background"),
        ({"response_format": "url"}, "response_format"),
    ],
)
def test_what_bedrock_cannot_do_is_a_400_naming_the_param(
    aws: AwsDouble, provider_proxy: Start, keys: None, asked: dict[str, Any], param: str
) -> None:
    url = provider_proxy([member(aws)])
    answer = httpx.post(
        url + "/v1/images/generations", json={"model": MODEL, "prompt": "p", **asked}
    )
    assert answer.status_code == 400 and answer.json()["error"]["param"] == param
    assert aws.requests == []


def test_png_may_be_asked_for(aws: AwsDouble, provider_proxy: Start, keys: None) -> None:
    aws.answer = nova_images(png())
    url = provider_proxy([member(aws)])
    result = client(url).images.generate(model=MODEL, prompt="p", output_format="png")
    assert result.output_format == "png"


def test_an_api_key_is_a_bearer_token_and_nothing_is_signed(
    aws: AwsDouble, provider_proxy: Start
) -> None:
    aws.answer = nova_images(png())
    url = provider_proxy([member(aws, api_key=API_KEY)])
    client(url).images.generate(model=MODEL, prompt="p")
    sent = aws.last
    assert sent.header("authorization") == f"Bearer {API_KEY}"
    assert sent.header("x-amz-date") is None and sent.header("x-amz-security-token") is None
    no_secrets(aws)


def test_the_aws_secret_is_in_no_log_line_and_no_answer(
    aws: AwsDouble, provider_proxy: Start, keys: None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    aws.answer = nova_images(png())
    url = provider_proxy([member(aws)])
    good = httpx.post(url + "/v1/images/generations", json={"model": MODEL, "prompt": "p"})
    aws.answer = aws_error("UnrecognizedClientException", 403, "The security token is invalid.")
    bad = httpx.post(url + "/v1/images/generations", json={"model": MODEL, "prompt": "p"})
    assert good.status_code == 200 and bad.status_code == 502
    assert any(record.name.startswith("botocore") for record in caplog.records)  # it was on
    for record in caplog.records:
        assert SECRET not in record.getMessage()
    assert SECRET not in good.text + bad.text
    no_secrets(aws)
    assert all(CLIENT_KEY not in value for _, value in aws.last.headers)


@pytest.mark.parametrize(
    ("kind", "status", "message", "expected", "code"),
    [
        ("ValidationException", 400, "Malformed input request", 400, "invalid_request"),
        (
            "ValidationException",
            400,
            "This request has been blocked by our content filters.",
            400,
            "content_policy_violation",
        ),
        ("ResourceNotFoundException", 404, "Model not found", 400, "invalid_request"),
        ("AccessDeniedException", 403, "no access", 502, "upstream_auth_failed"),
        ("UnrecognizedClientException", 403, "bad token", 502, "upstream_auth_failed"),
        ("InvalidSignatureException", 403, "signature", 502, "upstream_auth_failed"),
        ("ExpiredTokenException", 400, "expired", 502, "upstream_auth_failed"),
        ("ThrottlingException", 429, "Too many requests", 429, "rate_limit_exceeded"),
        ("ServiceQuotaExceededException", 400, "quota", 429, "rate_limit_exceeded"),
        ("ModelTimeoutException", 408, "timed out", 504, "upstream_error"),
        ("ModelNotReadyException", 429, "not ready", 503, "upstream_error"),
        ("ServiceUnavailableException", 503, "unavailable", 503, "upstream_error"),
        ("InternalServerException", 500, "internal", 500, "upstream_error"),
        ("SomethingNewException", 502, "new", 502, "upstream_error"),
    ],
)
def test_bedrocks_errors_are_mapped_by_their_type(
    aws: AwsDouble,
    provider_proxy: Start,
    keys: None,
    kind: str,
    status: int,
    message: str,
    expected: int,
    code: str,
) -> None:
    aws.answer = aws_error(kind, status, message)
    url = provider_proxy([member(aws)])
    answer = httpx.post(url + "/v1/images/generations", json={"model": MODEL, "prompt": "p"})
    assert answer.status_code == expected
    assert answer.json()["error"]["code"] == code


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (
            "The generated image has been blocked by our content filters.",
            400,
            "content_policy_violation",
        ),
        ("Something went wrong.", 502, "upstream_error"),
    ],
)
def test_an_error_without_an_image_is_refused(
    aws: AwsDouble, provider_proxy: Start, keys: None, error: str, status: int, code: str
) -> None:
    aws.answer = nova_images(error=error)
    url = provider_proxy([member(aws)])
    answer = httpx.post(url + "/v1/images/generations", json={"model": MODEL, "prompt": "p"})
    assert answer.status_code == status
    assert answer.json()["error"]["code"] == code


def test_titan_is_the_same_call(aws: AwsDouble, provider_proxy: Start, keys: None) -> None:
    aws.answer = nova_images(png())
    titan = "amazon.titan-image-generator-v2:0"
    url = provider_proxy([member(aws, model=titan)])
    result = client(url).images.generate(model=titan, prompt="p", size="1024x1024")
    assert result.data is not None and decoded_size(result.data[0].b64_json or "") == (64, 48)
    assert aws.raw_paths == ["/model/amazon.titan-image-generator-v2%3A0/invoke"]


def test_refreshable_credentials_are_frozen_per_request(
    aws: AwsDouble, provider_proxy: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    import botocore.session

    frozen = iter(
        [Credentials(ACCESS_KEY, SECRET, "token-1"), Credentials(ACCESS_KEY, SECRET, "token-2")]
    )

    class Chain:
        def get_frozen_credentials(self) -> Credentials:
            return next(frozen)

    class Session:
        def get_credentials(self) -> Chain:
            return Chain()

    monkeypatch.setattr(botocore.session, "get_session", lambda: Session())
    aws.answer = nova_images(png())
    url = provider_proxy([member(aws, aws_access_key_id=None, aws_secret_access_key_env=None)])
    for _ in range(2):
        client(url).images.generate(model=MODEL, prompt="p")
    assert [r.header("x-amz-security-token") for r in aws.requests] == ["token-1", "token-2"]
    assert all(signature_holds(r, p) for r, p in zip(aws.requests, aws.raw_paths, strict=True))


def test_no_credentials_in_the_chain_is_the_gateways_problem(
    aws: AwsDouble, provider_proxy: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    import botocore.session

    class Session:
        def get_credentials(self) -> None:
            return None

    monkeypatch.setattr(botocore.session, "get_session", lambda: Session())
    url = provider_proxy([member(aws, aws_access_key_id=None, aws_secret_access_key_env=None)])
    answer = httpx.post(url + "/v1/images/generations", json={"model": MODEL, "prompt": "p"})
    assert answer.status_code == 502
    assert answer.json()["error"]["code"] == "upstream_auth_failed"
    assert aws.requests == []


def test_an_unset_secret_variable_fails_at_start(
    aws: AwsDouble, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(SECRET_ENV, raising=False)
    config = ProxyConfig.model_validate({"auth": {"open": True}, "upstreams": [member(aws)]})
    with pytest.raises(ConfigError, match=SECRET_ENV):
        ImageGenProxy(HostApp().app, config)


def test_an_api_key_and_an_aws_key_together_are_refused(aws: AwsDouble) -> None:
    entry = {**member(aws), "api_key": API_KEY}
    with pytest.raises((ConfigError, ValueError), match="not both"):
        ProxyConfig.model_validate({"auth": {"open": True}, "upstreams": [entry]})


@pytest.mark.parametrize(
    ("size", "quality", "dollars"),
    [
        (None, None, 0.04),
        ("1024x1024", "low", 0.04),
        ("512x512", "high", 0.06),
        ("1024x1024", "high", 0.06),
        ("2048x2048", "medium", 0.06),
        ("2048x2048", "high", 0.08),
        ("1536x1024", None, 0.06),  # past 1024x1024: the larger tier
        ("4096x1024", "hd", 0.08),
        ("auto", "low", 0.06),  # unknown to the table: the dearest it could be
        ("320x320", None, 0.06),
    ],
)
def test_nova_canvas_costs_at_least_its_tier(
    size: str | None, quality: str | None, dollars: float
) -> None:
    body = {"prompt": "p", "model": MODEL, "n": 2}
    body |= {"size": size} if size else {}
    body |= {"quality": quality} if quality else {}
    request = ImageRequest(form="openai", body=ImageGenerationBody.model_validate(body))
    price = Prices().get(MODEL)
    assert price is not None and price.per_image
    assert price.cost(request, None) == round(2 * dollars * 1_000_000)
