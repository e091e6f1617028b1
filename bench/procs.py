"""Servers for the bench, each in its own process on 127.0.0.1, and their resource use."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Self

import psutil

HERE = Path(__file__).parent
KEY = "bench-key-0123456789"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_listening(port: int, process: subprocess.Popen[bytes], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server on port {port} exited with {process.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"server on port {port} did not start")


@contextlib.contextmanager
def server(
    args: list[str], env: dict[str, str] | None = None, stderr: IO[bytes] | None = None
) -> Iterator[tuple[str, int]]:
    """Run `args` (which must contain "{port}"); yield its URL and pid. Its stderr goes to
    `stderr` if given, else to ours."""
    port = free_port()
    command = [arg.replace("{port}", str(port)) for arg in args]
    process = subprocess.Popen(
        command,
        env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=stderr,
        cwd=HERE,
    )
    try:
        wait_listening(port, process)
        yield f"http://127.0.0.1:{port}", process.pid
    finally:
        process.terminate()
        process.wait(20)


def uvicorn_app(target: str) -> list[str]:
    # The baselines have no error handling by design: their tracebacks would only be noise.
    return [
        sys.executable,
        "-m",
        "uvicorn",
        target,
        "--port",
        "{port}",
        "--log-level",
        "critical",
        "--no-access-log",
        "--backlog",
        "4096",
    ]


def mock(delay: float = 0.0, pad_to: int = 0) -> list[str]:
    return [
        sys.executable,
        "-m",
        "imagegen_proxy.mock",
        "--port",
        "{port}",
        "--delay",
        str(delay),
        "--pad-to",
        str(pad_to),
        "--log-level",
        "warning",
    ]


Proxy = contextlib.AbstractContextManager[tuple[str, int]]


@contextlib.contextmanager
def imagegen_proxy(
    upstream: str,
    extra_config: str = "",
    stderr: IO[bytes] | None = None,
    env: dict[str, str] | None = None,
    store: str | None = None,
    pool: int = 0,
    budget_usd: float | None = None,
    members: str | None = None,
) -> Iterator[tuple[str, int]]:
    """The product with one key, the in-memory limiter doing real work.
    `extra_config` is TOML appended to the configuration (e.g. an `[azure]` section); `env`
    is added to its environment (`PYTHONPATH` runs another checkout's code). With `store`
    (a database URL), the bench key lives in that store instead of the configuration. With
    `pool`, `[openai]` becomes that many `[[upstreams]]`, all the same `upstream`. With
    `budget_usd`, the key spends on a daily dollar budget (never reached). `members` is
    TOML of `[[upstreams]]` entries in place of `[openai]` (another kind of upstream)."""
    limits = "requests_per_minute = 100000000\nimages_per_minute = 100000000\n"
    limits += "max_concurrent = 100000\n"
    if budget_usd is not None:
        limits += f"budget_usd = {budget_usd}\n"
    config = f'[openai]\nbase_url = "{upstream}/v1"\n'
    if pool:
        config = "".join(
            f'[[upstreams]]\nname = "u{index}"\nkind = "openai"\nbase_url = "{upstream}/v1"\n'
            for index in range(pool)
        )
    if members is not None:
        config = members
    if store is None:
        config += f'[[keys]]\nname = "bench"\nkey = "{KEY}"\n{limits}'
    else:
        config += f'[store]\nurl = "{store}"\n[[keys]]\nname = "other"\nkey = "not-{KEY}"\n'
        _store_key(store)
    config += extra_config
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as file:
        file.write(config)
    try:
        command = [  # `-m`: the same command at any revision, whatever its entry point's module
            sys.executable,
            "-m",
            "imagegen_proxy",
            "--config",
            file.name,
            "--port",
            "{port}",
            "--log-level",
            "warning",
        ]
        with server(command, env=env, stderr=stderr) as running:
            yield running
    finally:
        os.unlink(file.name)


def as_users_run_it(upstream: str, extra_config: str = "", **options: Any) -> Proxy:
    """The product as users run it, issue 18's configuration: one key with a dollar budget,
    a pool of two upstreams, and the JSON access log on (its lines go to /dev/null)."""
    return imagegen_proxy(upstream, extra_config, pool=2, budget_usd=1e9, **options)


def _store_key(store: str) -> None:
    """The bench key, with the same limits, in the store at `store`."""
    command = [sys.executable, "-m", "imagegen_proxy", "keys", "create", "bench"]
    command += ["--store", store, "--import-env", "IMAGEGEN_BENCH_KEY"]
    command += ["--requests-per-minute", "100000000", "--images-per-minute", "100000000"]
    command += ["--max-concurrent", "100000"]
    environment = {**os.environ, "IMAGEGEN_BENCH_KEY": KEY}
    subprocess.run(command, check=True, env=environment, stdout=subprocess.DEVNULL)


@contextlib.contextmanager
def floor(upstream: str) -> Iterator[tuple[str, int]]:
    with server(uvicorn_app("floor:app"), {"FLOOR_UPSTREAM": upstream}) as running:
        yield running


class _Polling:
    """Calls `_sample()` in a thread every `every` seconds (on a fixed grid, not `every`
    after the last sample: sampling itself takes time), from entering until leaving."""

    def __init__(self, pid: int, every: float) -> None:
        self.process = psutil.Process(pid)
        self._every = every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        start = time.monotonic()
        ticks = 0
        self._sample()
        while not self._stop.wait(max(0.0, start + (ticks + 1) * self._every - time.monotonic())):
            ticks += 1
            self._sample()

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class Sampler(_Polling):
    """Samples a process's RSS and open file descriptors in a thread: baseline and peak."""

    def __init__(self, pid: int, every: float = 0.05) -> None:
        super().__init__(pid, every)
        self.baseline_rss = self.process.memory_info().rss
        self.baseline_fds = self.process.num_fds()
        self.peak_rss = self.baseline_rss
        self.peak_fds = self.baseline_fds

    def _sample(self) -> None:
        with contextlib.suppress(psutil.Error):
            self.peak_rss = max(self.peak_rss, self.process.memory_info().rss)
            self.peak_fds = max(self.peak_fds, self.process.num_fds())

    @property
    def growth_mb(self) -> float:
        return (self.peak_rss - self.baseline_rss) / 2**20


class Series(_Polling):
    """Samples a process's RSS, open file descriptors and CPU share once a `every` seconds, in
    a thread, for as long as it runs: rows of (monotonic time, RSS bytes, fds, CPU %)."""

    def __init__(self, pid: int, every: float = 1.0) -> None:
        super().__init__(pid, every)
        self.rows: list[tuple[float, int, int, float]] = []

    def _sample(self) -> None:
        with contextlib.suppress(psutil.Error):
            # cpu_percent measures since its previous call: the first row reads 0.
            cpu = self.process.cpu_percent()
            rss = self.process.memory_info().rss
            self.rows.append((time.monotonic(), rss, self.process.num_fds(), cpu))
