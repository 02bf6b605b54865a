"""The agents table: named profiles (model, adapter, prompt, sampling defaults, knowledge, voice) as JSON.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from mini_claude.db.models import AGENT_NAME_MAX_LENGTH, ID_LENGTH, UTCDateTime

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "agents",
        sa.Column("id", sa.String(ID_LENGTH), primary_key=True),
        sa.Column("name", sa.String(AGENT_NAME_MAX_LENGTH), nullable=False),
        sa.Column("definition", sa.JSON, nullable=False),
        sa.Column("source", sa.Text),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("updated_at", UTCDateTime, nullable=False),
    )
    op.create_index("uq_agents_name", "agents", ["name"], unique=True)


def downgrade() -> None:
    op.drop_table("agents")
