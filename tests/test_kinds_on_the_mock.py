"""Every upstream kind through the proxy against the embedded mock, which speaks each
provider's own wire: the official SDK gets OpenAI's answers, real PNGs of the mock's size."""

from __future__ import annotations

import base64
import os
from collections.abc import Callable, Iterator
from typing import Any

import openai
import pytest
from providers import client, decoded_size
from support import serve

from imagegen_proxy.mock import MockUpstream
from imagegen_proxy.mock.providers.bedrock import ACCESS_KEY_ID

Start = Callable[..., str]
KEY = "mock-key-for-the-kinds-0123456789"


@pytest.fixture(scope="module")
def mock() -> Iterator[str]:
    with serve(MockUpstream(api_key=KEY)) as base:
        yield base


def members(mock: str) -> dict[str, tuple[dict[str, Any], str]]:
    """Each kind's member against the mock, and a model it serves."""
    return {
        "gemini": (
            {"kind": "gemini", "base_url": mock, "api_key": KEY},
            "gemini-3.1-flash-image",
        ),
        "stability": ({"kind": "stability", "base_url": mock, "api_key": KEY}, "core"),
        "bfl": (
            {"kind": "bfl", "base_url": mock, "api_key": KEY, "poll_interval": 0.02},
            "flux-pro-1.1",
        ),
        "bedrock": (
            {
                "kind": "bedrock",
                "base_url": mock,
                "region": "us-east-1",
                "aws_access_key_id": ACCESS_KEY_ID,
                "aws_secret_access_key_env": "MOCK_AWS_SECRET",
            },
            "amazon.nova-canvas-v1:0",
        ),
    }


KINDS = ["gemini", "stability", "bfl", "bedrock"]


@pytest.fixture(autouse=True)
def aws_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOCK_AWS_SECRET", KEY)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("stream", [False, True])
def test_each_kind_generates_through_the_sdk(
    mock: str, provider_proxy: Start, kind: str, stream: bool
) -> None:
    member, model = members(mock)[kind]
    url = provider_proxy([{"name": kind, **member}])
    if stream:
        events = list(client(url).images.generate(model=model, prompt="a lighthouse", stream=True))
        assert [e.type for e in events] == ["image_generation.completed"]
        b64 = events[0].b64_json
    else:
        result = client(url).images.generate(model=model, prompt="a lighthouse", size="1024x1024")
        assert result.data is not None
        b64 = result.data[0].b64_json or ""
        assert result.size is not None and decoded_size(b64) == tuple(
            int(side) for side in result.size.split("x")
        )
    assert base64.b64decode(b64).startswith(b"\x89PNG")


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_refuses_a_forbidden_prompt_as_a_content_policy_violation(
    mock: str, provider_proxy: Start, kind: str
) -> None:
    member, model = members(mock)[kind]
    url = provider_proxy([{"name": kind, **member}])
    with pytest.raises(openai.BadRequestError) as caught:
        client(url).images.generate(model=model, prompt="something forbidden")
    assert caught.value.code == "content_policy_violation"


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_with_a_wrong_key_is_the_gateways_problem(
    mock: str, provider_proxy: Start, kind: str
) -> None:
    member, model = members(mock)[kind]
    wrong = {"api_key": "not-the-key"}
    if kind == "bedrock":
        os.environ["MOCK_AWS_SECRET"] = wrong.pop("api_key")
    url = provider_proxy([{"name": kind, **member, **wrong}])
    with pytest.raises(openai.InternalServerError) as caught:
        client(url).images.generate(model=model, prompt="p")
    assert caught.value.status_code == 502 and caught.value.code == "upstream_auth_failed"
    assert "not-the-key" not in caught.value.message
