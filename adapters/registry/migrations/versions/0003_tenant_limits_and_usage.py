"""Tenants as customers: limits on tenants and keys, a tenant weight, daily usage.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

LIMIT_COLUMNS = [("requests_per_minute", sa.Integer()), ("tokens_per_minute", sa.BigInteger()),
                 ("max_in_flight", sa.Integer()), ("max_tokens", sa.Integer())]


def upgrade() -> None:
    for table in ("tenants", "api_keys"):
        with op.batch_alter_table(table) as batch:
            for name, type_ in LIMIT_COLUMNS:
                batch.add_column(sa.Column(name, type_, nullable=True))
    with op.batch_alter_table("tenants") as batch:
        batch.add_column(sa.Column("weight", sa.Float(), nullable=True))
    op.create_table("usage_daily",
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("tenant_id", sa.String(length=64), nullable=False),
        sa.Column("adapter", sa.String(length=64), nullable=False),
        sa.Column("key_id", sa.String(length=32), nullable=False),
        sa.Column("requests", sa.BigInteger(), nullable=False),
        sa.Column("prompt_tokens", sa.BigInteger(), nullable=False),
        sa.Column("completion_tokens", sa.BigInteger(), nullable=False),
        sa.Column("errors", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("day", "tenant_id", "adapter", "key_id"),
    )


def downgrade() -> None:
    op.drop_table("usage_daily")
    with op.batch_alter_table("tenants") as batch:
        batch.drop_column("weight")
    for table in ("tenants", "api_keys"):
        with op.batch_alter_table(table) as batch:
            for name, _ in LIMIT_COLUMNS:
                batch.drop_column(name)
