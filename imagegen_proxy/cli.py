"""The `imagegen-proxy` command."""

from __future__ import annotations

import argparse
import logging
import resource
import socket
import sys

import uvicorn

from .app import create_app, with_mock
from .config import ConfigError, ProxyConfig

LOG_LEVELS = ["critical", "error", "warning", "info", "debug"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="imagegen-proxy",
        description="An OpenAI-compatible image-generation proxy. Without --config it serves "
        "an embedded mock upstream on loopback: no keys needed.",
    )
    parser.add_argument("--config", metavar="FILE", help="TOML configuration file")
    parser.add_argument("--host", help="address to listen on (default: [server] host, 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default: [server] port, 8000; 0: any)")
    parser.add_argument("--log-level", choices=LOG_LEVELS, default="info")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        config = ProxyConfig.from_toml(args.config) if args.config else ProxyConfig()
    except ConfigError as exc:
        sys.exit(f"imagegen-proxy: {exc}")
    host = args.host or config.server.host
    port = config.server.port if args.port is None else args.port
    try:
        sock = _bind(host, port)
    except OSError as exc:
        sys.exit(f"imagegen-proxy: cannot listen on {host}:{port}: {exc.strerror or exc}")
    url = f"http://{_url_host(host)}:{sock.getsockname()[1]}"
    mock = not config.has_upstream
    if mock:
        config = with_mock(config, _self_url(host, sock.getsockname()[1]))
    try:
        app = create_app(config, mock=mock)
    except ConfigError as exc:
        sys.exit(f"imagegen-proxy: {exc}")

    logging.basicConfig(format="%(levelname)s:     %(name)s: %(message)s")
    logging.getLogger("imagegen_proxy").setLevel(args.log_level.upper())
    _raise_open_files_limit()
    print(_banner(url, config, mock), flush=True)
    server = uvicorn.Server(
        uvicorn.Config(app, log_level=args.log_level, lifespan="on", timeout_graceful_shutdown=5)
    )
    server.run(sockets=[sock])


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _self_url(host: str, port: int) -> str:
    """Where the proxy reaches its own mock: a wildcard address is not a destination."""
    target = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return f"http://{_url_host(target)}:{port}"


def _raise_open_files_limit() -> None:
    # Each generation in flight holds two sockets for minutes; 1024 would cap it near 500.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _banner(url: str, config: ProxyConfig, mock: bool) -> str:
    if mock:
        upstream = "embedded mock upstream (no keys needed)"
    else:
        names = []
        if config.openai is not None:
            names.append(f"openai {config.openai.base_url}")
        if config.azure is not None:
            names.append(f"azure {config.azure.endpoint}")
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
        f'    -d \'{{"model": "gpt-image-1", "prompt": "a lighthouse at dawn"}}\' \\\n'
        f"    | {save}\n"
        f'Or point the openai SDK at it: OpenAI(base_url="{url}/v1", api_key="...")'
    )
