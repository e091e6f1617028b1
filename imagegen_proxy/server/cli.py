"""The `imagegen-proxy` command."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import os
import secrets
import socket
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import uvicorn

from ..admin import shell as manage
from ..config import ConfigError, ProxyConfig, mask_url
from ..upstream.pool import Pool
from .app import (
    EMBEDDED_STORE,
    configure_logging,
    console_enabled,
    create_app,
    describe_upstreams,
    ops_app,
    resolved,
    with_embedded_store,
    with_file_urls,
    with_mock,
)
from .front_door import raise_open_files_limit, uvicorn_options

LOG_LEVELS = ["critical", "error", "warning", "info", "debug"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="imagegen-proxy",
        description="An OpenAI-compatible image-generation proxy. Without --config it serves "
        "an embedded mock upstream on loopback: no keys needed.",
        epilog="commands on a store (imagegen-proxy COMMAND --help for each):\n"
        "  db upgrade          migrate the store to the newest schema\n"
        "  projects ...        create, list, archive projects (keys sharing limits, budget)\n"
        "  keys ...            create, list, revoke, rotate client keys\n"
        "  usage ...           what was spent, from the ledger: CSV or JSON rows",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", metavar="FILE", help="TOML configuration file")
    parser.add_argument("--host", help="address to listen on (default: [server] host, 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default: [server] port, 8000; 0: any)")
    parser.add_argument("--log-level", choices=LOG_LEVELS, default="info")
    parser.add_argument(
        "--workers", type=int, default=1, metavar="N", help="worker processes (default: 1)"
    )
    parser.add_argument(
        "--check-config",
        action="store_true",
        help="validate the configuration, print what it resolves to (secrets masked), exit",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in manage.COMMANDS:
        manage.main(argv)
        return
    args = parse_args(argv)
    try:
        config = ProxyConfig.from_toml(args.config) if args.config else ProxyConfig()
    except ConfigError as exc:
        sys.exit(f"imagegen-proxy: {exc}")
    if args.workers < 1:
        sys.exit("imagegen-proxy: --workers must be at least 1")
    host = args.host or config.server.host
    port = config.server.port if args.port is None else args.port
    mock = not config.has_upstream
    if args.check_config:
        sys.exit(_check(config, mock, args.config))
    try:
        sock = _bind(host, port)
    except OSError as exc:
        sys.exit(f"imagegen-proxy: cannot listen on {host}:{port}: {exc.strerror or exc}")
    url = f"http://{_url_host(host)}:{sock.getsockname()[1]}"
    mock_url = _self_url(host, sock.getsockname()[1]) if mock else ""
    # The proxy's own key for its mock: worker processes must all know the same one.
    mock_key = secrets.token_urlsafe(24) if mock else ""
    if mock:
        config = with_mock(config, mock_url, mock_key)
    embedded = mock and args.config is None
    if embedded:  # after with_mock, which opens this mode: keys are not needed here
        config = with_embedded_store(config, Path.cwd(), _is_loopback(host))
    config = with_file_urls(config, url)  # a file:// store's URLs are this proxy's
    try:
        app = create_app(config, mock=mock)
    except ConfigError as exc:
        sys.exit(f"imagegen-proxy: {exc}")

    configure_logging(args.log_level)
    if config.store.url is not None:
        _upgrade_store(config.store.url)
    raise_open_files_limit()
    # The ops listener shows the pool's states: this process's when it serves alone; with
    # workers, what Redis shares (without Redis each worker knows only its own).
    pool = app.pool if args.workers == 1 or (app.pool and app.pool.mirror) else None
    ops_url = _serve_ops(config, mock, args.log_level, pool, follow=args.workers > 1)
    print(_banner(url, config, mock), flush=True)
    if embedded:
        where = "open on loopback" if config.admin.open else "needs [admin] key"
        print(
            f"Store: {Path.cwd() / EMBEDDED_STORE} (ledger, keys); admin API at {url}/v1/"
            f"organization ({where})",
            flush=True,
        )
    if ops_url:
        print(f"Operations (/healthz details, metrics) on {ops_url}", flush=True)
    if note := _budgets_note(config):
        print(note, flush=True)
    # With our own access log, uvicorn's would only say the same thing twice, with less.
    options = {
        "log_level": args.log_level,
        "access_log": not config.access_log.enabled,
        "lifespan": "on",
        "timeout_graceful_shutdown": 5,
        # After raise_open_files_limit: the connection cap is sized to the raised limit.
        **uvicorn_options(config.server),
    }
    if args.workers > 1:
        print(_workers_note(config, args.workers), flush=True)
        # Worker processes build their own app from the same resolved choices.
        os.environ.update(
            IMAGEGEN_PROXY_CONFIG=args.config or "",
            IMAGEGEN_PROXY_MOCK_URL=mock_url,
            IMAGEGEN_PROXY_MOCK_KEY=mock_key,
            IMAGEGEN_PROXY_STORE=str(Path.cwd() / EMBEDDED_STORE) if embedded else "",
            IMAGEGEN_PROXY_ADMIN_OPEN="1" if config.admin.open else "",
            IMAGEGEN_PROXY_LOG_LEVEL=args.log_level.upper(),
            IMAGEGEN_PROXY_PUBLIC_URL=url,
        )
        with _metrics_directory(config.metrics.enabled), _interruptible():
            uvicorn.run(
                "imagegen_proxy.server.app:from_environment",
                factory=True,
                fd=sock.fileno(),
                workers=args.workers,
                **options,
            )
        return
    server = uvicorn.Server(uvicorn.Config(app, **options))
    with _interruptible():
        server.run(sockets=[sock])


@contextlib.contextmanager
def _interruptible() -> Iterator[None]:
    """Ctrl-C ends the command as SIGTERM does: uvicorn shuts down gracefully, then raises
    the signal again (`KeyboardInterrupt`), which would print a traceback after a clean
    shutdown. The exit status stays a SIGINT's (130)."""
    try:
        yield
    except KeyboardInterrupt:
        sys.exit(130)


def _upgrade_store(url: str) -> None:
    """Migrate the store before serving: once, before any worker process starts."""
    from ..store import Store

    async def upgrade() -> None:
        store = Store(url)
        try:
            await store.upgrade()
        finally:
            await store.aclose()

    try:
        asyncio.run(upgrade())
    except Exception as exc:
        sys.exit(f"imagegen-proxy: cannot migrate the store at {mask_url(url)}: {exc}")


def _serve_ops(
    config: ProxyConfig, mock: bool, log_level: str, pool: Pool | None, *, follow: bool
) -> str:
    """Start the `[server] ops_port` listener, if configured, in a thread of this process
    (with `--workers`, the supervisor's: metrics add up every worker's values anyway)."""
    server = config.server
    if server.ops_port is None:
        return ""
    try:
        sock = _bind(server.ops_host, server.ops_port)
    except OSError as exc:
        sys.exit(
            f"imagegen-proxy: cannot listen on {server.ops_host}:{server.ops_port}: "
            f"{exc.strerror or exc}"
        )
    app = ops_app(config, mock=mock, pool=pool, follow=follow)
    options = uvicorn_options(server)  # the same front door
    ops = uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="on", **options))
    threading.Thread(target=ops.run, kwargs={"sockets": [sock]}, name="ops", daemon=True).start()
    return f"http://{_url_host(server.ops_host)}:{sock.getsockname()[1]}"


@contextlib.contextmanager
def _metrics_directory(enabled: bool) -> Iterator[None]:
    """prometheus-client's multiprocess mode for the workers: a directory where each writes
    its values (`PROMETHEUS_MULTIPROC_DIR`, made here unless given), emptied at start."""
    given = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not enabled:
        yield
        return
    if given:
        for stale in Path(given).glob("*.db"):  # a previous run's values would add up
            stale.unlink()
        yield
        return
    with tempfile.TemporaryDirectory(prefix="imagegen-proxy-metrics-") as directory:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
        try:
            yield
        finally:
            del os.environ["PROMETHEUS_MULTIPROC_DIR"]


def _check(config: ProxyConfig, mock: bool, path: str | None) -> str | int:
    """`--check-config`: everything start-up would check, then what it resolved to."""
    try:
        create_app(with_mock(config, "http://127.0.0.1:0") if mock else config, mock=mock)
    except ConfigError as exc:
        return f"imagegen-proxy: {exc}"
    print(json.dumps(resolved(config), indent=2))
    upstream = "embedded mock" if mock else ", ".join(describe_upstreams(config))
    print(f"imagegen-proxy: {path or 'no config file'}: OK (upstream: {upstream})")
    return 0


def _budgets_note(config: ProxyConfig) -> str:
    """What a restart does to the budgets, when they would be given back: memory limits
    and no store (with a store, each budget period starts from the ledger)."""
    budgeted = any(holder.budget_usd is not None for holder in [*config.keys, *config.projects])
    if not budgeted or config.store.url is not None or config.limits.storage != "memory":
        return ""
    return (
        "Budgets: kept in this process's memory, without a [store] ledger to start from: "
        "a restart gives every budget back. Add [store] (or use Redis) to keep them."
    )


def _workers_note(config: ProxyConfig, workers: int) -> str:
    note = f"{workers} worker processes"
    if config.limits.storage != "memory":
        return note
    limited = any(holder.limited for holder in [*config.keys, *config.projects])
    alone = [
        what
        for what, applies in (("limits", limited), ("the pool's cooldowns", config.pooled))
        if applies
    ]
    if alone:
        note += (
            f": {' and '.join(alone)} are kept per process with [limits] storage = "
            '"memory"; set storage = "redis://..." to share them'
        )
    return note


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        # Listening now lets the kernel queue connections made as soon as the banner is
        # printed, until the server (or a worker process) starts accepting them.
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _self_url(host: str, port: int) -> str:
    """Where the proxy reaches its own mock: a wildcard address is not a destination."""
    target = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return f"http://{_url_host(target)}:{port}"


def _banner(url: str, config: ProxyConfig, mock: bool) -> str:
    if mock:
        upstream = "embedded mock upstream (no upstream key needed)"
    else:
        names = []
        for member in config.members():
            where = member.location
            names.append(f"{member.name} {mask_url(where)}")
        upstream = ", ".join(names)
    save = (
        "python3 -c 'import sys,json,base64; "
        'open("image.png","wb").write(base64.b64decode(json.load(sys.stdin)["data"][0]["b64_json"]))'
        "'"
    )
    auth = "" if config.auth.open else " -H 'authorization: Bearer YOUR_KEY'"
    return (
        f"imagegen-proxy listening on {url} -> {upstream}\n"
        f"Try it (writes image.png):\n"
        f"  curl -s {url}/v1/images/generations -H 'content-type: application/json'{auth} \\\n"
        f'    -d \'{{"model": "gpt-image-2.6-sunburst", "prompt": "a lighthouse at dawn"}}\' \\\n'
        f"    | {save}\n"
        f'Or point the openai SDK at it: OpenAI(base_url="{url}/v1", api_key="...")'
        + _console_note(url, config)
    )


def _console_note(url: str, config: ProxyConfig) -> str:
    if not console_enabled(config):
        return ""
    how = "open on loopback" if config.admin.open else "sign in with the [admin] key"
    return f"; the console: {url}{config.console.path}/ ({how})"
