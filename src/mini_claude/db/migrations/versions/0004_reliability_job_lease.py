"""A lease on running fine-tune jobs: which runner holds a job, and until when.

Several server processes may share one database. A runner claims a job by writing its `owner` id and a
`lease_expires_at` in the future, and renews the lease while the job trains; a job whose lease ran out (its
runner died) is claimable again, by exactly one runner (`crud.claim_next_fine_tune_job`).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from mini_claude.db.models import OWNER_LENGTH, UTCDateTime

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("fine_tune_jobs") as batch:
        batch.add_column(sa.Column("owner", sa.String(OWNER_LENGTH)))
        batch.add_column(sa.Column("lease_expires_at", UTCDateTime))


def downgrade() -> None:
    with op.batch_alter_table("fine_tune_jobs") as batch:
        batch.drop_column("lease_expires_at")
        batch.drop_column("owner")
