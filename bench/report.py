"""The bench's report: a table (printed and Markdown), JSON, and a PNG chart."""

from __future__ import annotations

import json
import platform
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

NAMES = ["direct", "floor", "imagegen_proxy"]


def _targets(r: dict[str, Any]) -> list[tuple[str, str, bool]]:
    small, big, stream, slow = r["small_json"], r["big_images"], r["streaming"], r["slow"]
    proxy, floor = small["imagegen_proxy"], small["floor"]
    ratio = proxy["c20_rps"] / floor["c20_rps"]
    added = proxy["added_p50_ms"] / max(floor["added_p50_ms"], 1e-9)
    p = slow["imagegen_proxy"]
    return [
        ("throughput c=20 ≥ 0.60 × floor", f"{ratio:.2f} × floor", ratio >= 0.60),
        ("added p50 c=1 ≤ 1.5 × floor's", f"{added:.2f} × floor's", added <= 1.5),
        (
            "RSS growth, 32 × 4 MB in flight ≤ 40 MB",
            f"{big['imagegen_proxy']['rss_growth_mb']:.1f} MB",
            big["imagegen_proxy"]["rss_growth_mb"] <= 40,
        ),
        (
            "partial-event delay p99 ≤ 5 ms",
            f"{stream['imagegen_proxy']['p99_ms']:.2f} ms",
            stream["imagegen_proxy"]["p99_ms"] <= 5,
        ),
        (
            f"{r['settings']['slow']} slow generations: 0 errors, RSS < 300 MB",
            f"{p['failed']} errors, {p['peak_rss_mb']:.0f} MB",
            p["failed"] == 0 and p["peak_rss_mb"] < 300,
        ),
    ]


def table(r: dict[str, Any]) -> str:
    small, big, stream, slow = r["small_json"], r["big_images"], r["streaming"], r["slow"]

    def row(label: str, values: list[str]) -> str:
        return f"| {label} | " + " | ".join(values) + " |"

    def each(figure: dict[str, Any], key: str, fmt: str) -> list[str]:
        return [format(figure[name][key], fmt) if key in figure[name] else "–" for name in NAMES]

    lines = [
        "| figure | direct | floor | imagegen_proxy |",
        "|---|---|---|---|",
        row("c=1 latency p50 (ms)", each(small, "c1_p50_ms", ".2f")),
        row("c=1 latency p99 (ms)", each(small, "c1_p99_ms", ".2f")),
        row(
            "added latency p50 / p99 (ms)",
            ["–"]
            + [
                f"{small[n]['added_p50_ms']:.2f} / {small[n]['added_p99_ms']:.2f}"
                for n in NAMES[1:]
            ],
        ),
        row("throughput c=20 (req/s)", each(small, "c20_rps", ".0f")),
        row("throughput c=100 (req/s)", each(small, "c100_rps", ".0f")),
        row("4 MB images, c=32 (req/s)", each(big, "rps", ".1f")),
        row("4 MB images, c=32: errors (wrk)", each(big, "errors", ".0f")),
        row("4 MB images, c=32: RSS growth (MB)", ["–", *each(big, "rss_growth_mb", ".1f")[1:]]),
        row("partial event → client p50 (ms)", each(stream, "p50_ms", ".2f")),
        row("partial event → client p99 (ms)", each(stream, "p99_ms", ".2f")),
        row(
            f"{r['settings']['slow']} slow generations: ok", [f"{slow[n]['ok']:.0f}" for n in NAMES]
        ),
        row(
            "… peak RSS (MB) / peak open fds",
            ["–"]
            + [f"{slow[n]['peak_rss_mb']:.0f} / {slow[n]['peak_fds']:.0f}" for n in NAMES[1:]],
        ),
        "",
        "| target | measured | met |",
        "|---|---|---|",
    ]
    lines += [f"| {t} | {m} | {'yes' if ok else '**no**'} |" for t, m, ok in _targets(r)]
    return "\n".join(lines)


def chart(r: dict[str, Any], path: Path) -> None:
    small, big, stream = r["small_json"], r["big_images"], r["streaming"]
    figure, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    colours = ["#9aa5b1", "#5b8def", "#e8833a"]
    panels = [
        (
            axes[0][0],
            "throughput, small JSON (req/s)",
            ["c=20", "c=100"],
            [[small[n]["c20_rps"], small[n]["c100_rps"]] for n in NAMES],
        ),
        (
            axes[0][1],
            "latency at c=1 (ms)",
            ["p50", "p99"],
            [[small[n]["c1_p50_ms"], small[n]["c1_p99_ms"]] for n in NAMES],
        ),
        (
            axes[1][0],
            "4 MB images at c=32",
            ["req/s", "RSS growth (MB)"],
            [[big[n]["rps"], big[n]["rss_growth_mb"]] for n in NAMES],
        ),
        (
            axes[1][1],
            "partial event → client (ms)",
            ["p50", "p99"],
            [[stream[n]["p50_ms"], stream[n]["p99_ms"]] for n in NAMES],
        ),
    ]
    for axis, title, groups, values in panels:
        width = 0.26
        for i, name in enumerate(NAMES):
            positions = [g + (i - 1) * width for g in range(len(groups))]
            axis.bar(positions, values[i], width, label=name, color=colours[i])
        axis.set_xticks(range(len(groups)), groups)
        axis.set_title(title)
    axes[0][0].legend()
    figure.suptitle("imagegen_proxy vs a bare passthrough (floor) and no proxy (direct)")
    figure.tight_layout()
    figure.savefig(path, dpi=90)


def write(results: dict[str, Any], out: Path) -> str:
    out.mkdir(parents=True, exist_ok=True)
    results["machine"] = results.get("machine") or {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "cpus": __import__("os").cpu_count(),
    }
    (out / "latest.json").write_text(json.dumps(results, indent=2))
    text = table(results)
    (out / "latest.md").write_text(text + "\n")
    chart(results, out / "chart.png")
    return text
