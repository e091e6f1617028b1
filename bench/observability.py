"""What observability costs on the hot path: the proxy with the access log and metrics off,
with the access log only (the default), and with both, side by side in one run.

    python bench/observability.py            # 7 rounds of 4 s (about 3 minutes)
    python bench/observability.py --quick    # 3 rounds of 2 s

Each variant is its own `imagegen-proxy` process in front of the same mock; wrk posts small
generations at c=1 (latency) and c=20 (throughput). The variants alternate within a round
and the order rotates between rounds. On 2 cores, wrk, the mock and the proxy compete, so
request rates swing by ±15% between rounds; the steadier figure is the proxy process's own
CPU time per request (user + system, from psutil) during the c=20 runs.
Needs the `metrics` extra (prometheus-client).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import load
import procs
import psutil

VARIANTS = {
    "off": "[access_log]\nenabled = false\n",
    "access log": "",  # the default: JSON access log on, metrics off
    "access log + metrics": "[metrics]\nenabled = true\n",
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.seconds = 3, 2.0
    names = list(VARIANTS)
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    with contextlib.ExitStack() as stack:
        upstream, _ = stack.enter_context(procs.server(procs.mock()))
        started = {
            name: stack.enter_context(procs.imagegen_proxy(upstream, extra))
            for name, extra in VARIANTS.items()
        }
        for url, _ in started.values():
            load.wrk(url, 20, 1)  # warm up
        for index in range(args.rounds):
            for name in names[index % 3 :] + names[: index % 3]:
                url, pid = started[name]
                c1 = load.wrk(url, 1, args.seconds, threads=1)
                cpu = psutil.Process(pid).cpu_times()
                c20 = load.wrk(url, 20, args.seconds)
                after = psutil.Process(pid).cpu_times()
                spent = after.user + after.system - cpu.user - cpu.system
                requests = c20["rps"] * max(1, round(args.seconds))
                runs[name].append(
                    {
                        "c1_p50_ms": c1["p50_ms"],
                        "c1_p99_ms": c1["p99_ms"],
                        "c20_rps": c20["rps"],
                        "cpu_us_per_request": spent / requests * 1e6,
                    }
                )
    result = {
        name: {key: statistics.median(run[key] for run in runs[name]) for key in runs[name][0]}
        for name in names
    }
    base = result["off"]
    lines = [
        "| variant | proxy CPU per request (µs) | vs off | c=1 p50 (ms) | c=1 p99 (ms) "
        "| c=20 (req/s) |",
        "|---|---|---|---|---|---|",
    ]
    for name in names:
        row = result[name]
        extra = row["cpu_us_per_request"] - base["cpu_us_per_request"]
        lines.append(
            f"| {name} | {row['cpu_us_per_request']:.0f} | {extra:+.0f} µs | "
            f"{row['c1_p50_ms']:.2f} | {row['c1_p99_ms']:.2f} | {row['c20_rps']:.0f} |"
        )
    table = "\n".join(lines)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "observability.json").write_text(json.dumps({"settings": vars(args), **result}))
    (out / "observability.md").write_text(
        f"`python bench/observability.py` ({args.rounds} rounds of {args.seconds:g} s, "
        "median)\n\n" + table + "\n"
    )
    print(table)


if __name__ == "__main__":
    main()
