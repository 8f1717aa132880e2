"""The daemon's own tables: per-user state and leases, runs, operations, control.

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "sync_user_state",
        sa.Column("user_key", sa.String(255), primary_key=True),
        sa.Column("lease_owner", sa.String(128), nullable=True),
        sa.Column("lease_token", sa.String(32), nullable=True),
        sa.Column("lease_expires_at", TZ, nullable=True),
        sa.Column("last_attempt_at", TZ, nullable=True),
        sa.Column("last_run_id", sa.String(32), nullable=True),
        sa.Column("last_success_at", TZ, nullable=True),
        sa.Column("consecutive_failures", sa.Integer, nullable=False, server_default="0"),
        sa.Column("next_attempt_at", TZ, nullable=True),
        sa.Column("last_status", sa.Integer, nullable=True),
        sa.Column("last_error", sa.Text, nullable=True),
    )
    op.create_index("ix_sync_user_state_lease_owner", "sync_user_state", ["lease_owner"])
    op.create_index("ix_sync_user_state_failures", "sync_user_state", ["consecutive_failures"])
    op.create_table(
        "sync_runs",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("instance", sa.String(128), nullable=False),
        sa.Column("started_at", TZ, nullable=False),
        sa.Column("heartbeat_at", TZ, nullable=False),
        sa.Column("finished_at", TZ, nullable=True),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("claimed", sa.Integer, nullable=False, server_default="0"),
        sa.Column("succeeded", sa.Integer, nullable=False, server_default="0"),
        sa.Column("failed", sa.Integer, nullable=False, server_default="0"),
        sa.Column("skipped", sa.Integer, nullable=False, server_default="0"),
        sa.Column("error", sa.Text, nullable=True),
    )
    op.create_index("ix_sync_runs_started_at", "sync_runs", ["started_at"])
    op.create_table(
        "sync_operations",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("run_id", sa.String(32), nullable=False),
        sa.Column("user_key", sa.String(255), nullable=False),
        sa.Column("instance", sa.String(128), nullable=False),
        sa.Column("started_at", TZ, nullable=False),
        sa.Column("heartbeat_at", TZ, nullable=False),
        sa.Column("finished_at", TZ, nullable=True),
        sa.Column("outcome", sa.String(16), nullable=True),
        sa.Column("http_status", sa.Integer, nullable=True),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("duration_ms", sa.Integer, nullable=True),
    )
    op.create_index("ix_sync_operations_run_id", "sync_operations", ["run_id"])
    op.create_index("ix_sync_operations_user_key", "sync_operations", ["user_key"])
    op.create_index("ix_sync_operations_finished_at", "sync_operations", ["finished_at"])
    op.create_table(
        "sync_control",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("paused", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("paused_at", TZ, nullable=True),
        sa.Column("force_requested_at", TZ, nullable=True),
        sa.Column("updated_by", sa.String(128), nullable=True),
    )


def downgrade() -> None:
    op.drop_table("sync_control")
    op.drop_table("sync_operations")
    op.drop_table("sync_runs")
    op.drop_table("sync_user_state")
