"""Upstream doubles for the kinds that speak their own API: answers shaped as each
provider's published reference has them (docs/providers.md), with real PNGs, and a proxy in
front of them driven by the official SDK."""

from __future__ import annotations

import base64
import json
from typing import Any

import openai
from conftest import CLIENT_KEY
from double import Answer, Exchange, UpstreamDouble

from imagegen_proxy.mock.png import render_png

PROVIDER_KEY = "provider-secret-key-0123456789"


def png(width: int = 64, height: int = 48, pad_to: int = 0) -> bytes:
    """A real PNG of `width` x `height` (padded to at least `pad_to` bytes)."""
    return render_png("a test image", width=width, height=height, pad_to=pad_to)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def decoded_size(b64_json: str) -> tuple[int, int]:
    """(width, height) of a base64 PNG, from its IHDR."""
    data = base64.b64decode(b64_json)
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


async def send_json(
    x: Exchange,
    status: int,
    value: Any,
    headers: list[tuple[str, str]] | None = None,
    chunk: int = 65536,
) -> None:
    """`value` as JSON, sent in chunks of `chunk` bytes (so readers meet split strings)."""
    body = json.dumps(value).encode()
    await x.start(status, [("content-type", "application/json"), *(headers or [])])
    for at in range(0, len(body), chunk):
        await x.body(body[at : at + chunk])
    await x.body(b"", more=False)


# --- Gemini ----------------------------------------------------------------------------


def gemini_image(
    image: bytes | None = None,
    *,
    prompt_tokens: int = 12,
    image_tokens: int = 1120,
    text: str | None = "Here is your image.",
    chunk: int = 997,
) -> Answer:
    """`generateContent`'s answer with one image (`inlineData`) and its `usageMetadata`."""

    async def answer(x: Exchange) -> None:
        parts: list[dict[str, Any]] = [] if text is None else [{"text": text}]
        data = image if image is not None else png()
        parts.append({"inlineData": {"mimeType": "image/png", "data": b64(data)}})
        await send_json(
            x,
            200,
            {
                "candidates": [
                    {
                        "content": {"role": "model", "parts": parts},
                        "finishReason": "STOP",
                        "index": 0,
                    }
                ],
                "usageMetadata": {
                    "promptTokenCount": prompt_tokens,
                    "candidatesTokenCount": image_tokens,
                    "totalTokenCount": prompt_tokens + image_tokens,
                    "promptTokensDetails": [{"modality": "TEXT", "tokenCount": prompt_tokens}],
                    "candidatesTokensDetails": [{"modality": "IMAGE", "tokenCount": image_tokens}],
                },
                "modelVersion": "gemini-3.1-flash-image",
                "responseId": "resp-123",
            },
            chunk=chunk,
        )

    return answer


def gemini_blocked(reason: str = "PROHIBITED_CONTENT", *, prompt: bool = True) -> Answer:
    """A request Gemini refused: HTTP 200, no image (a blocked prompt, or a finish reason)."""

    async def answer(x: Exchange) -> None:
        usage = {"promptTokenCount": 9, "totalTokenCount": 9}
        if prompt:
            value: dict[str, Any] = {"promptFeedback": {"blockReason": reason}}
        else:
            candidate = {"content": {"role": "model", "parts": []}, "finishReason": reason}
            value = {"candidates": [candidate]}
        await send_json(x, 200, {**value, "usageMetadata": usage})

    return answer


def google_error(status: int, grpc: str, message: str, headers: Any = ()) -> Answer:
    """Google's error envelope."""

    async def answer(x: Exchange) -> None:
        error = {"code": status, "message": message, "status": grpc}
        await send_json(x, status, {"error": error}, list(headers))

    return answer


def gemini_member(upstream: UpstreamDouble, name: str = "gemini", **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "kind": "gemini",
        "base_url": upstream.url,
        "api_key": PROVIDER_KEY,
        **extra,
    }


def client(url: str, **options: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=CLIENT_KEY, max_retries=0, **options)


def async_client(url: str, **options: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key=CLIENT_KEY, max_retries=0, **options)


def no_secrets(upstream: UpstreamDouble) -> None:
    """The client's key reached the upstream in no header, path or body."""
    for request in upstream.requests:
        assert CLIENT_KEY not in json.dumps(request.headers)
        assert CLIENT_KEY not in request.path + request.query
        assert CLIENT_KEY.encode() not in request.body
