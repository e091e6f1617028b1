"""The floor: a bare reverse proxy with no features, the best a Python proxy does here.

A raw ASGI app forwarding the body to FLOOR_UPSTREAM with aiohttp and streaming the answer
back. No validation, no auth, no limits, no error handling: a lower bound, not a product.
"""

import os

import aiohttp

UPSTREAM = os.environ.get("FLOOR_UPSTREAM", "http://127.0.0.1:9000")
HOP = {b"connection", b"keep-alive", b"transfer-encoding", b"date", b"server"}
session: aiohttp.ClientSession | None = None


async def app(scope, receive, send):  # type: ignore[no-untyped-def]
    global session
    if scope["type"] == "lifespan":
        while (message := await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    if session is None:
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            timeout=aiohttp.ClientTimeout(total=None, sock_read=600),
        )
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    headers = {"content-type": "application/json"}
    async with session.post(UPSTREAM + scope["path"], data=body, headers=headers) as answer:
        raw = [(k.lower(), v) for k, v in answer.raw_headers if k.lower() not in HOP]
        await send({"type": "http.response.start", "status": answer.status, "headers": raw})
        async for chunk in answer.content.iter_any():
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b""})
