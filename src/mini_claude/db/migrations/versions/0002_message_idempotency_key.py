"""Let callers store a message exactly once under a key of their choosing.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from mini_claude.db.models import IDEMPOTENCY_KEY_MAX_LENGTH

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A nullable column can be added in place on both backends; existing rows get NULL, which never collides.
    op.add_column("messages", sa.Column("idempotency_key", sa.String(IDEMPOTENCY_KEY_MAX_LENGTH)))
    op.create_index(
        "uq_messages_conversation_idempotency_key", "messages", ["conversation_id", "idempotency_key"], unique=True
    )


def downgrade() -> None:
    op.drop_index("uq_messages_conversation_idempotency_key", "messages")
    with op.batch_alter_table("messages") as batch:
        batch.drop_column("idempotency_key")
