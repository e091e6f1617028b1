"""Image edits and variations: multipart uploads relayed as they arrive, through the SDK."""

from __future__ import annotations

from typing import Any

import openai
from conftest import CLIENT_KEY, UPSTREAM_KEY
from double import UpstreamDouble

PNG = b"\x89PNG\r\n\x1a\n" + b"pixels" * 1000


def client(proxy: str, **kwargs: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy + "/v1", api_key=CLIENT_KEY, max_retries=0, **kwargs)


def test_an_edit_goes_upstream_as_sent(proxy: str, upstream: UpstreamDouble) -> None:
    answer = client(proxy).images.edit(
        image=("cat.png", PNG, "image/png"),
        prompt="a hat on the cat",
        model="gpt-image-1",
        n=2,
        size="1024x1024",
    )
    assert answer.data
    request = upstream.last
    assert request.path == "/v1/images/edits"
    assert request.header("authorization") == f"Bearer {UPSTREAM_KEY}"
    assert CLIENT_KEY not in str(request.headers)
    assert (request.header("content-type") or "").startswith("multipart/form-data; boundary=")
    assert upstream.last.parts == [
        ("prompt", None, b"a hat on the cat"),
        ("model", None, b"gpt-image-1"),
        ("n", None, b"2"),
        ("size", None, b"1024x1024"),
        ("image", "cat.png", PNG),
    ]
