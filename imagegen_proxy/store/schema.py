"""The store's tables (SQLAlchemy Core): what Alembic's migrations build, version by version."""

from __future__ import annotations

from sqlalchemy import JSON, BigInteger, Column, ForeignKey, Integer, MetaData, String, Table

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
    # Since 0002: the service account that owns the key, and when it was last used.
    Column("service_account_id", String(40), ForeignKey("service_accounts.id"), nullable=True),
    Column("last_used_at", BigInteger, nullable=True),
)

service_accounts = Table(
    "service_accounts",
    metadata,
    Column("id", String(40), primary_key=True),  # "svc_acct_" and 24 hex digits
    Column("project_id", String(40), ForeignKey("projects.id"), nullable=False),
    Column("name", String(200), nullable=False),
    Column("role", String(20), nullable=False),  # "member" or "owner"
    Column("created_at", BigInteger, nullable=False),
    Column("deleted_at", BigInteger, nullable=True),  # its keys stop working
)

# A project's limits for one model, OpenAI's "project rate limits".
project_rate_limits = Table(
    "project_rate_limits",
    metadata,
    Column("project_id", String(40), ForeignKey("projects.id"), primary_key=True),
    Column("model", String(200), primary_key=True),
    Column("max_requests_per_1_minute", BigInteger, nullable=True),
    Column("max_images_per_1_minute", BigInteger, nullable=True),
)

# One line per generation that reached the upstream: what usage and costs are read from.
ledger = Table(
    "ledger",
    metadata,
    # SQLite numbers rows itself only for an INTEGER primary key.
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True),
    Column("at", BigInteger, nullable=False, index=True),  # Unix seconds, when it ended
    Column("request_id", String(64), nullable=False),
    Column("key_id", String(40), nullable=True),  # the store's key id (None: a [[keys]] key)
    Column("key_name", String(200), nullable=False),
    Column("project_id", String(40), nullable=True),
    Column("project_name", String(200), nullable=True),
    Column("model", String(200), nullable=True),
    Column("source", String(40), nullable=False),  # "image.generation", "image.edit", ...
    Column("size", String(40), nullable=True),
    Column("quality", String(40), nullable=True),
    Column("n", Integer, nullable=False),
    Column("images", Integer, nullable=False),  # charged
    Column("status", Integer, nullable=False),
    Column("outcome", String(20), nullable=False),
    Column("input_tokens", BigInteger, nullable=False),
    Column("output_tokens", BigInteger, nullable=False),
    Column("cost_micros", BigInteger, nullable=True),  # None: no price known
    Column("duration_ms", Integer, nullable=False),
    Column("objects", JSON, nullable=True),  # the keys of the images [storage] kept
    Column("trace_id", String(32), nullable=True),  # its W3C trace id, with [tracing] on
)

# Organization-wide settings, by name: "organization_policy" (a config.Policy, the
# organization spend limit's budget).
settings = Table(
    "settings",
    metadata,
    Column("name", String(100), primary_key=True),
    Column("value", JSON, nullable=False),
)
