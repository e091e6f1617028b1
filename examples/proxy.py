"""The bundled proxy built with the Python API instead of the `imagegen-proxy` command.

    python examples/proxy.py [config.toml]

Without a config it serves the embedded mock upstream on 127.0.0.1:8000, like the command.
"""

from __future__ import annotations

import sys

import uvicorn

from imagegen_proxy import ProxyConfig
from imagegen_proxy.server.app import create_app, with_mock


def main() -> None:
    config = ProxyConfig.from_toml(sys.argv[1]) if len(sys.argv) > 1 else ProxyConfig()
    host, port = config.server.host, config.server.port
    mock = not config.has_upstream
    if mock:
        config = with_mock(config, f"http://{host}:{port}")
    uvicorn.run(create_app(config, mock=mock), host=host, port=port)


if __name__ == "__main__":
    main()
