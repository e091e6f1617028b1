"""Answers from the kinds that speak their own API (Gemini, FLUX, Stability, Bedrock): the
proxy's memory and CPU while 8 answers of 4 MB images are in flight, each kind side by
side with the OpenAI kind in the same run, against the same mock.

    python bench/providers.py            # 5 rounds of 8 concurrent 4 MB images per kind
    python bench/providers.py --quick    # 2 rounds of 8 concurrent 1 MB images

The mock (`python -m imagegen_proxy.mock --pad-to N`) speaks every kind's wire and pads
its PNGs to N bytes. One proxy per kind, each with one `[[upstreams]]` member of that kind
pointing at the mock. The kinds take turns within a round and the order rotates between
rounds, so drift on the machine falls on all of them alike. A round sends `--concurrency`
non-streaming generations at once and reads each answer to its end without keeping it
(its size is counted, and its image checked to be the mock's size). RSS is sampled every
50 ms (growth: the round's peak minus the RSS before it); CPU from psutil before and after.
Writes bench/results/providers.json and providers.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

import aiohttp
import procs
import psutil

MB = 2**20
SECRET = "bench-aws-secret-0123456789"
# Each kind's member, its model, and how the proxy reaches the mock as that kind.
KINDS: dict[str, tuple[str, str]] = {
    "openai": ('kind = "openai"\nbase_url = "{mock}/v1"\n', "gpt-image-1"),
    "gemini": ('kind = "gemini"\nbase_url = "{mock}"\napi_key = "k"\n', "gemini-3.1-flash-image"),
    "bfl": (
        'kind = "bfl"\nbase_url = "{mock}"\napi_key = "k"\npoll_interval = 0.05\n'
        'result_hosts = ["127.0.0.1"]\n',
        "flux-pro-1.1",
    ),
    "stability": ('kind = "stability"\nbase_url = "{mock}"\napi_key = "k"\n', "core"),
    "bedrock": (
        'kind = "bedrock"\nbase_url = "{mock}"\nregion = "us-east-1"\n'
        'aws_access_key_id = "AKIABENCH0123456789"\n'
        'aws_secret_access_key_env = "BENCH_AWS_SECRET"\n',
        "amazon.nova-canvas-v1:0",
    ),
}
# `--storage`: the OpenAI kind with `response_format="url"`, its images kept in a directory
# or in an S3 API (moto's server, started here), beside the same kind answering base64.
STORED: dict[str, str] = {
    "openai+file": '[storage]\nurl = "file://{directory}"\n',
    "openai+s3": (
        '[storage]\nurl = "s3://bench/kept"\nendpoint_url = "{s3}"\n'
        'access_key_id_env = "BENCH_S3_KEY"\nsecret_access_key_env = "BENCH_S3_SECRET"\n'
        "part_size = 5242880\n"
    ),
}


@contextlib.contextmanager
def proxies(
    mock: str, kinds: list[str], stores: dict[str, str]
) -> Iterator[dict[str, tuple[str, int]]]:
    with contextlib.ExitStack() as stack:
        running = {}
        for kind in kinds:
            member, _ = KINDS[kind.split("+")[0]]
            members = '[[upstreams]]\nname = "u"\n' + member.format(mock=mock)
            members += "[access_log]\nenabled = false\n"
            if kind in STORED:
                members += STORED[kind].format(**stores)
            env = {
                "BENCH_AWS_SECRET": SECRET,
                "BENCH_S3_KEY": "AKIABENCH0000000000",
                "BENCH_S3_SECRET": SECRET,
            }
            running[kind] = stack.enter_context(
                procs.imagegen_proxy(mock, members=members, env=env)
            )
        yield running


async def one_round(
    url: str, model: str, concurrency: int, as_url: bool = False
) -> tuple[float, int, list[str]]:
    """`concurrency` generations at once: the round's seconds, bytes read, errors."""
    body = {"model": model, "prompt": "a lighthouse at dawn", "size": "1024x1024"}
    if as_url:
        body["response_format"] = "url"
    headers = {"authorization": f"Bearer {procs.KEY}"}
    errors: list[str] = []
    read = 0
    timeout = aiohttp.ClientTimeout(total=300)

    async def one(session: aiohttp.ClientSession) -> None:
        nonlocal read
        async with session.post(url + "/v1/images/generations", json=body, headers=headers) as r:
            size = 0
            async for chunk in r.content.iter_chunked(65536):
                size += len(chunk)
            read += size
            if r.status != 200:
                errors.append(f"{r.status}")

    async with aiohttp.ClientSession(timeout=timeout) as session:
        started = time.perf_counter()
        await asyncio.gather(*(one(session) for _ in range(concurrency)))
        return time.perf_counter() - started, read, errors


@contextlib.contextmanager
def storage_places() -> Iterator[dict[str, str]]:
    """A directory, and moto's S3 server with a bucket, for `--storage`."""
    import tempfile

    import botocore.session
    from moto.server import ThreadedMotoServer

    port = procs.free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    client = botocore.session.get_session().create_client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="AKIABENCH0000000000",
        aws_secret_access_key=SECRET,
    )
    client.create_bucket(Bucket="bench")
    try:
        with tempfile.TemporaryDirectory(prefix="imagegen-bench-") as directory:
            yield {"directory": directory, "s3": endpoint}
    finally:
        server.stop()


def measure(
    pid: int, url: str, model: str, concurrency: int, as_url: bool = False
) -> dict[str, Any]:
    process = psutil.Process(pid)
    cpu = process.cpu_times()
    with procs.Sampler(pid) as sampler:
        seconds, read, errors = asyncio.run(one_round(url, model, concurrency, as_url))
    after = process.cpu_times()
    return {
        "seconds": seconds,
        "mb_read": read / MB,
        "errors": errors,
        "rss_growth_mb": sampler.growth_mb,
        "cpu_ms_per_request": (after.user + after.system - cpu.user - cpu.system)
        * 1000
        / concurrency,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--pad-to", type=int, default=4_000_000)
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--storage", action="store_true", help="the OpenAI kind with and without [storage]"
    )
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.pad_to = 2, 1_000_000
    kinds = ["openai", *STORED] if args.storage else args.kinds.split(",")
    rows: dict[str, list[dict[str, Any]]] = {kind: [] for kind in kinds}
    with contextlib.ExitStack() as stack:
        stores = stack.enter_context(storage_places()) if args.storage else {}
        mock, _ = stack.enter_context(procs.server(procs.mock(pad_to=args.pad_to)))
        running = stack.enter_context(proxies(mock, kinds, stores))
        for kind in kinds:  # warm: the mock's PNG cache, each proxy's connections
            url, pid = running[kind]
            measure(pid, url, KINDS[kind.split("+")[0]][1], 2, kind in STORED)
        for index in range(args.rounds):
            order = kinds[index % len(kinds) :] + kinds[: index % len(kinds)]
            for kind in order:
                url, pid = running[kind]
                model = KINDS[kind.split("+")[0]][1]
                rows[kind].append(measure(pid, url, model, args.concurrency, kind in STORED))
    summary = {}
    for kind, measured in rows.items():
        errors = sum(len(row["errors"]) for row in measured)
        summary[kind] = {
            "rounds": len(measured),
            "errors": errors,
            "answer_mb": statistics.median(row["mb_read"] for row in measured) / args.concurrency,
            "rss_growth_mb": max(row["rss_growth_mb"] for row in measured),
            "rss_growth_median_mb": statistics.median(row["rss_growth_mb"] for row in measured),
            "cpu_ms_per_request": statistics.median(row["cpu_ms_per_request"] for row in measured),
            "round_seconds": statistics.median(row["seconds"] for row in measured),
        }
    base = summary.get("openai")
    lines = [
        f"{args.concurrency} concurrent generations of {args.pad_to / MB:.1f} MB PNGs, "
        f"{args.rounds} rounds per kind (median; RSS growth: the largest round's).",
        "",
        "| kind | answer (MB) | round (s) | proxy CPU per request (ms) "
        "| RSS growth, max / median (MB) | errors |",
        "|---|---|---|---|---|---|",
    ]
    for kind, row in summary.items():
        ratio = ""
        if base is not None and kind != "openai" and base["cpu_ms_per_request"]:
            ratio = f" ({row['cpu_ms_per_request'] / base['cpu_ms_per_request']:.2f}×)"
        lines.append(
            f"| {kind} | {row['answer_mb']:.1f} | {row['round_seconds']:.2f} | "
            f"{row['cpu_ms_per_request']:.1f}{ratio} | "
            f"{row['rss_growth_mb']:.1f} / {row['rss_growth_median_mb']:.1f} | {row['errors']} |"
        )
    out = Path(args.out)
    out.mkdir(exist_ok=True)
    (out / "providers.json").write_text(json.dumps({"summary": summary, "rounds": rows}, indent=1))
    (out / "providers.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
