"""Service accounts, project rate limits by model, and the spend ledger (the Admin API).

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "service_accounts",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("project_id", sa.String(40), sa.ForeignKey("projects.id"), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("role", sa.String(20), nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.Column("deleted_at", sa.BigInteger, nullable=True),
    )
    with op.batch_alter_table("api_keys") as table:  # batch: SQLite cannot add foreign keys
        table.add_column(sa.Column("service_account_id", sa.String(40), nullable=True))
        table.add_column(sa.Column("last_used_at", sa.BigInteger, nullable=True))
        table.create_foreign_key(
            "fk_api_keys_service_account", "service_accounts", ["service_account_id"], ["id"]
        )
    op.create_table(
        "project_rate_limits",
        sa.Column("project_id", sa.String(40), sa.ForeignKey("projects.id"), primary_key=True),
        sa.Column("model", sa.String(200), primary_key=True),
        sa.Column("max_requests_per_1_minute", sa.BigInteger, nullable=True),
        sa.Column("max_images_per_1_minute", sa.BigInteger, nullable=True),
    )
    op.create_table(
        "ledger",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer, "sqlite"),
            primary_key=True,
            autoincrement=True,
        ),
        sa.Column("at", sa.BigInteger, nullable=False),
        sa.Column("request_id", sa.String(64), nullable=False),
        sa.Column("key_id", sa.String(40), nullable=True),
        sa.Column("key_name", sa.String(200), nullable=False),
        sa.Column("project_id", sa.String(40), nullable=True),
        sa.Column("project_name", sa.String(200), nullable=True),
        sa.Column("model", sa.String(200), nullable=True),
        sa.Column("source", sa.String(40), nullable=False),
        sa.Column("size", sa.String(40), nullable=True),
        sa.Column("quality", sa.String(40), nullable=True),
        sa.Column("n", sa.Integer, nullable=False),
        sa.Column("images", sa.Integer, nullable=False),
        sa.Column("status", sa.Integer, nullable=False),
        sa.Column("outcome", sa.String(20), nullable=False),
        sa.Column("input_tokens", sa.BigInteger, nullable=False),
        sa.Column("output_tokens", sa.BigInteger, nullable=False),
        sa.Column("cost_micros", sa.BigInteger, nullable=True),
        sa.Column("duration_ms", sa.Integer, nullable=False),
    )
    op.create_index("ix_ledger_at", "ledger", ["at"])


def downgrade() -> None:
    op.drop_index("ix_ledger_at", "ledger")
    op.drop_table("ledger")
    op.drop_table("project_rate_limits")
    with op.batch_alter_table("api_keys") as table:
        table.drop_constraint("fk_api_keys_service_account", type_="foreignkey")
        table.drop_column("last_used_at")
        table.drop_column("service_account_id")
    op.drop_table("service_accounts")
