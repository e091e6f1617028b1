"""An SSE upstream for the forwarding-delay figure: each partial-image event carries the
CLOCK_MONOTONIC time it was sent (shared by every process on the machine)."""

import json
import os
import time

import anyio

EVENTS = int(os.environ.get("TICKER_EVENTS", "50"))
INTERVAL = float(os.environ.get("TICKER_INTERVAL", "0.02"))
PAD = "A" * int(os.environ.get("TICKER_PAD", "65536"))


def frame(kind: str, **data: object) -> bytes:
    payload = json.dumps({"type": kind, **data}, separators=(",", ":"))
    return f"event: {kind}\ndata: {payload}\n\n".encode()


async def app(scope, receive, send):  # type: ignore[no-untyped-def]
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    while (await receive()).get("more_body"):
        pass
    headers = [(b"content-type", b"text/event-stream")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    for index in range(EVENTS):
        await anyio.sleep(INTERVAL)
        event = frame(
            "image_generation.partial_image",
            partial_image_index=index,
            sent=time.monotonic(),
            b64_json=PAD,
        )
        await send({"type": "http.response.body", "body": event, "more_body": True})
    usage = {"total_tokens": 1, "input_tokens": 1, "output_tokens": 0}
    done = frame("image_generation.completed", sent=time.monotonic(), b64_json="", usage=usage)
    await send({"type": "http.response.body", "body": done, "more_body": False})
