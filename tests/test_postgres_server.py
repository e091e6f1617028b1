"""The throwaway PostgreSQL server the store tests run against."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import pytest
from postgres_server import create_database, database_url, postgres_server


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    with postgres_server() as url:
        yield url


def fetch(url: str, query: str) -> object:
    async def ask() -> object:
        connection = await asyncpg.connect(url)
        try:
            return await connection.fetchval(query)
        finally:
            await connection.close()

    return asyncio.run(ask())


def test_server_accepts_connections_as_imagegen(postgres_url: str) -> None:
    assert postgres_url.startswith("postgresql://imagegen@127.0.0.1:")
    assert fetch(postgres_url, "SELECT 1") == 1
    assert fetch(postgres_url, "SELECT current_user") == "imagegen"
    assert fetch(postgres_url, "SELECT current_database()") == "imagegen"


def test_created_databases_are_distinct_and_empty(postgres_url: str) -> None:
    first, second = create_database(postgres_url), create_database(postgres_url)
    assert first != second
    tables = "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
    assert fetch(first, tables) == 0
    fetch(first, "CREATE TABLE only_here (id int)")
    assert fetch(first, tables) == 1
    assert fetch(second, tables) == 0


def test_created_database_can_be_named(postgres_url: str) -> None:
    url = create_database(postgres_url, "named_here")
    assert url == database_url(postgres_url, "named_here")
    assert fetch(url, "SELECT current_database()") == "named_here"


def test_server_stops_and_leaves_nothing_behind() -> None:
    with postgres_server() as url:
        data = Path(str(fetch(url, "SHOW data_directory")))
        assert data.is_dir()
    assert not data.parent.exists()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", urlsplit(url).port or 0), timeout=1).close()
