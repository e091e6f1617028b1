"""Images in an S3-compatible object store (`[storage] url = "s3://bucket/prefix"`), through
aiobotocore (the `s3` extra): AWS S3, MinIO, R2, GCS's S3 API, with `endpoint_url`.

An object is a multipart upload of `part_size` parts, each spooled to an anonymous
temporary file until it is full and then sent from there (S3 wants parts of 5 MiB at least:
held in memory, they would be most of an image), completed by `commit` and aborted
otherwise; one smaller than a part is one `put_object` at commit. URLs are presigned
GETs. Credentials: `access_key_id_env` and `secret_access_key_env`, else the standard AWS
chain.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from collections.abc import AsyncIterator
from datetime import datetime
from typing import IO, Any
from urllib.parse import urlsplit

from ..config import ConfigError, StorageConfig
from .base import StorageError

_READ = 256 * 1024


def _failed(what: str, exc: BaseException) -> StorageError:
    """An S3 failure, naming the operation and the error's code (never a credential)."""
    code = (
        getattr(exc, "response", {}).get("Error", {}).get("Code")
        if hasattr(exc, "response")
        else None
    )
    return StorageError(f"S3 {what} failed ({code or type(exc).__name__})")


class S3Store:
    """A bucket (and a prefix in it) of images."""

    def __init__(self, config: StorageConfig) -> None:
        assert config.url is not None
        parts = urlsplit(config.url)
        self.bucket = parts.netloc
        self.prefix = parts.path.strip("/")
        self.part_size = config.part_size
        self._options: dict[str, Any] = {
            "endpoint_url": config.endpoint_url,
            "region_name": config.region or "us-east-1",
        }
        if config.access_key_id_env is not None:
            assert config.secret_access_key_env is not None
            key_id = os.environ.get(config.access_key_id_env)
            secret = os.environ.get(config.secret_access_key_env)
            if not key_id or not secret:
                raise ConfigError(
                    "[storage]: environment variables "
                    f"{config.access_key_id_env} and {config.secret_access_key_env} must be set"
                )
            self._options |= {"aws_access_key_id": key_id, "aws_secret_access_key": secret}
        self._client: Any = None
        self._exit: contextlib.AsyncExitStack | None = None

    @classmethod
    def of(cls, config: StorageConfig) -> S3Store:
        try:
            import aiobotocore.session  # type: ignore[import-untyped]  # noqa: F401
        except ImportError as exc:
            raise ConfigError(
                "[storage] s3:// needs aiobotocore: pip install 'imagegen-proxy[s3]'"
            ) from exc
        return cls(config)

    def _name(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    async def client(self) -> Any:
        if self._client is None:
            from aiobotocore.config import AioConfig  # type: ignore[import-untyped]
            from aiobotocore.session import get_session

            stack = contextlib.AsyncExitStack()
            config = AioConfig(retries={"max_attempts": 2, "mode": "standard"}, connect_timeout=10)
            self._client = await stack.enter_async_context(
                get_session().create_client("s3", config=config, **self._options)
            )
            self._exit = stack
        return self._client

    async def open(self, key: str, content_type: str) -> _S3Writer:
        return _S3Writer(self, self._name(key), content_type)

    async def url(self, key: str, ttl: float) -> str:
        client = await self.client()
        try:
            url: str = await client.generate_presigned_url(
                "get_object",
                Params={"Bucket": self.bucket, "Key": self._name(key)},
                ExpiresIn=int(ttl),
            )
        except Exception as exc:
            raise _failed("presigning", exc) from None
        return url

    async def read(self, key: str) -> AsyncIterator[bytes]:
        client = await self.client()
        try:
            answer = await client.get_object(Bucket=self.bucket, Key=self._name(key))
        except Exception as exc:
            raise _failed("get_object", exc) from None
        async with answer["Body"] as body:
            while chunk := await body.read(_READ):
                yield chunk

    async def delete(self, key: str) -> None:
        client = await self.client()
        try:
            await client.delete_object(Bucket=self.bucket, Key=self._name(key))
        except Exception as exc:
            raise _failed("delete_object", exc) from None

    async def sweep(self, older_than: datetime) -> int:
        client = await self.client()
        gone = 0
        try:
            pages = client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=f"{self.prefix}/" if self.prefix else ""
            )
            async for page in pages:
                old = [
                    {"Key": item["Key"]}
                    for item in page.get("Contents", [])
                    if item["LastModified"] < older_than
                ]
                for at in range(0, len(old), 1000):
                    await client.delete_objects(
                        Bucket=self.bucket, Delete={"Objects": old[at : at + 1000], "Quiet": True}
                    )
                gone += len(old)
        except Exception as exc:
            raise _failed("sweep", exc) from None
        return gone

    async def aclose(self) -> None:
        stack, self._exit, self._client = self._exit, None, None
        if stack is not None:
            await stack.aclose()


class _S3Writer:
    """One object: its current part spooled to an anonymous temporary file (disk, not
    memory) and uploaded, from the file, each time it fills."""

    def __init__(self, store: S3Store, name: str, content_type: str) -> None:
        self.store = store
        self.name = name
        self.content_type = content_type
        self._part_file: IO[bytes] | None = None
        self._part_size = 0  # bytes in the current part's file
        self._upload: str | None = None
        self._parts: list[dict[str, Any]] = []
        self._done = False

    async def write(self, data: bytes) -> None:
        limit = self.store.part_size
        view = memoryview(data)
        while view:
            room = limit - self._part_size
            await self._spool(view[:room])
            view = view[room:]
            if self._part_size >= limit:
                await self._send_part()

    async def _spool(self, data: memoryview) -> None:
        if not data:
            return
        if self._part_file is None:
            self._part_file = await asyncio.to_thread(tempfile.TemporaryFile)
        await asyncio.to_thread(self._part_file.write, data)
        self._part_size += len(data)

    def _take_part(self) -> tuple[IO[bytes] | None, int]:
        file, size = self._part_file, self._part_size
        self._part_file, self._part_size = None, 0
        if file is not None:
            file.seek(0)
        return file, size

    async def _send_part(self) -> None:
        client = await self.store.client()
        bucket = self.store.bucket
        file, size = self._take_part()
        assert file is not None
        try:
            if self._upload is None:
                started = await client.create_multipart_upload(
                    Bucket=bucket, Key=self.name, ContentType=self.content_type
                )
                self._upload = started["UploadId"]
            number = len(self._parts) + 1
            answer = await client.upload_part(
                Bucket=bucket,
                Key=self.name,
                UploadId=self._upload,
                PartNumber=number,
                Body=file,
                ContentLength=size,
            )
        except Exception as exc:
            raise _failed("upload_part", exc) from None
        finally:
            file.close()
        self._parts.append({"PartNumber": number, "ETag": answer["ETag"]})

    async def commit(self) -> None:
        client = await self.store.client()
        bucket = self.store.bucket
        try:
            if self._upload is None:  # smaller than a part: one request
                file, size = self._take_part()
                try:
                    body: Any = file if file is not None else b""
                    await client.put_object(
                        Bucket=bucket,
                        Key=self.name,
                        Body=body,
                        ContentLength=size,
                        ContentType=self.content_type,
                    )
                finally:
                    if file is not None:
                        file.close()
            else:
                if self._part_file is not None:
                    await self._send_part()
                await client.complete_multipart_upload(
                    Bucket=bucket,
                    Key=self.name,
                    UploadId=self._upload,
                    MultipartUpload={"Parts": self._parts},
                )
        except StorageError:
            raise
        except Exception as exc:
            raise _failed("commit", exc) from None
        self._done = True

    async def abort(self) -> None:
        if self._done:
            return
        self._done = True
        file, _ = self._take_part()
        if file is not None:
            file.close()
        if self._upload is None:
            return
        with contextlib.suppress(Exception):  # gone already, or the store is away: it expires
            client = await self.store.client()
            await client.abort_multipart_upload(
                Bucket=self.store.bucket, Key=self.name, UploadId=self._upload
            )
