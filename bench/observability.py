"""What observability costs on the hot path: the proxy with the access log and metrics off,
with the access log only (the default), with both, and with the access log and traces
(every request, or one in ten, exported over OTLP/HTTP to a sink), side by side in one run.

    python bench/observability.py            # 7 rounds of 4 s (about 3 minutes)
    python bench/observability.py --quick    # 3 rounds of 2 s

Each variant is its own `imagegen-proxy` process in front of the same mock; wrk posts small
generations at c=1 (latency) and c=20 (throughput). The variants alternate within a round
and the order rotates between rounds. On 2 cores, wrk, the mock and the proxy compete, so
request rates swing by ±15% between rounds; the steadier figure is the proxy process's own
CPU time per request (user + system, from psutil) during the c=20 runs.
Needs the `metrics` and `tracing` extras (prometheus-client, the OpenTelemetry SDK).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import load
import procs

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
    with contextlib.ExitStack() as stack:
        upstream, _ = stack.enter_context(procs.server(procs.mock()))
        # The collector: anything it is sent, answered 200 at once.
        collector, _ = stack.enter_context(procs.server(procs.uvicorn_app("sink:app")))
        tracing = f'[tracing]\nenabled = true\nendpoint = "{collector}"\n'
        variants = VARIANTS | {
            "access log + traces": tracing,
            "access log + traces, 10% sampled": tracing + "sample_ratio = 0.1\n",
        }
        started = {
            name: stack.enter_context(procs.imagegen_proxy(upstream, extra))
            for name, extra in variants.items()
        }
        result = load.side_by_side(started, args.rounds, args.seconds)
    table = load.cpu_table(result, "off", "variant")
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
