"""Serve the mock upstream: python -m imagegen_proxy.mock --port 9000."""

from __future__ import annotations

import argparse

import uvicorn

from .app import MockUpstream


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and serve MockUpstream with uvicorn until interrupted."""
    parser = argparse.ArgumentParser(
        prog="python -m imagegen_proxy.mock",
        description=(
            "Serve the mock image-generation upstream: OpenAI's API, and Gemini's, Black"
            " Forest Labs', Stability's and Bedrock's."
        ),
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="interface to bind (default: %(default)s)"
    )
    parser.add_argument(
        "--port", type=int, default=9000, help="port to bind (default: %(default)s)"
    )
    parser.add_argument(
        "--delay", type=float, default=0.0, help="seconds each generation takes (default: 0)"
    )
    parser.add_argument(
        "--pad-to",
        type=int,
        default=0,
        help="pad every PNG to at least this many bytes (default: 0)",
    )
    parser.add_argument(
        "--log-level",
        default="warning",
        choices=["critical", "error", "warning", "info", "debug", "trace"],
        help="uvicorn log level (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    if args.delay < 0 or args.pad_to < 0:
        parser.error("--delay and --pad-to must not be negative")
    uvicorn.run(
        MockUpstream(delay=args.delay, pad_to=args.pad_to),
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        lifespan="on",
        # Per-request access logging would dominate the cost of a benchmark-speed mock.
        access_log=False,
    )


if __name__ == "__main__":
    main()
