"""Timestamps become timezone-aware (UTC).

PostgreSQL: every datetime column goes from `timestamp without time zone` to `timestamp with
time zone`; the values already there were written as UTC wall times and are read as such
(`AT TIME ZONE 'UTC'`), whatever the session's TimeZone. SQLite has no time zone type: its
columns stay as they are (the UTC wall times they hold are what UTCDateTime reads).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

# (table, column, nullable) of every datetime column in revision 0001
COLUMNS = [
    ("tenants", "created_at", False),
    ("api_keys", "created_at", False),
    ("api_keys", "revoked_at", True),
    ("adapters", "created_at", False),
    ("adapter_versions", "created_at", False),
    ("files", "created_at", False),
    ("fine_tuning_jobs", "created_at", False),
    ("fine_tuning_jobs", "finished_at", True),
    ("fine_tuning_jobs", "lease_expires_at", True),
    ("fine_tuning_events", "created_at", False),
    ("fine_tuning_checkpoints", "created_at", False),
]


def _retype(aware: bool) -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table, column, nullable in COLUMNS:
        # timestamp AT TIME ZONE 'UTC' -> timestamptz of that UTC wall time, and back
        op.alter_column(table, column, type_=sa.DateTime(timezone=aware),
                        existing_type=sa.DateTime(timezone=not aware),
                        existing_nullable=nullable,
                        postgresql_using=f"{column} AT TIME ZONE 'UTC'")


def upgrade() -> None:
    _retype(aware=True)


def downgrade() -> None:
    _retype(aware=False)
