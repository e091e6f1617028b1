"""One contract for every image store, run against each: a directory, and a real S3 API
(moto's server) on loopback."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from s3_server import ACCESS_KEY, SECRET_KEY, s3_client, s3_server

from imagegen_proxy.config import StorageConfig
from imagegen_proxy.storage import FileStore, ImageStore, StorageError, image_store, object_key
from imagegen_proxy.storage.base import valid_key

NOW = datetime(2026, 12, 7, tzinfo=UTC)


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    with s3_server() as url:
        yield url


@pytest.fixture(params=["file", "s3"])
def store(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[ImageStore, Any]]:
    """A store of each kind, and a way to look at it from outside: (kind, place)."""
    if request.param == "file":
        config = StorageConfig(url=(tmp_path / "kept").as_uri(), public_url="http://gw")
        yield image_store(config), ("file", tmp_path / "kept")
        return
    url = request.getfixturevalue("endpoint")
    monkeypatch.setenv("KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("SECRET", SECRET_KEY)
    client = s3_client(url)
    name = "contract-" + os.urandom(4).hex()
    client.create_bucket(Bucket=name)
    config = StorageConfig(
        url=f"s3://{name}/pre",
        endpoint_url=url,
        access_key_id_env="KEY_ID",
        secret_access_key_env="SECRET",
        part_size=5 * 1024 * 1024,
    )
    made = image_store(config)
    yield made, ("s3", (client, name))
    asyncio.run(made.aclose())


def run(work: Any) -> Any:
    return asyncio.run(work)


async def read_all(chunks: AsyncIterator[bytes]) -> bytes:
    return b"".join([chunk async for chunk in chunks])


def visible(where: Any) -> list[str]:
    kind, place = where
    if kind == "file":
        return sorted(
            str(p.relative_to(place))
            for p in place.rglob("*")
            if p.is_file() and ".incoming" not in p.parts
        )
    client, name = place
    return [item["Key"] for item in client.list_objects_v2(Bucket=name).get("Contents", [])]


def pending(where: Any) -> int:
    kind, place = where
    if kind == "file":
        return len(list((place / ".incoming").glob("*"))) if (place / ".incoming").exists() else 0
    client, name = place
    return len(client.list_multipart_uploads(Bucket=name).get("Uploads", []))


@pytest.mark.parametrize("chunk", [1, 65536, 7 * 1024 * 1024])
def test_what_is_written_and_committed_is_read_back(store: Any, chunk: int) -> None:
    made, where = store
    data = os.urandom(11 * 1024 * 1024 if chunk > 1 else 5000)
    key = object_key("team", "pxy_1", 0, "png", NOW)

    async def work() -> tuple[bytes, list[str], str]:
        writer = await made.open(key, "image/png")
        for at in range(0, len(data), chunk):
            await writer.write(data[at : at + chunk])
        before = visible(where)
        await writer.commit()
        return await read_all(made.read(key)), before, await made.url(key, 60)

    read, before, url = run(work())
    assert before == [] and read == data  # invisible until committed, then whole
    assert visible(where) and pending(where) == 0
    if where[0] == "s3":
        assert httpx.get(url).content == data
    else:
        assert url.startswith("http://gw/v1/imagegen/files/team/2026-12-07/pxy_1-0.png?")


def test_an_aborted_object_leaves_nothing(store: Any) -> None:
    made, where = store
    key = object_key(None, "pxy_2", 0, "png", NOW)

    async def work() -> None:
        writer = await made.open(key, "image/png")
        await writer.write(os.urandom(6 * 1024 * 1024))  # past one S3 part
        await writer.abort()
        await writer.abort()  # twice is fine

    run(work())
    assert visible(where) == [] and pending(where) == 0


def test_a_missing_object_is_a_storage_error(store: Any) -> None:
    made, _ = store
    with pytest.raises(StorageError):
        run(read_all(made.read(object_key(None, "pxy_none", 0, "png", NOW))))


def test_a_sweep_deletes_only_the_old(store: Any) -> None:
    made, where = store
    key = object_key(None, "pxy_3", 0, "png", NOW)

    async def work() -> tuple[int, int]:
        writer = await made.open(key, "image/png")
        await writer.write(b"png")
        await writer.commit()
        kept = await made.sweep(datetime.now(UTC) - timedelta(days=1))
        gone = await made.sweep(datetime.now(UTC) + timedelta(minutes=5))
        return kept, gone

    assert run(work()) == (0, 1)
    assert visible(where) == []


def test_a_writer_holds_no_part_in_memory(store: Any) -> None:
    made, _ = store

    async def work() -> int:
        writer = await made.open(object_key(None, "pxy_4", 0, "png", NOW), "image/png")
        most = 0
        for _ in range(12 * 16):  # 12 MB in 64 KB chunks: parts go up as they fill
            await writer.write(b"x" * 65536)
            most = max(most, sum(len(piece) for piece in getattr(writer, "_pending", [])))
        await writer.commit()
        return most

    assert run(work()) <= 256 * 1024  # the file store's batch; S3 parts are on disk


@given(st.text(max_size=300), st.text(min_size=1, max_size=80))
def test_object_keys_carry_no_client_text_as_it_is(project: str, request_id: str) -> None:
    key = object_key(project, request_id, 3, "png", NOW)
    assert valid_key(key) and ".." not in key.split("/")
    # Every component fits a file name, however long (and escaped) the project's name.
    assert all(len(part.encode()) <= 255 for part in key.split("/"))
    if len(project) > 100:  # long names stay told apart
        assert object_key(project + "x", request_id, 3, "png", NOW) != key


def test_a_long_project_name_is_kept_on_the_filesystem(tmp_path: Path) -> None:
    made = image_store(StorageConfig(url=(tmp_path / "kept").as_uri()))
    key = object_key("équipe-" * 40, "pxy_5", 0, "png", NOW)  # 280 characters, longer escaped

    async def work() -> bytes:
        writer = await made.open(key, "image/png")
        await writer.write(b"png")
        await writer.commit()
        return await read_all(made.read(key))

    assert run(work()) == b"png"


def test_file_urls_verify_and_expire(tmp_path: Path) -> None:
    store = FileStore(tmp_path, "http://gw", b"secret")
    key = object_key("p", "r", 0, "png", NOW)
    url = httpx.URL(run(store.url(key, 60)))
    expires, signature = url.params["expires"], url.params["signature"]
    assert store.verify(key, expires, signature)
    assert not store.verify(key, expires, "0" * 64)
    assert not store.verify(key.replace("-0", "-1"), expires, signature)
    assert not store.verify(key, str(int(expires) + 1), signature)
    past = "1000000000"
    assert not store.verify(key, past, store.sign(key, int(past)))
    assert not store.verify(
        "../../etc/passwd", expires, store.sign("../../etc/passwd", int(expires))
    )


def test_an_unreachable_s3_is_a_storage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    with __import__("socket").socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    monkeypatch.setenv("KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("SECRET", SECRET_KEY)
    made = image_store(
        StorageConfig(
            url="s3://nowhere",
            endpoint_url=dead,
            access_key_id_env="KEY_ID",
            secret_access_key_env="SECRET",
        )
    )

    async def work() -> None:
        writer = await made.open(object_key(None, "r", 0, "png", NOW), "image/png")
        await writer.write(b"png")
        try:
            await writer.commit()
        finally:
            await made.aclose()

    with pytest.raises(StorageError) as caught:
        run(work())
    assert SECRET_KEY not in str(caught.value)


def test_a_read_only_directory_is_a_storage_error(tmp_path: Path) -> None:
    (tmp_path / "kept").write_text("a file, not a directory")
    made = image_store(StorageConfig(url=(tmp_path / "kept").as_uri()))
    with pytest.raises(StorageError):
        run(made.open(object_key(None, "r", 0, "png", NOW), "image/png"))
