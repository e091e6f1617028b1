"""A sink upstream for the upload figure: reads each request's body to its end and answers
a small image answer, OpenAI-shaped, whatever was sent.

It counts the body's bytes (and with SINK_HASH=1 hashes them, SHA-256) and says so in a
`sink` field of its answer: `{"bytes": ..., "sha256": ..., "content_type": ..., "chunks":
..., "largest_chunk": ...}`, so that the bench can check what arrived (and see how large
the chunks uvicorn hands an app are). Nothing of the body is kept: memory per request is one
received chunk. Run it with `procs.uvicorn_app("sink:app")`.
"""

import hashlib
import json
import os
import time

HASH = os.environ.get("SINK_HASH") == "1"
USAGE = {
    "total_tokens": 1290,
    "input_tokens": 1018,
    "output_tokens": 272,
    "input_tokens_details": {"text_tokens": 10, "image_tokens": 1008},
}


async def app(scope, receive, send):  # type: ignore[no-untyped-def]
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    size = chunks = largest = 0
    digest = hashlib.sha256() if HASH else None
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        chunk = message.get("body", b"")
        size += len(chunk)
        chunks += 1
        largest = max(largest, len(chunk))
        if digest is not None:
            digest.update(chunk)
        if not message.get("more_body"):
            break
    content_type = dict(scope["headers"]).get(b"content-type", b"").decode("latin-1")
    sink = {
        "bytes": size,
        "sha256": None if digest is None else digest.hexdigest(),
        "content_type": content_type,
        "chunks": chunks,
        "largest_chunk": largest,
    }
    # "usage" last, as the API sends it (the proxy reads it from the answer's tail).
    answer = {"created": int(time.time()), "data": [{"b64_json": "aW1n"}], "sink": sink}
    answer["usage"] = USAGE
    body = json.dumps(answer, separators=(",", ":")).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})
