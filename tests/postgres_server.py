"""A real, throwaway PostgreSQL cluster on a free loopback port, for the store tests.

Start it once per session, and give each test a database of its own:

    @pytest.fixture(scope="session")
    def postgres_url() -> Iterator[str]:
        with postgres_server() as url:
            yield url

    @pytest.fixture
    def database(postgres_url: str) -> str:
        return create_database(postgres_url)
"""

from __future__ import annotations

import contextlib
import functools
import glob
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
from redis_server import free_port

USER = "imagegen"
DATABASE = "imagegen"


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """Start a fresh cluster; yield `postgresql://imagegen@127.0.0.1:PORT/imagegen`.

    Trust authentication, no durability (fsync and friends off); the cluster and its
    directory are gone when the block ends.
    """
    _bindir()  # skip (or fail in CI) before creating anything
    # PostgreSQL refuses to run as root: the cluster then belongs to the `postgres` user.
    owner = "postgres" if os.geteuid() == 0 else None
    root = Path(tempfile.mkdtemp(prefix="postgres-"))
    try:
        data, sockets, log = root / "data", root / "sockets", root / "server.log"
        sockets.mkdir()
        if owner:
            for path in root, sockets:
                shutil.chown(path, owner, owner)
        # C: independent of which locales the machine has; --no-sync: it is thrown away.
        initdb = [_tool("initdb"), "-D", str(data), "-U", USER, "--auth=trust", "-E", "UTF8"]
        _run([*initdb, "--locale=C", "--no-sync", "--no-instructions"], cwd=root, owner=owner)
        port = free_port()
        settings = {
            "listen_addresses": "127.0.0.1",
            "port": port,
            "unix_socket_directories": sockets,
            "fsync": "off",
            "full_page_writes": "off",
            "synchronous_commit": "off",
        }
        options = [arg for name, value in settings.items() for arg in ("-c", f"{name}={value}")]
        with log.open("wb") as log_file:
            process = subprocess.Popen(
                [_tool("postgres"), "-D", str(data), *options],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=root,
                env=_env(),
                user=owner,
                group=owner,
                extra_groups=[] if owner else None,
            )
        try:
            _wait_until_ready(port, process, log)
            yield create_database(f"postgresql://{USER}@127.0.0.1:{port}/postgres", DATABASE)
        finally:
            # SIGINT is PostgreSQL's fast shutdown, the signal `pg_ctl stop -m fast` sends.
            process.send_signal(signal.SIGINT)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def database_url(base: str, name: str) -> str:
    """`base` (any database of the server) with its database replaced by `name`."""
    return urlunsplit(urlsplit(base)._replace(path="/" + name))


def create_database(base: str, name: str | None = None) -> str:
    """Create an empty database (a fresh unique name by default) on `base`'s server; its URL."""
    name = name or "test_" + uuid.uuid4().hex[:16]
    _run([_tool("createdb"), f"--maintenance-db={base}", name])
    return database_url(base, name)


@functools.cache
def _bindir() -> Path:
    candidates = []
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        candidates.append(subprocess.check_output(["pg_config", "--bindir"], text=True).strip())
    # Debian's /usr/lib/postgresql/<major>/bin; the newest major first.
    majors = glob.glob("/usr/lib/postgresql/*/bin")
    candidates += sorted(majors, key=lambda path: _version(Path(path).parent.name), reverse=True)
    for candidate in candidates:
        if (Path(candidate) / "initdb").is_file():
            return Path(candidate)
    if os.environ.get("CI"):
        pytest.fail("PostgreSQL is missing: .ci/run installs it")
    pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")


def _version(name: str) -> list[int]:
    return [int(part) for part in name.split(".") if part.isdigit()]  # "9.6" < "15"


def _tool(name: str) -> str:
    return str(_bindir() / name)


def _env() -> dict[str, str]:
    # PGHOST, PGDATA, PGPASSWORD... of the developer's shell must not reach our cluster.
    return {key: value for key, value in os.environ.items() if not key.startswith("PG")}


def _run(command: list[str], *, cwd: Path | None = None, owner: str | None = None) -> None:
    result = subprocess.run(
        command,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        cwd=cwd,
        env=_env(),
        user=owner,
        group=owner,
        extra_groups=[] if owner else None,
    )
    if result.returncode != 0:
        raise RuntimeError(f"{Path(command[0]).name} failed:\n{result.stdout}{result.stderr}")


def _wait_until_ready(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    ready = [_tool("pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(port), "-U", USER]
    deadline = time.monotonic() + 30
    while subprocess.run([*ready, "-d", "postgres"], env=_env()).returncode != 0:
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"postgres did not start:\n{log.read_text(errors='replace')}")
        time.sleep(0.02)
