"""The soak's report: figures per 10-second window, the summary and its verdicts, written as
JSON, a Markdown table and a PNG chart."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import statistics
from collections import Counter
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

if TYPE_CHECKING:
    from soak import Outcome

WINDOW = 10.0
# "Settled" RSS: the median of the samples 20-30% into the load, once warm-up is over;
# "end" RSS: the median of the last 10%. Medians, so one sample caught mid-burst is noise.
SETTLED = (0.2, 0.3)
END = (0.9, 1.0)
MAX_GROWTH = 1.10
Sample = tuple[float, int, int, float]  # seconds since the load started, RSS, fds, CPU %


def percentile(values: Iterable[float], q: float) -> float | None:
    """Nearest rank: the smallest value with at least `q` of them at or below it."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)] if ordered else None


def _median(values: Iterable[float]) -> float | None:
    listed = list(values)
    return statistics.median(listed) if listed else None


def _between(samples: list[Sample], low: float, high: float, column: int) -> float | None:
    return _median(s[column] for s in samples if low <= s[0] < high)


def _json_ms(outcomes: Iterable[Outcome]) -> list[float]:
    # Only successful plain JSON: the other kinds' times measure the failure injected.
    return [o.seconds * 1000 for o in outcomes if o.kind == "json" and o.outcome == "ok"]


def windows(outcomes: list[Outcome], samples: list[Sample], seconds: float) -> list[dict[str, Any]]:
    """Per window, by finishing time: requests done, their outcomes, JSON latency, RSS, fds.
    The last window also takes the requests that finished while the load drained."""
    rows = []
    count = max(1, math.ceil(seconds / WINDOW))
    for index in range(count):
        low, high = index * WINDOW, (index + 1) * WINDOW if index < count - 1 else math.inf
        done = [o for o in outcomes if low <= o.sent + o.seconds < high]
        ms = _json_ms(done)
        rss = _between(samples, low, min(high, seconds), 1)
        rows.append(
            {
                "start": low,
                "done": len(done),
                "outcomes": dict(Counter(o.outcome for o in done)),
                "json_p50_ms": percentile(ms, 0.5),
                "json_p99_ms": percentile(ms, 0.99),
                "rss_mb": rss / 2**20 if rss is not None else None,
                "fds": _between(samples, low, min(high, seconds), 2),
            }
        )
    return rows


def _log_figures(lines: list[str]) -> dict[str, Any]:
    levels = Counter(line.split(":", 1)[0] for line in lines if line[:1].isupper())
    return {
        "lines": len(lines),
        "warnings": levels["WARNING"],
        "errors": levels["ERROR"] + levels["CRITICAL"],
        "tracebacks": sum(line.startswith("Traceback") for line in lines),
        "most_common": Counter(lines).most_common(10),
    }


def _phases(samples: list[Sample], seconds: float, column: int) -> dict[str, float | None]:
    """One column of the samples (RSS, fds) before the load, settled, at its end, its peak
    under load, and after: the last sample, once the proxy has sat idle."""
    load = [s for s in samples if 0 <= s[0] < seconds]
    return {
        "before": _between(samples, -math.inf, 0, column),
        "settled": _between(load, SETTLED[0] * seconds, SETTLED[1] * seconds, column),
        "end": _between(load, END[0] * seconds, END[1] * seconds, column),
        "max": max((s[column] for s in load), default=None),
        "after": samples[-1][column],
    }


def summarize(
    outcomes: list[Outcome],
    samples: list[Sample],
    *,
    seconds: float,
    drained: float,
    skipped: int,
    proxy_log: list[str],
) -> dict[str, Any]:
    """Everything the report shows. `samples` are timed from the load's start; `drained` is
    when the last request finished."""
    rss = {k: v / 2**20 if v is not None else None for k, v in _phases(samples, seconds, 1).items()}
    ratio = rss["end"] / rss["settled"] if rss["end"] and rss["settled"] else None
    ms = _json_ms(outcomes)
    by_window = windows(outcomes, samples, seconds)
    p50s = [w["json_p50_ms"] for w in by_window if w["json_p50_ms"] is not None]
    p99s = [w["json_p99_ms"] for w in by_window if w["json_p99_ms"] is not None]
    streams = [o.seconds * 1000 for o in outcomes if o.kind == "stream" and o.outcome == "ok"]
    unexpected = [o for o in outcomes if o.outcome == "unexpected"]
    return {
        "seconds": seconds,
        "drained": drained,
        "idle_after": samples[-1][0] - drained,
        "started": len(outcomes),
        "skipped": skipped,
        "tried": dict(Counter(o.kind for o in outcomes)),
        "outcomes": {
            kind: dict(Counter(o.outcome for o in outcomes if o.kind == kind))
            for kind in sorted({o.kind for o in outcomes})
        },
        "statuses": dict(sorted(Counter(str(o.status or "hung up") for o in outcomes).items())),
        "status_500": sum(o.status == 500 for o in outcomes),
        "unexpected": len(unexpected),
        "unexpected_examples": [dataclasses.asdict(o) for o in unexpected[:50]],
        "rss_mb": rss,
        "rss_end_over_settled": ratio,
        "fds": _phases(samples, seconds, 2),
        "json_ms": {"p50": percentile(ms, 0.5), "p99": percentile(ms, 0.99), "count": len(ms)},
        "json_window_p50_ms": [min(p50s, default=None), max(p50s, default=None)],
        "json_window_p99_ms": [min(p99s, default=None), max(p99s, default=None)],
        "stream_ms": {"p50": percentile(streams, 0.5), "p99": percentile(streams, 0.99)},
        "proxy_cpu_percent": _median(s[3] for s in samples if 0 <= s[0] < seconds),
        "proxy_log": _log_figures(proxy_log),
        "windows": by_window,
        "series": {
            "t": [round(s[0], 2) for s in samples],
            "rss_mb": [round(s[1] / 2**20, 2) for s in samples],
            "fds": [s[2] for s in samples],
            "cpu_percent": [s[3] for s in samples],
        },
    }


def _f(value: float | None, fmt: str = ".1f") -> str:
    return "–" if value is None else format(value, fmt)


def _verdicts(r: dict[str, Any]) -> list[tuple[str, str, bool]]:
    ratio = r["rss_end_over_settled"]
    return [
        (
            f"RSS end ≤ {MAX_GROWTH:.2f} × settled",
            f"{_f(ratio, '.3f')} × settled",
            ratio is not None and ratio <= MAX_GROWTH,
        ),
        ("no unexpected answer (a 500 is one)", f"{r['unexpected']}", r["unexpected"] == 0),
    ]


def table(r: dict[str, Any]) -> str:
    """The summary as Markdown: the figures, the verdicts, and any unexpected answers."""
    s, rss, fds, out, log = r["settings"], r["rss_mb"], r["fds"], r["outcomes"], r["proxy_log"]

    def count(kind: str, outcome: str) -> int:
        return int(out.get(kind, {}).get(outcome, 0))

    rows = [
        (
            "load",
            f"{r['seconds']:.0f} s at {s['rate']:g} req/s, open loop; mock delay {s['delay']:g} s",
        ),
        ("requests started / skipped (over the bound)", f"{r['started']} / {r['skipped']}"),
        ("tried by kind", ", ".join(f"{k} {v}" for k, v in sorted(r["tried"].items()))),
        ("statuses", ", ".join(f"{k}: {v}" for k, v in r["statuses"].items())),
        ("JSON ok / streams read whole, ok", f"{count('json', 'ok')} / {count('stream', 'ok')}"),
        (
            "disconnects: while waiting (answered first) / mid-stream",
            f"{count('drop_waiting', 'disconnected')} ({count('drop_waiting', 'answered')})"
            f" / {count('drop_stream', 'disconnected')}",
        ),
        (
            "upstream errors injected: 400 passed through / 502",
            f"{count('upstream_400', 'upstream 400')} / {count('upstream_502', 'upstream 502')}",
        ),
        ("bad key: 401", f"{count('bad_key', 'refused 401')}"),
        ("500s from the proxy / unexpected answers", f"{r['status_500']} / {r['unexpected']}"),
        (
            f"RSS before / settled / end / after {r['idle_after']:.0f} s idle, MB (max)",
            " / ".join(_f(rss[k]) for k in ("before", "settled", "end", "after"))
            + f" ({_f(rss['max'])})",
        ),
        (
            f"open FDs before / settled / end / after {r['idle_after']:.0f} s idle (max)",
            " / ".join(_f(fds[k], ".0f") for k in ("before", "settled", "end", "after"))
            + f" ({_f(fds['max'], '.0f')})",
        ),
        (
            "JSON latency p50 / p99 over the run (ms)",
            f"{_f(r['json_ms']['p50'])} / {_f(r['json_ms']['p99'])}",
        ),
        (
            "JSON p50, p99 per 10 s window: lowest – highest (ms)",
            f"{_f(r['json_window_p50_ms'][0])} – {_f(r['json_window_p50_ms'][1])},"
            f" {_f(r['json_window_p99_ms'][0])} – {_f(r['json_window_p99_ms'][1])}",
        ),
        (
            "stream read whole p50 / p99 (ms)",
            f"{_f(r['stream_ms']['p50'])} / {_f(r['stream_ms']['p99'])}",
        ),
        ("proxy CPU under load, median (% of a core)", _f(r["proxy_cpu_percent"], ".0f")),
        (
            "proxy log: warnings / errors / tracebacks",
            f"{log['warnings']} / {log['errors']} / {log['tracebacks']}",
        ),
        (
            "machine load average (1 min), before / after",
            f"{r['machine']['loadavg_before'][0]:.2f} / {r['machine']['loadavg_after'][0]:.2f}",
        ),
    ]
    lines = ["| figure | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]
    lines += ["", "| target | measured | met |", "|---|---|---|"]
    lines += [f"| {t} | {m} | {'yes' if ok else '**no**'} |" for t, m, ok in _verdicts(r)]
    if r["unexpected_examples"]:
        lines += ["", "Unexpected answers (the first 10):", ""]
        lines += [
            f"- {e['sent']:.1f} s, {e['kind']}: status {e['status']}: {e['detail'][:160]}"
            for e in r["unexpected_examples"][:10]
        ]
    return "\n".join(lines)


def chart(r: dict[str, Any], path: Path) -> None:
    """RSS, open FDs and JSON latency over time, three panels sharing the time axis."""
    series, rss = r["series"], r["rss_mb"]
    seconds = r["seconds"]
    figure, (top, middle, bottom) = plt.subplots(3, 1, sharex=True, figsize=(10, 8.5))
    top.plot(series["t"], series["rss_mb"], color="#e8833a", label="RSS")
    if rss["settled"] is not None:
        top.axhline(rss["settled"], color="#5b8def", ls="--", lw=1, label="settled")
        top.axhline(
            MAX_GROWTH * rss["settled"],
            color="#c0392b",
            ls=":",
            lw=1,
            label=f"{MAX_GROWTH:.2f} × settled",
        )
    for low, high in (SETTLED, END):
        top.axvspan(low * seconds, high * seconds, color="#9aa5b1", alpha=0.2)
    top.set_ylabel("RSS (MB)")
    top.legend(loc="lower right")
    middle.plot(series["t"], series["fds"], color="#5b8def")
    middle.set_ylabel("open FDs")
    mid = [w["start"] + WINDOW / 2 for w in r["windows"]]
    bottom.plot(mid, [w["json_p50_ms"] for w in r["windows"]], marker=".", label="p50")
    bottom.plot(mid, [w["json_p99_ms"] for w in r["windows"]], marker=".", label="p99")
    bottom.set_ylabel("JSON latency (ms)")
    bottom.set_xlabel("seconds since the load started (shaded: the settled and end windows)")
    bottom.legend(loc="upper right")
    for axis in (top, middle, bottom):
        axis.axvline(0, color="grey", lw=0.8)
        axis.axvline(seconds, color="grey", lw=0.8)
    figure.suptitle(
        f"imagegen_proxy soak: {seconds / 60:g} min of mixed load at"
        f" {r['settings']['rate']:g} req/s"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def write(results: dict[str, Any], out: Path) -> str:
    """Write soak.json, soak.md and soak.png under `out`; return the Markdown."""
    out.mkdir(parents=True, exist_ok=True)
    results["machine"] = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        **results.get("machine", {}),
    }
    (out / "soak.json").write_text(json.dumps(results, indent=2))
    text = table(results)
    (out / "soak.md").write_text(text + "\n")
    chart(results, out / "soak.png")
    return text
