"""Image edits uploaded through the proxy: throughput against a direct upload, and what
the proxy's memory does while 8 uploads of 40 MB are in flight, side by side in one run.

    python bench/uploads.py            # 3 rounds of 8 concurrent 40 MB edits (about 30 s)
    python bench/uploads.py --quick    # 1 round of 8 concurrent 10 MB edits

The upstream is a sink ([`sink.py`](sink.py)): it reads each body to its end, counting its
bytes, and answers a small image answer. Three targets, each sent `--concurrency` edits
at once per round, with the same random file (generated once):

- direct: to the sink itself, text fields first (`prompt`, `model`, then `image`), as the
  OpenAI SDK sends them;
- proxy: the same body through `imagegen-proxy`, which streams the file upstream as it
  arrives;
- spooled: through a second `imagegen-proxy`, with the text fields after the file, which
  the proxy spools to a temporary file on disk before it can send anything upstream.

The targets take turns within a round and the order rotates between rounds, so drift on
the machine falls on all of them alike. Throughput is the bytes of all the bodies of a
round over the round's wall time. RSS is sampled every 50 ms (growth: the round's peak
minus the RSS before it), CPU time from psutil before and after each round. Every answer
is checked: status 200 and exactly the bytes the sink should have read (with `--verify`,
their SHA-256 as well). Writes bench/results/uploads.json and uploads.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import secrets
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

import aiohttp
import procs
import psutil

PATH = "/v1/images/edits"
FIELDS = [("prompt", "Put a small red hat on the cat"), ("model", "gpt-image-1")]
FILE_HEAD = 'Content-Disposition: form-data; name="image"; filename="image.png"\r\n'
FILE_HEAD += "Content-Type: image/png"
NAMES = ["direct", "proxy", "spooled"]
TITLES = {
    "direct": "direct",
    "proxy": "proxy (fields first: streamed)",
    "spooled": "proxy (fields after the file: spooled)",
}
MB = 2**20


@dataclass(frozen=True, slots=True)
class Body:
    """A multipart edit as a client sends it, and the file in it."""

    data: bytes
    file: bytes
    content_type: str
    fields_first: bool

    @classmethod
    def make(cls, file: bytes, fields_first: bool) -> Body:
        boundary = secrets.token_hex(16)
        prefix, suffix = _multipart(boundary, fields_first)
        content_type = f"multipart/form-data; boundary={boundary}"
        return cls(prefix + file + suffix, file, content_type, fields_first)


def _multipart(boundary: str, fields_first: bool) -> tuple[bytes, bytes]:
    """The bytes before and after the file in a body with `boundary`: the text fields first
    (or after the file), every part as the proxy itself encodes it."""
    fields = "".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'
        for name, value in FIELDS
    )
    head = f"--{boundary}\r\n{FILE_HEAD}\r\n\r\n"
    end = f"--{boundary}--\r\n"
    if fields_first:
        return (fields + head).encode(), ("\r\n" + end).encode()
    return head.encode(), ("\r\n" + fields + end).encode()


def expected(file: bytes, content_type: str, verify: bool) -> tuple[int, str | None]:
    """The size (and with `verify` the SHA-256) of the body the sink should have read,
    given the Content-Type it got: the proxy re-encodes the upload with its own boundary,
    the text fields first whatever the client's order."""
    boundary = content_type.partition("boundary=")[2]
    prefix, suffix = _multipart(boundary, fields_first=True)
    if not verify:
        return len(prefix) + len(file) + len(suffix), None
    digest = hashlib.sha256(prefix)
    digest.update(file)
    digest.update(suffix)
    return len(prefix) + len(file) + len(suffix), digest.hexdigest()


@dataclass(slots=True)
class Round:
    """One target's round: `concurrency` uploads at once."""

    name: str
    index: int
    seconds: float = 0.0
    uploads: list[float] = field(default_factory=list)  # seconds per upload
    bytes: int = 0  # body bytes sent by the client
    errors: list[str] = field(default_factory=list)
    proxy_rss_growth_mb: float | None = None
    proxy_peak_rss_mb: float | None = None
    proxy_peak_fds: int | None = None
    sink_rss_growth_mb: float = 0.0
    sink_largest_chunk: int = 0  # the largest `http.request` body uvicorn handed the sink
    cpu: dict[str, float] = field(default_factory=dict)  # seconds, per process
    # What the proxy wrote, to its sockets and files (write_chars): the uploads once (to the
    # upstream), twice when they were spooled first.
    proxy_write_mb: float | None = None

    @property
    def mb_per_s(self) -> float:
        return self.bytes / MB / self.seconds


@dataclass(slots=True)
class Target:
    name: str
    url: str
    body: Body
    proxy_pid: int | None


class Uploader:
    """The client: one aiohttp session for every target (a pool per host and port)."""

    def __init__(self, verify: bool) -> None:
        self.verify = verify
        self.session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Uploader:
        # Idle connections are dropped after 3 s: uvicorn (the sink's and the proxy's) closes
        # them after 5 s, and an upload written into a connection it has just closed fails
        # (EPIPE): 16 uploads of 40 MB to the other targets last longer than that.
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=3),
            timeout=aiohttp.ClientTimeout(total=600),
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.session is not None
        await self.session.close()

    async def one(self, target: Target, body: Body) -> tuple[float, str | None, int]:
        """One edit: its time, what went wrong if anything, and the largest chunk of its
        body the sink was handed."""
        assert self.session is not None
        headers = {"authorization": f"Bearer {procs.KEY}", "content-type": body.content_type}
        started = time.perf_counter()
        try:
            async with self.session.post(
                target.url + PATH, data=body.data, headers=headers
            ) as answer:
                raw = await answer.read()
        except aiohttp.ClientError as exc:
            return time.perf_counter() - started, f"{target.name}: {exc!r}", 0
        seconds = time.perf_counter() - started
        if answer.status != 200:
            return seconds, f"{target.name}: {answer.status} {raw[:300]!r}", 0
        sink = json.loads(raw)["sink"]
        if target.proxy_pid is None:
            size = len(body.data)
            digest = hashlib.sha256(body.data).hexdigest() if self.verify else None
        else:
            size, digest = expected(body.file, sink["content_type"], self.verify)
        if sink["bytes"] != size or (digest is not None and sink["sha256"] != digest):
            error = f"{target.name}: the sink read {sink['bytes']} bytes (sha256 "
            error += f"{sink['sha256']}), expected {size} ({digest})"
            return seconds, error, sink["largest_chunk"]
        return seconds, None, sink["largest_chunk"]

    async def round(self, target: Target, concurrency: int, body: Body, index: int = 0) -> Round:
        """`concurrency` uploads of `body` at once."""
        started = time.perf_counter()
        done = await asyncio.gather(*(self.one(target, body) for _ in range(concurrency)))
        return Round(
            target.name,
            index,
            seconds=time.perf_counter() - started,
            uploads=[seconds for seconds, _, _ in done],
            bytes=len(body.data) * concurrency,
            errors=[error for _, error, _ in done if error is not None],
            sink_largest_chunk=max(largest for _, _, largest in done),
        )


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


class Watch:
    """Samples the proxy's (if any) and the sink's RSS every 50 ms, and takes the CPU time
    of them and of this process, around a round."""

    def __init__(self, target: Target, sink_pid: int) -> None:
        self.processes = {"sink": psutil.Process(sink_pid), "client": psutil.Process()}
        if target.proxy_pid is not None:
            self.processes["proxy"] = psutil.Process(target.proxy_pid)
        self._stack = contextlib.ExitStack()
        self._cpu: dict[str, float] = {}
        self._written = 0
        self.sink: procs.Sampler | None = None
        self.proxy: procs.Sampler | None = None

    def __enter__(self) -> Watch:
        self._cpu = {name: cpu_seconds(process) for name, process in self.processes.items()}
        proxy = self.processes.get("proxy")
        if proxy is not None:
            self._written = proxy.io_counters().write_chars
            self.proxy = self._stack.enter_context(procs.Sampler(proxy.pid))
        self.sink = self._stack.enter_context(procs.Sampler(self.processes["sink"].pid))
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()
        self._cpu = {name: cpu_seconds(p) - self._cpu[name] for name, p in self.processes.items()}

    def fill(self, measured: Round) -> None:
        assert self.sink is not None
        measured.cpu = self._cpu
        measured.sink_rss_growth_mb = self.sink.growth_mb
        if self.proxy is not None:
            measured.proxy_rss_growth_mb = self.proxy.growth_mb
            measured.proxy_peak_rss_mb = self.proxy.peak_rss / MB
            measured.proxy_peak_fds = self.proxy.peak_fds
            written = self.proxy.process.io_counters().write_chars - self._written
            measured.proxy_write_mb = written / MB


async def measure(
    args: argparse.Namespace, found: dict[str, Target], sink_pid: int
) -> tuple[list[Round], dict[str, float]]:
    """Warm up every target once, then the rounds; and the proxies' RSS before anything."""
    rounds: list[Round] = []
    start_rss = {
        name: psutil.Process(target.proxy_pid).memory_info().rss / MB
        for name, target in found.items()
        if target.proxy_pid is not None
    }
    async with Uploader(args.verify) as client:
        # Warm-up: connections, code paths, the spool. With 1 MB files, so that
        # the proxies' RSS from start to peak still includes the first big uploads.
        for target in found.values():
            small = Body.make(target.body.file[:MB], target.body.fields_first)
            done = await client.round(target, args.concurrency, small)
            if done.errors:
                raise SystemExit(f"warm-up failed: {done.errors[0]}")
        for index in range(args.rounds):
            for name in NAMES[index % 3 :] + NAMES[: index % 3]:
                target = found[name]
                with Watch(target, sink_pid) as watch:
                    measured = await client.round(target, args.concurrency, target.body, index)
                watch.fill(measured)
                rounds.append(measured)
                line = f"  round {index + 1} {name}: {measured.mb_per_s:.0f} MB/s"
                if measured.proxy_rss_growth_mb is not None:
                    line += f", proxy RSS +{measured.proxy_rss_growth_mb:.1f} MB"
                if measured.errors:
                    line += f", {len(measured.errors)} errors"
                print(line, flush=True)
    return rounds, start_rss


def summarize(rounds: list[Round], start_rss: dict[str, float]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    by_name = {name: [r for r in rounds if r.name == name] for name in NAMES}
    direct = {r.index: r for r in by_name["direct"]}
    for name, runs in by_name.items():
        gigabytes = sum(r.bytes for r in runs) / 2**30
        summary: dict[str, Any] = {
            "mb_per_s": statistics.median(r.mb_per_s for r in runs),
            "vs_direct": statistics.median(r.mb_per_s / direct[r.index].mb_per_s for r in runs),
            "upload_s_p50": statistics.median(s for r in runs for s in r.uploads),
            "upload_s_max": max(s for r in runs for s in r.uploads),
            "errors": sum(len(r.errors) for r in runs),
            "sink_rss_growth_mb_max": max(r.sink_rss_growth_mb for r in runs),
            "sink_largest_chunk_kb": max(r.sink_largest_chunk for r in runs) / 1024,
            "cpu_s_per_gb": {
                process: sum(r.cpu[process] for r in runs) / gigabytes for process in runs[0].cpu
            },
        }
        if runs[0].proxy_rss_growth_mb is not None:
            growth = [r.proxy_rss_growth_mb or 0.0 for r in runs]
            peak = max(r.proxy_peak_rss_mb or 0.0 for r in runs)
            summary.update(
                proxy_rss_growth_mb_median=statistics.median(growth),
                proxy_rss_growth_mb_max=max(growth),
                proxy_rss_start_mb=start_rss[name],
                proxy_rss_peak_mb=peak,
                proxy_peak_fds=max(r.proxy_peak_fds or 0 for r in runs),
                proxy_write_mb_per_round=statistics.median(r.proxy_write_mb or 0.0 for r in runs),
            )
        out[name] = summary
    return out


def table(summary: dict[str, dict[str, Any]], args: argparse.Namespace) -> str:
    """The markdown table: one column per target, a dash where a figure does not apply."""
    rows: list[tuple[str, Callable[[dict[str, Any]], str], bool]] = [
        ("upload throughput (MB/s)", lambda s: f"{s['mb_per_s']:.0f}", False),
        ("vs direct, same round", lambda s: f"{s['vs_direct']:.2f} ×", True),
        (
            "per upload, median / slowest (s)",
            lambda s: f"{s['upload_s_p50']:.2f} / {s['upload_s_max']:.2f}",
            False,
        ),
        (
            f"proxy RSS growth, {args.concurrency} × {args.mb:g} MB in flight: "
            "median / max of rounds (MB)",
            lambda s: f"{s['proxy_rss_growth_mb_median']:.1f} / {s['proxy_rss_growth_mb_max']:.1f}",
            True,
        ),
        (
            "proxy RSS at start → peak of the run (MB)",
            lambda s: f"{s['proxy_rss_start_mb']:.1f} → {s['proxy_rss_peak_mb']:.1f}",
            True,
        ),
        ("proxy peak open fds", lambda s: f"{s['proxy_peak_fds']}", True),
        (
            "proxy bytes written per round, to sockets and files (MB)",
            lambda s: f"{s['proxy_write_mb_per_round']:.0f}",
            True,
        ),
        (
            "sink RSS growth, max of rounds (MB)",
            lambda s: f"{s['sink_rss_growth_mb_max']:.1f}",
            False,
        ),
        (
            "largest body chunk uvicorn handed the sink (KB)",
            lambda s: f"{s['sink_largest_chunk_kb']:.0f}",
            False,
        ),
        ("CPU per GB uploaded: proxy (s)", lambda s: f"{s['cpu_s_per_gb']['proxy']:.2f}", True),
        (
            "CPU per GB uploaded: sink / client (s)",
            lambda s: f"{s['cpu_s_per_gb']['sink']:.2f} / {s['cpu_s_per_gb']['client']:.2f}",
            False,
        ),
        ("errors", lambda s: f"{s['errors']}", False),
    ]
    lines = ["| figure | " + " | ".join(TITLES[name] for name in NAMES) + " |"]
    lines.append("|---" * (len(NAMES) + 1) + "|")
    for label, cell, proxies_only in rows:
        cells = [
            "–" if proxies_only and name == "direct" else cell(summary[name]) for name in NAMES
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


@contextlib.contextmanager
def targets(args: argparse.Namespace, file: bytes) -> Iterator[tuple[dict[str, Target], int]]:
    """The sink, and two proxies in front of it: one per field order, each with its own
    RSS from start."""
    limit = max(100 * MB, 2 * (args.mb * MB + 64 * 1024))
    extra = "[access_log]\nenabled = false\n"
    extra += f"[proxy]\nmax_upload_bytes = {int(limit)}\nbody_timeout = 120\n"
    env = {"SINK_HASH": "1"} if args.verify else {}
    with contextlib.ExitStack() as stack:
        sink, sink_pid = stack.enter_context(procs.server(procs.uvicorn_app("sink:app"), env))
        streamed, streamed_pid = stack.enter_context(procs.imagegen_proxy(sink, extra))
        spooled, spooled_pid = stack.enter_context(procs.imagegen_proxy(sink, extra))
        first = Body.make(file, fields_first=True)
        last = Body.make(file, fields_first=False)
        yield (
            {
                "direct": Target("direct", sink, first, None),
                "proxy": Target("proxy", streamed, first, streamed_pid),
                "spooled": Target("spooled", spooled, last, spooled_pid),
            },
            sink_pid,
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--concurrency", type=int, default=8, help="uploads at once")
    parser.add_argument("--mb", type=float, default=40.0, help="the file's size (MB, 2**20)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="1 round of 10 MB files")
    parser.add_argument("--verify", action="store_true", help="SHA-256 every body in the sink")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.mb = 1, 10.0
    file = os.urandom(int(args.mb * MB))
    started = time.monotonic()
    with targets(args, file) as (found, sink_pid):
        rounds, start_rss = asyncio.run(measure(args, found, sink_pid))
    summary = summarize(rounds, start_rss)
    text = table(summary, args)
    command = " ".join(["python bench/uploads.py", *sys.argv[1:]])
    heading = (
        f"`{command}` ({args.rounds} round{'s' if args.rounds != 1 else ''} of "
        f"{args.concurrency} concurrent "
        f"{args.mb:g} MB edits per target, {time.monotonic() - started:.0f} s in all)"
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {
        "settings": vars(args),
        "summary": summary,
        "rounds": [asdict(r) for r in rounds],
        "errors": [e for r in rounds for e in r.errors][:20],
    }
    (out / "uploads.json").write_text(json.dumps(results, indent=1))
    (out / "uploads.md").write_text(heading + "\n\n" + text + "\n")
    print(heading + "\n\n" + text)
    if any(r.errors for r in rounds):
        print("\nerrors:", *results["errors"], sep="\n  ", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
