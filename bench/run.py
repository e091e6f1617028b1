"""imagegen_proxy's benchmark: direct, floor and imagegen_proxy side by side, in one run.

    python bench/run.py             # the full run (about 6 minutes)
    python bench/run.py --quick     # fewer, shorter rounds (about 2 minutes)

Everything runs on 127.0.0.1; each server is its own process. See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

import load
import procs
import report

NAMES = ["direct", "floor", "imagegen_proxy"]
Targets = dict[str, tuple[str, int | None]]


@contextlib.contextmanager
def targets(upstream: list[str]) -> Iterator[Targets]:
    """The upstream, and the floor and imagegen_proxy in front of it: the proxy as users run
    it (one key with a budget, a pool of two upstreams, the access log on), the floor with
    no feature at all."""
    with (
        procs.server(upstream) as (up, _up_pid),
        procs.floor(up) as (floor, floor_pid),
        procs.as_users_run_it(up) as (proxy, proxy_pid),
    ):
        yield {
            "direct": (up, None),
            "floor": (floor, floor_pid),
            "imagegen_proxy": (proxy, proxy_pid),
        }


def rounds(
    count: int, measure: Callable[[str, str, int | None], dict[str, float]], found: Targets
) -> dict[str, list[dict[str, float]]]:
    """Alternate the targets round by round (rotating the order) so machine drift cancels."""
    results: dict[str, list[dict[str, float]]] = {name: [] for name in NAMES}
    for index in range(count):
        order = NAMES[index % 3 :] + NAMES[: index % 3]
        for name in order:
            url, pid = found[name]
            results[name].append(measure(name, url, pid))
    return results


def median(runs: list[dict[str, float]], key: str) -> float:
    return statistics.median(run[key] for run in runs)


def small_json(args: argparse.Namespace) -> dict[str, Any]:
    with targets(procs.mock()) as found:
        for url, _ in found.values():  # warm up: connections, caches, JIT-less but still
            load.wrk(url, 20, 1)
        runs = rounds(
            args.rounds,
            lambda name, url, pid: {
                **{f"c1_{k}": v for k, v in load.wrk(url, 1, args.seconds, threads=1).items()},
                **{f"c20_{k}": v for k, v in load.wrk(url, 20, args.seconds).items()},
                **{f"c100_{k}": v for k, v in load.wrk(url, 100, args.seconds).items()},
            },
            found,
        )
    out: dict[str, Any] = {}
    for name in NAMES:
        out[name] = {key: median(runs[name], key) for key in runs[name][0]}
    for name in ("floor", "imagegen_proxy"):
        added = [
            r["c1_p50_ms"] - d["c1_p50_ms"] for r, d in zip(runs[name], runs["direct"], strict=True)
        ]
        added99 = [
            r["c1_p99_ms"] - d["c1_p99_ms"] for r, d in zip(runs[name], runs["direct"], strict=True)
        ]
        out[name]["added_p50_ms"] = statistics.median(added)
        out[name]["added_p99_ms"] = statistics.median(added99)
    return out


def big_images(args: argparse.Namespace) -> dict[str, Any]:
    def measure(name: str, url: str, pid: int | None) -> dict[str, float]:
        with contextlib.ExitStack() as stack:
            sampler = stack.enter_context(procs.Sampler(pid)) if pid else None
            result = load.wrk(url, 32, args.seconds)
        result["rss_growth_mb"] = sampler.growth_mb if sampler else 0.0
        return result

    with targets(procs.mock(pad_to=4_000_000)) as found:
        for url, _ in found.values():
            load.wrk(url, 32, 1)
        runs = rounds(args.rounds, measure, found)
    return {name: {key: median(runs[name], key) for key in runs[name][0]} for name in NAMES}


def streaming(args: argparse.Namespace) -> dict[str, Any]:
    with targets(procs.uvicorn_app("ticker:app")) as found:
        runs = rounds(args.rounds, lambda name, url, pid: load.stream_delays(url), found)
    return {name: {key: median(runs[name], key) for key in runs[name][0]} for name in NAMES}


def slow(args: argparse.Namespace) -> dict[str, Any]:
    out = {}
    with targets(procs.mock(delay=args.slow_seconds)) as found:
        for name in NAMES:
            url, pid = found[name]
            with contextlib.ExitStack() as stack:
                sampler = stack.enter_context(procs.Sampler(pid)) if pid else None
                result = load.slow_generations(url, args.slow)
            if sampler:
                result.update(
                    peak_rss_mb=sampler.peak_rss / 2**20,
                    rss_growth_mb=sampler.growth_mb,
                    peak_fds=sampler.peak_fds,
                )
            out[name] = result
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=5.0, help="per wrk run")
    parser.add_argument("--slow", type=int, default=2000, help="concurrent slow generations")
    parser.add_argument("--slow-seconds", type=float, default=10.0)
    parser.add_argument("--quick", action="store_true", help="3 rounds of 2 s, 500 slow")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.seconds, args.slow = 3, 2.0, 500
    results = {"settings": vars(args).copy()}
    for figure, run in [
        ("small_json", small_json),
        ("big_images", big_images),
        ("streaming", streaming),
        ("slow", slow),
    ]:
        print(f"... {figure}", flush=True)
        results[figure] = run(args)
    print(report.write(results, Path(args.out)))


if __name__ == "__main__":
    main()
