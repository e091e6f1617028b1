"""Soak: steady mixed load on imagegen_proxy for minutes; its RSS, FDs and latency over time.

    python bench/soak.py                  # 5 minutes at 100 req/s
    python bench/soak.py --minutes 0.5    # a smoke run

Open loop: requests start on a fixed schedule whatever the answers do, so a proxy that
slows down meets the same load, not less. Not part of CI. See bench/README.md, "Soak".
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

sys.path.insert(0, str(Path(__file__).parent))

import aiohttp
import procs
import soak_report

PATH = "/v1/images/generations"
AZURE = "/openai/deployments/{}/images/generations?api-version=2025-04-01-preview"
BEARER = {"authorization": f"Bearer {procs.KEY}"}
SIZES = ("16x16", "64x64", "256x256")
# Weights of the mix: mostly work that succeeds, and a steady trickle of every failure.
MIX = {
    "json": 50,
    "stream": 20,
    "drop_waiting": 7,
    "drop_stream": 7,
    "upstream_400": 6,
    "upstream_502": 6,
    "bad_key": 4,
}
SSE_EVENTS = [b"event: image_generation.partial_image"] * 2 + [b"event: image_generation.completed"]

# A request's status (None: no answer), outcome ("unexpected" for anything not planned) and,
# when unexpected, what came back instead.
Result = tuple[int | None, str, str]
Kind = Callable[[aiohttp.ClientSession, str, random.Random], Awaitable[Result]]


@dataclass(frozen=True, slots=True)
class Outcome:
    """One request: its kind, when it was sent (seconds since the load started), how long it
    took until read whole or abandoned, and what came of it."""

    kind: str
    sent: float
    seconds: float
    status: int | None
    outcome: str
    detail: str = ""


def generation(rng: random.Random, **extra: Any) -> dict[str, Any]:
    # Few distinct prompts and sizes: the mock caches its renders, so it stays cheap.
    return {"prompt": f"soak {rng.randrange(40)}", "size": rng.choice(SIZES), **extra}


def expect(status: int, want: int, body: bytes, marker: bytes, outcome: str) -> Result:
    if status == want and marker in body:
        return status, outcome, ""
    return status, "unexpected", body[:300].decode(errors="replace")


async def plain_json(session: aiohttp.ClientSession, url: str, rng: random.Random) -> Result:
    async with session.post(url + PATH, json=generation(rng), headers=BEARER) as answer:
        return expect(answer.status, 200, await answer.read(), b'"b64_json"', "ok")


async def stream(session: aiohttp.ClientSession, url: str, rng: random.Random) -> Result:
    body = generation(rng, stream=True, partial_images=2)
    async with session.post(url + PATH, json=body, headers=BEARER) as answer:
        data = await answer.read()
    events = [chunk.split(b"\n", 1)[0] for chunk in data.split(b"\n\n") if chunk.strip()]
    if answer.status == 200 and events == SSE_EVENTS:
        return 200, "ok", ""
    return answer.status, "unexpected", f"events {[e[7:] for e in events]}: {data[:200]!r}"


async def drop_waiting(session: aiohttp.ClientSession, url: str, rng: random.Random) -> Result:
    """Hang up before the answer: the mock takes `--delay`, the client waits less."""
    try:
        async with asyncio.timeout(rng.uniform(0.02, 0.15)):
            async with session.post(url + PATH, json=generation(rng), headers=BEARER) as answer:
                return expect(answer.status, 200, await answer.read(), b'"b64_json"', "answered")
    except TimeoutError:  # aiohttp closes the connection of a cancelled request
        return None, "disconnected", ""


async def drop_stream(session: aiohttp.ClientSession, url: str, rng: random.Random) -> Result:
    """Hang up mid-stream, after the first bytes of the first partial image."""
    body = generation(rng, stream=True, partial_images=2)
    async with session.post(url + PATH, json=body, headers=BEARER) as answer:
        first = await answer.content.readany()
        answer.close()  # close the connection; release() would wait for the rest
    if answer.status == 200 and first.startswith(SSE_EVENTS[0]):
        return 200, "disconnected", ""
    return answer.status, "unexpected", first[:300].decode(errors="replace")


async def upstream_error(
    session: aiohttp.ClientSession, url: str, rng: random.Random, deployment: str
) -> Result:
    want, marker = (400, b"soak_refused") if deployment == "refuse" else (502, b"upstream_error")
    path, headers = AZURE.format(deployment), {"api-key": procs.KEY}
    async with session.post(url + path, json=generation(rng), headers=headers) as answer:
        return expect(answer.status, want, await answer.read(), marker, f"upstream {want}")


async def bad_key(session: aiohttp.ClientSession, url: str, rng: random.Random) -> Result:
    headers = {"authorization": "Bearer soak-wrong-key-0123456789"}
    async with session.post(url + PATH, json=generation(rng), headers=headers) as answer:
        return expect(answer.status, 401, await answer.read(), b"invalid_api_key", "refused 401")


KINDS: dict[str, Kind] = {
    "json": plain_json,
    "stream": stream,
    "drop_waiting": drop_waiting,
    "drop_stream": drop_stream,
    "upstream_400": lambda s, u, r: upstream_error(s, u, r, "refuse"),
    "upstream_502": lambda s, u, r: upstream_error(s, u, r, "drop"),
    "bad_key": bad_key,
}


async def one(
    session: aiohttp.ClientSession,
    url: str,
    kind: str,
    rng: random.Random,
    origin: float,
    outcomes: list[Outcome],
) -> None:
    sent = time.monotonic()
    try:
        status, outcome, detail = await KINDS[kind](session, url, rng)
    except Exception as exc:  # one request going wrong is a finding to count, never fatal
        status, outcome, detail = None, "unexpected", f"{type(exc).__name__}: {exc}"
    outcomes.append(Outcome(kind, sent - origin, time.monotonic() - sent, status, outcome, detail))


async def drive(
    url: str, rate: float, seconds: float, bound: int, origin: float, seed: int
) -> tuple[list[Outcome], int]:
    """Start `rate` requests a second for `seconds`, at most `bound` in flight (an arrival
    beyond that is skipped and counted, not queued); wait for the last ones to finish."""
    rng = random.Random(seed)
    kinds, weights = list(MIX), list(MIX.values())
    outcomes: list[Outcome] = []
    running: set[asyncio.Task[None]] = set()
    skipped = 0
    connector = aiohttp.TCPConnector(limit=bound)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        for index in range(round(seconds * rate)):
            await asyncio.sleep(max(0.0, origin + index / rate - time.monotonic()))
            if len(running) >= bound:
                skipped += 1
                continue
            kind = rng.choices(kinds, weights)[0]
            task = asyncio.create_task(one(session, url, kind, rng, origin, outcomes))
            running.add(task)
            task.add_done_callback(running.discard)
        if running:  # each finishes within the session's 30 s timeout
            await asyncio.wait(running, timeout=60)
    return outcomes, skipped


@contextlib.contextmanager
def servers(delay: float, log: IO[bytes]) -> Iterator[tuple[str, int]]:
    """The mock, the failing upstream as the `[azure]` endpoint, and the proxy (its stderr to
    `log`: it warns once per failed upstream call). Yields the proxy's URL and pid."""
    with (
        procs.server(procs.mock(delay=delay)) as (up, _up_pid),
        procs.server([sys.executable, "refuser.py", "{port}"]) as (refuser, _refuser_pid),
    ):
        azure = f'[azure]\nendpoint = "{refuser}"\napi_key = "soak-upstream-key"\n'
        with procs.imagegen_proxy(up, azure, stderr=log) as running:
            yield running


def _last_fds(series: procs.Series) -> int:
    return series.rows[-1][2] if series.rows else 0


def wait_idle(series: procs.Series, before: int, most: float, least: float = 5.0) -> None:
    """After the load, sample on until the proxy's open fds are back to `before` (its pooled
    upstream connections expire after 30 s idle, checked every 30 s), for `least` to `most`
    seconds."""
    started = time.monotonic()
    while time.monotonic() - started < most:
        time.sleep(1.0)
        if time.monotonic() - started >= least and _last_fds(series) <= before:
            return


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=5.0, help="of load (0.5: smoke run)")
    parser.add_argument("--rate", type=float, default=100.0, help="requests started per second")
    parser.add_argument("--bound", type=int, default=256, help="most requests in flight")
    parser.add_argument("--delay", type=float, default=0.2, help="the mock's generation time")
    parser.add_argument("--idle", type=float, default=5.0, help="seconds sampled before")
    parser.add_argument(
        "--after", type=float, default=70.0, help="most seconds sampled after, for fds to return"
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    seconds = args.minutes * 60
    with tempfile.TemporaryFile() as log:
        with servers(args.delay, log) as (url, pid), procs.Series(pid) as series:
            load_before = os.getloadavg()
            time.sleep(args.idle)  # the idle baseline
            fds_before = _last_fds(series)
            origin = time.monotonic()
            print(f"... {seconds:.0f} s at {args.rate:g} req/s against pid {pid}", flush=True)
            outcomes, skipped = asyncio.run(
                drive(url, args.rate, seconds, args.bound, origin, args.seed)
            )
            drained = time.monotonic() - origin
            wait_idle(series, fds_before, args.after)
            load_after = os.getloadavg()
        log.seek(0)
        proxy_log = log.read().decode(errors="replace").splitlines()
    results = soak_report.summarize(
        outcomes,
        [(t - origin, rss, fds, cpu) for t, rss, fds, cpu in series.rows],
        seconds=seconds,
        drained=drained,
        skipped=skipped,
        proxy_log=proxy_log,
    )
    results["settings"] = {**vars(args), "mix": MIX}
    results["machine"] = {"loadavg_before": load_before, "loadavg_after": load_after}
    print(soak_report.write(results, Path(args.out)))


if __name__ == "__main__":
    main()
