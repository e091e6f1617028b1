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
        body = {"model": "gpt-image-1", "prompt": "p", "stream": True, "partial_images": 3}
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
        body = {"model": "gpt-image-1", "prompt": "slow", "size": "16x16"}
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


def side_by_side(
    started: dict[str, tuple[str, int]], rounds: int, seconds: float
) -> dict[str, dict[str, float]]:
    """wrk at c=1 (latency) and c=20 (throughput) on each started proxy, alternating within
    a round and rotating the order between rounds; medians per proxy. The steadiest figure
    on a shared 2-core machine is the proxy process's own CPU time per request (user +
    system, from psutil) during the c=20 runs."""
    import psutil

    names = list(started)
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    for url, _ in started.values():
        wrk(url, 20, 1)  # warm up
    for index in range(rounds):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            url, pid = started[name]
            c1 = wrk(url, 1, seconds, threads=1)
            cpu = psutil.Process(pid).cpu_times()
            c20 = wrk(url, 20, seconds)
            after = psutil.Process(pid).cpu_times()
            spent = after.user + after.system - cpu.user - cpu.system
            requests = c20["rps"] * max(1, round(seconds))
            runs[name].append(
                {
                    "c1_p50_ms": c1["p50_ms"],
                    "c1_p99_ms": c1["p99_ms"],
                    "c20_rps": c20["rps"],
                    "cpu_us_per_request": spent / requests * 1e6,
                }
            )
    return {
        name: {key: statistics.median(run[key] for run in runs[name]) for key in runs[name][0]}
        for name in names
    }


def cpu_table(result: dict[str, dict[str, float]], base: str, label: str) -> str:
    """`result` as a Markdown table, each row's CPU per request against `base`'s."""
    lines = [
        f"| {label} | proxy CPU per request (µs) | vs {base} | c=1 p50 (ms) | c=1 p99 (ms) "
        "| c=20 (req/s) |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in result.items():
        extra = row["cpu_us_per_request"] - result[base]["cpu_us_per_request"]
        lines.append(
            f"| {name} | {row['cpu_us_per_request']:.0f} | {extra:+.0f} µs | "
            f"{row['c1_p50_ms']:.2f} | {row['c1_p99_ms']:.2f} | {row['c20_rps']:.0f} |"
        )
    return "\n".join(lines)
