"""The job table behind the fine-tuning API.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from mini_claude.db.models import ID_LENGTH, JOB_STATUSES, UTCDateTime, in_list_check

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "fine_tune_jobs",
        sa.Column("id", sa.String(ID_LENGTH), primary_key=True),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("config", sa.JSON, nullable=False),
        sa.Column("progress", sa.Float, nullable=False),
        sa.Column("result", sa.JSON),
        sa.Column("error", sa.Text),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("updated_at", UTCDateTime, nullable=False),
        sa.CheckConstraint(in_list_check("status", JOB_STATUSES), name="ck_fine_tune_jobs_status"),
    )
    op.create_index("ix_fine_tune_jobs_created_at", "fine_tune_jobs", ["created_at"])


def downgrade() -> None:
    op.drop_table("fine_tune_jobs")
