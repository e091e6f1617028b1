"""The store's tables (SQLAlchemy Core): what Alembic's migrations build, version by version."""

from __future__ import annotations

from sqlalchemy import JSON, BigInteger, Column, ForeignKey, MetaData, String, Table

metadata = MetaData()

projects = Table(
    "projects",
    metadata,
    Column("id", String(40), primary_key=True),  # "proj_" and 24 hex digits
    Column("name", String(200), nullable=False),
    Column("created_at", BigInteger, nullable=False),  # Unix seconds, as OpenAI's API
    Column("archived_at", BigInteger, nullable=True),
    Column("policy", JSON, nullable=False),  # a config.Policy, unset fields left out
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", String(40), primary_key=True),  # "key_" and 24 hex digits
    Column("name", String(200), nullable=False),
    Column("project_id", String(40), ForeignKey("projects.id"), nullable=True),
    # The SHA-256 of the key: all the store keeps of it.
    Column("digest", String(64), nullable=False, unique=True),
    Column("redacted", String(40), nullable=False),  # "sk-igp-…abcd", for people
    Column("created_at", BigInteger, nullable=False),
    Column("expires_at", BigInteger, nullable=True),
    Column("revoked_at", BigInteger, nullable=True),
    Column("policy", JSON, nullable=False),
)
