"""A failing upstream for the soak, in the Azure path form: python refuser.py PORT.

Deployment "refuse" gets a 400 in the OpenAI error envelope (the proxy passes it through);
any other deployment gets its connection closed with no answer (the proxy answers 502).
The embedded mock cannot stand in: it refuses nothing the proxy's own validation lets by.
Raw asyncio, because an ASGI server turns "no answer" into a 500 of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys

ENVELOPE = json.dumps(
    {
        "error": {
            "message": "Refused by the soak's failing upstream.",
            "type": "invalid_request_error",
            "param": None,
            "code": "soak_refused",
        }
    }
).encode()
REFUSAL = (
    b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n"
    b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(ENVELOPE), ENVELOPE)
)


def body_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value.strip())
    return 0


async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """One request per connection: read it whole (so closing never resets unread data), then
    refuse it or drop it."""
    with contextlib.suppress(
        ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError
    ):
        head = await reader.readuntil(b"\r\n\r\n")
        await reader.readexactly(body_length(head))
        if b"/deployments/refuse/" in head.split(b"\r\n", 1)[0]:
            writer.write(REFUSAL)
            await writer.drain()
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


async def main(port: int) -> None:
    server = await asyncio.start_server(answer, "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
