"""What failing over costs a client: the time to a successful answer when the first
candidate's port is closed, against a pool whose first candidate answers.

    python bench/failover.py            # 300 requests per proxy, alternating (about 20 s)

Two `imagegen-proxy` processes in front of the same mock, each with a pool of two
upstreams at two priorities. In "direct", the first is the mock; in "failover", the first
is a closed port on 127.0.0.1 (connection refused) and the second the mock, with
`failures_to_open` so high that the dead one is tried on every request. Requests alternate
between the two, one at a time; the table gives the latency of each and the difference.
A closed port on loopback refuses at once: a dead host elsewhere costs up to the
upstream's `connect_timeout` instead, once, before its cooldown keeps it out.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))

import procs

RESULTS = Path(__file__).parent / "results"


def closed_port() -> int:
    with contextlib.closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def pooled(first: str, second: str) -> Iterator[str]:
    config = "[auth]\nopen = true\n[access_log]\nenabled = false\n"
    for name, url, priority in (("first", first, 1), ("second", second, 2)):
        config += f'[[upstreams]]\nname = "{name}"\nkind = "openai"\nbase_url = "{url}/v1"\n'
        config += f'api_key = "k"\npriority = {priority}\n'
    config += "[pool]\nfailures_to_open = 1000000000\n"
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as file:
        file.write(config)
    command = [str(Path(sys.executable).parent / "imagegen-proxy"), "--config", file.name]
    command += ["--port", "{port}", "--log-level", "error"]
    try:
        with procs.server(command) as (url, _):
            yield url
    finally:
        os.unlink(file.name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=300)
    args = parser.parse_args()
    dead = f"http://127.0.0.1:{closed_port()}"
    body = {"prompt": "a lighthouse", "model": "gpt-image-1"}
    times: dict[str, list[float]] = {"direct": [], "failover": []}
    with (
        procs.server(procs.mock()) as (mock, _),
        pooled(mock, mock) as direct,
        pooled(dead, mock) as failover,
        httpx.Client() as client,
    ):
        urls = {"direct": direct, "failover": failover}
        for url in urls.values():  # warm up: connections, caches
            for _ in range(20):
                client.post(url + "/v1/images/generations", json=body).raise_for_status()
        for _ in range(args.requests):
            for name, url in urls.items():
                started = time.perf_counter()
                client.post(url + "/v1/images/generations", json=body).raise_for_status()
                times[name].append((time.perf_counter() - started) * 1000)
    rows = ["| proxy | p50 (ms) | p90 (ms) | p99 (ms) |", "|---|---|---|---|"]
    for name, values in times.items():
        cuts = statistics.quantiles(values, n=100)
        rows.append(f"| {name} | {cuts[49]:.2f} | {cuts[89]:.2f} | {cuts[98]:.2f} |")
    delay = statistics.median(times["failover"]) - statistics.median(times["direct"])
    text = (
        f"`python bench/failover.py` ({args.requests} requests each, alternating)\n\n"
        + "\n".join(rows)
        + f"\n\nFailover to the second upstream adds {delay:.2f} ms at the median.\n"
    )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "failover.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
