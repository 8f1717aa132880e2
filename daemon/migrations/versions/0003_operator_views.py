"""What operators read and do: the thresholds and health of each instance, a run's due count,
and who asked for a user to be retried and when.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("sync_instances") as batch:
        batch.add_column(sa.Column("settings", sa.Text(), nullable=True))
        batch.add_column(sa.Column("health", sa.String(16), nullable=True))
    with op.batch_alter_table("sync_runs") as batch:
        batch.add_column(sa.Column("due", sa.Integer(), nullable=True))
    with op.batch_alter_table("sync_user_state") as batch:
        batch.add_column(sa.Column("retry_requested_at", TZ, nullable=True))
        batch.add_column(sa.Column("retry_requested_by", sa.String(128), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("sync_user_state") as batch:
        batch.drop_column("retry_requested_by")
        batch.drop_column("retry_requested_at")
    with op.batch_alter_table("sync_runs") as batch:
        batch.drop_column("due")
    with op.batch_alter_table("sync_instances") as batch:
        batch.drop_column("health")
        batch.drop_column("settings")
