"""A real S3 API server on a free loopback port (moto's standalone server), for the image
store's tests: the proxy talks to it with aiobotocore as it would to S3, MinIO or R2."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from redis_server import free_port

ACCESS_KEY = "AKIAIMAGEGENTEST0000"
SECRET_KEY = "s3-test-secret-key-0123456789"
REGION = "us-east-1"


@contextlib.contextmanager
def s3_server() -> Iterator[str]:
    """Start moto's S3 server; yield its URL."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def s3_client(endpoint: str) -> Any:
    """A plain (sync) botocore client of the server, for the tests' own looks."""
    import botocore.session

    return botocore.session.get_session().create_client(
        "s3",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
    )
