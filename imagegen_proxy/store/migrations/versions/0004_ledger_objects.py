"""The ledger row's kept images: the [storage] object keys of each generation's images.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("ledger") as table:
        table.add_column(sa.Column("objects", sa.JSON, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("ledger") as table:
        table.drop_column("objects")
