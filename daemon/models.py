"""Table definitions: the daemon's own tables, and the application's users table.

The daemon owns `sync_user_state`, `sync_runs`, `sync_operations` and `sync_control`
(created by Alembic, `background-sync migrate`). The application's users table is only
ever read and have its last_sync column updated; its shape is taken from the database
itself, so the daemon works with whatever id and timestamp types the application chose.
"""

from __future__ import annotations

from sqlalchemy import (
    Boolean,
    Column,
    DateTime,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    false,
)

metadata = MetaData()

KEY_LENGTH = 255

user_state = Table(
    "sync_user_state",
    metadata,
    # The user's id as text: the state table must not depend on the application's id type.
    Column("user_key", String(KEY_LENGTH), primary_key=True),
    Column("lease_owner", String(128), nullable=True),
    Column("lease_token", String(32), nullable=True),
    Column("lease_expires_at", DateTime(timezone=True), nullable=True),
    Column("last_attempt_at", DateTime(timezone=True), nullable=True),
    # The run that last claimed the user: a run never attempts a user twice.
    Column("last_run_id", String(32), nullable=True),
    Column("last_success_at", DateTime(timezone=True), nullable=True),
    Column("consecutive_failures", Integer, nullable=False, server_default="0"),
    Column("next_attempt_at", DateTime(timezone=True), nullable=True),
    Column("last_status", Integer, nullable=True),
    Column("last_error", Text, nullable=True),
    # An operator's `retry`: who cleared this user's backoff or quarantine, and when.
    Column("retry_requested_at", DateTime(timezone=True), nullable=True),
    Column("retry_requested_by", String(128), nullable=True),
    Index("ix_sync_user_state_lease_owner", "lease_owner"),
    Index("ix_sync_user_state_failures", "consecutive_failures"),
)

runs = Table(
    "sync_runs",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("instance", String(128), nullable=False),
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("heartbeat_at", DateTime(timezone=True), nullable=False),
    Column("finished_at", DateTime(timezone=True), nullable=True),
    # running, succeeded, failed (some users failed), interrupted, paused, crashed
    Column("outcome", String(16), nullable=False),
    Column("claimed", Integer, nullable=False, server_default="0"),
    Column("succeeded", Integer, nullable=False, server_default="0"),
    Column("failed", Integer, nullable=False, server_default="0"),
    Column("skipped", Integer, nullable=False, server_default="0"),
    Column("error", Text, nullable=True),
    # The users the cycle found due when it started: progress is claimed/done of this.
    Column("due", Integer, nullable=True),
    Index("ix_sync_runs_started_at", "started_at"),
)

operations = Table(
    "sync_operations",
    metadata,
    # The lease token doubles as the operation id: one claim, one operation.
    Column("id", String(32), primary_key=True),
    Column("run_id", String(32), nullable=False),
    Column("user_key", String(KEY_LENGTH), nullable=False),
    Column("instance", String(128), nullable=False),
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("heartbeat_at", DateTime(timezone=True), nullable=False),
    Column("finished_at", DateTime(timezone=True), nullable=True),
    # success, failed (also "abandoned: ..." by cleanup), conflict, released, lease_lost
    Column("outcome", String(16), nullable=True),
    Column("http_status", Integer, nullable=True),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("error", Text, nullable=True),
    Column("duration_ms", Integer, nullable=True),
    Index("ix_sync_operations_run_id", "run_id"),
    Index("ix_sync_operations_user_key", "user_key"),
    Index("ix_sync_operations_finished_at", "finished_at"),
)

control = Table(
    "sync_control",
    metadata,
    # A single row (id = 1): operator switches every instance reads.
    Column("id", Integer, primary_key=True),
    Column("paused", Boolean, nullable=False, server_default=false()),
    Column("paused_at", DateTime(timezone=True), nullable=True),
    Column("force_requested_at", DateTime(timezone=True), nullable=True),
    Column("updated_by", String(128), nullable=True),
)

instances = Table(
    "sync_instances",
    metadata,
    # One row per running daemon, refreshed every few seconds; `status` reads them.
    Column("instance", String(128), primary_key=True),
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("heartbeat_at", DateTime(timezone=True), nullable=False),
    Column("state", String(32), nullable=False),
    Column("circuit", String(16), nullable=False),
    Column("status", String(255), nullable=True),
    Column("version", String(32), nullable=True),
    # JSON: the thresholds this instance runs with, so `status` judges by the daemon's
    # settings rather than the caller's environment.
    Column("settings", Text, nullable=True),
    # The instance's health state (daemon.health.HealthState), as its views show it.
    Column("health", String(16), nullable=True),
)
