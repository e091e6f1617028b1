"""Where images are kept (`[storage]`): a filesystem (`file://`, served by the proxy at
signed, expiring URLs) or an S3-compatible object store (`s3://`, presigned URLs), behind
one `ImageStore`. An image is written in bounded parts as it is decoded, and becomes
visible only when committed; one begun and not committed is aborted, leaving nothing."""

from __future__ import annotations

from ..config import StorageConfig
from .base import ImageStore, ImageWriter, StorageError, object_key
from .files import FileStore


def image_store(config: StorageConfig) -> ImageStore:
    """The store `[storage] url` names."""
    assert config.url is not None
    if config.is_file:
        return FileStore.of(config)
    from .s3 import S3Store

    return S3Store.of(config)


__all__ = ["FileStore", "ImageStore", "ImageWriter", "StorageError", "image_store", "object_key"]
