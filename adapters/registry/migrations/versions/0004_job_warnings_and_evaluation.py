"""Fine-tuning jobs: recipe warnings, evaluation settings and the evaluation report.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

COLUMNS = ("warnings", "evaluation_settings", "evaluation")


def upgrade() -> None:
    with op.batch_alter_table("fine_tuning_jobs") as batch:
        for name in COLUMNS:
            batch.add_column(sa.Column(name, sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("fine_tuning_jobs") as batch:
        for name in reversed(COLUMNS):
            batch.drop_column(name)
