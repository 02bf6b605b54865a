"""The first schema: conversations and their ordered messages.

Revision ID: 0001
Revises:
Create Date: 2026-11-21

The DDL is frozen here (migrations never use the models, which describe only the newest schema).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from mini_claude.db.models import ID_LENGTH, ROLES, UTCDateTime, in_list_check

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "conversations",
        sa.Column("id", sa.String(ID_LENGTH), primary_key=True),
        sa.Column("title", sa.Text, nullable=False),
        sa.Column("model", sa.Text),
        sa.Column("system_prompt", sa.Text),
        sa.Column("metadata", sa.JSON, nullable=False),
        sa.Column("last_seq", sa.Integer, nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("updated_at", UTCDateTime, nullable=False),
    )
    op.create_index("ix_conversations_updated_at", "conversations", ["updated_at"])
    op.create_table(
        "messages",
        sa.Column("id", sa.String(ID_LENGTH), primary_key=True),
        sa.Column(
            "conversation_id",
            sa.String(ID_LENGTH),
            sa.ForeignKey("conversations.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("seq", sa.Integer, nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("content", sa.Text, nullable=False),
        sa.Column("prompt_tokens", sa.Integer),
        sa.Column("completion_tokens", sa.Integer),
        sa.Column("model", sa.Text),
        sa.Column("ttft_ms", sa.Float),
        sa.Column("duration_ms", sa.Float),
        sa.Column("finish_reason", sa.Text),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.CheckConstraint(in_list_check("role", ROLES), name="ck_messages_role"),
    )
    op.create_index("ix_messages_conversation_seq", "messages", ["conversation_id", "seq"], unique=True)


def downgrade() -> None:
    op.drop_table("messages")
    op.drop_table("conversations")
