"""Load generators: wrk (C) for request rates and latency, aiohttp clients for streams and
thousands of slow requests."""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import time
from pathlib import Path

import aiohttp
from procs import KEY

LUA = str(Path(__file__).parent / "post.lua")
PATH = "/v1/images/generations"


def wrk(url: str, connections: int, seconds: float, threads: int = 2) -> dict[str, float]:
    threads = max(1, min(threads, connections))
    result = subprocess.run(
        [
            "wrk",
            "-t",
            str(threads),
            "-c",
            str(connections),
            "-d",
            f"{max(1, round(seconds))}s",
            "--latency",
            "-s",
            LUA,
            url + PATH,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    line = next(line for line in result.stdout.splitlines() if line.startswith("{"))
    data = json.loads(line)
    seconds_run = data["duration_us"] / 1e6
    return {
        "rps": data["requests"] / seconds_run,
        "p50_ms": data["p50_us"] / 1000,
        "p99_ms": data["p99_us"] / 1000,
        "errors": data["socket_errors"] + data["non_2xx"],
        "mb_per_s": data["bytes"] / seconds_run / 2**20,
    }


def stream_delays(url: str, streams: int = 4) -> dict[str, float]:
    """Per partial event: the time from the upstream sending it to the client having it."""

    async def one(session: aiohttp.ClientSession, delays: list[float]) -> None:
        body = {"prompt": "p", "stream": True, "partial_images": 3}
        headers = {"authorization": f"Bearer {KEY}"}
        async with session.post(url + PATH, json=body, headers=headers) as answer:
            async for line in answer.content:  # aiohttp splits lines of any length
                if line.startswith(b"data: "):
                    received = time.monotonic()
                    sent = json.loads(line[6:])["sent"]
                    delays.append((received - sent) * 1000)

    async def run() -> list[float]:
        delays: list[float] = []
        async with aiohttp.ClientSession() as session:
            await asyncio.gather(*(one(session, delays) for _ in range(streams)))
        return sorted(delays)

    delays = asyncio.run(run())
    return {
        "p50_ms": statistics.median(delays),
        "p99_ms": delays[int(len(delays) * 0.99) - 1],
        "events": len(delays),
    }


def slow_generations(url: str, count: int) -> dict[str, float]:
    """`count` requests at once, each taking the upstream's delay; how many succeed."""

    async def run() -> tuple[int, float]:
        connector = aiohttp.TCPConnector(limit=0)
        timeout = aiohttp.ClientTimeout(total=120)
        headers = {"authorization": f"Bearer {KEY}"}
        body = {"prompt": "slow", "size": "16x16"}
        started = time.monotonic()
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

            async def one() -> bool:
                try:
                    async with session.post(url + PATH, json=body, headers=headers) as answer:
                        await answer.read()
                        return answer.status == 200
                except (TimeoutError, aiohttp.ClientError):
                    return False

            results = await asyncio.gather(*(one() for _ in range(count)))
        return sum(results), time.monotonic() - started

    ok, elapsed = asyncio.run(run())
    return {"ok": ok, "failed": count - ok, "seconds": elapsed}
