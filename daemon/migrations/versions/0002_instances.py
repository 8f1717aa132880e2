"""Running instances: each daemon reports its state, circuit and heartbeat here.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "sync_instances",
        sa.Column("instance", sa.String(128), primary_key=True),
        sa.Column("started_at", TZ, nullable=False),
        sa.Column("heartbeat_at", TZ, nullable=False),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("circuit", sa.String(16), nullable=False),
        sa.Column("status", sa.String(255), nullable=True),
        sa.Column("version", sa.String(32), nullable=True),
    )


def downgrade() -> None:
    op.drop_table("sync_instances")
