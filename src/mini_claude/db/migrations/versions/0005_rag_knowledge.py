"""Knowledge collections of retrieval (collections, documents, chunks with vectors, keyword indexes) and uploads.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from mini_claude.db.models import (
    DOCUMENT_STATUSES,
    ID_LENGTH,
    KEYWORD_INDEX_DDL,
    KEYWORD_INDEX_DROP,
    UTCDateTime,
    in_list_check,
)

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "rag_collections",
        sa.Column("id", sa.String(ID_LENGTH), primary_key=True),
        sa.Column("name", sa.Text, nullable=False, unique=True),
        sa.Column("embedder", sa.Text, nullable=False),
        sa.Column("dim", sa.Integer, nullable=False),
        sa.Column("metadata", sa.JSON, nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("updated_at", UTCDateTime, nullable=False),
    )
    op.create_table(
        "rag_documents",
        sa.Column("id", sa.String(ID_LENGTH), primary_key=True),
        sa.Column(
            "collection_id",
            sa.String(ID_LENGTH),
            sa.ForeignKey("rag_collections.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("source", sa.Text, nullable=False),
        sa.Column("filename", sa.Text, nullable=False),
        sa.Column("content_hash", sa.String(64), nullable=False),
        sa.Column("size_bytes", sa.Integer, nullable=False),
        sa.Column("n_chunks", sa.Integer, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("error", sa.Text),
        sa.Column("metadata", sa.JSON, nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("updated_at", UTCDateTime, nullable=False),
        sa.CheckConstraint(in_list_check("status", DOCUMENT_STATUSES), name="ck_rag_documents_status"),
    )
    op.create_index("uq_rag_documents_collection_source", "rag_documents", ["collection_id", "source"], unique=True)
    op.create_table(
        "rag_chunks",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column(
            "document_id", sa.String(ID_LENGTH), sa.ForeignKey("rag_documents.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column(
            "collection_id",
            sa.String(ID_LENGTH),
            sa.ForeignKey("rag_collections.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("seq", sa.Integer, nullable=False),
        sa.Column("text", sa.Text, nullable=False),
        sa.Column("heading", sa.Text, nullable=False),
        sa.Column("start_char", sa.Integer, nullable=False),
        sa.Column("end_char", sa.Integer, nullable=False),
        sa.Column("page", sa.Integer),
        sa.Column("n_tokens", sa.Integer, nullable=False),
        sa.Column("embedding", sa.LargeBinary, nullable=False),
    )
    op.create_index("ix_rag_chunks_collection", "rag_chunks", ["collection_id"])
    op.create_index("ix_rag_chunks_document_seq", "rag_chunks", ["document_id", "seq"])
    op.create_table(
        "uploaded_files",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("filename", sa.Text, nullable=False),
        sa.Column("purpose", sa.String(32), nullable=False),
        sa.Column("size_bytes", sa.Integer, nullable=False),
        sa.Column("data", sa.LargeBinary, nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
    )
    for statement in KEYWORD_INDEX_DDL.get(op.get_bind().dialect.name, []):
        op.execute(statement)


def downgrade() -> None:
    for statement in KEYWORD_INDEX_DROP.get(op.get_bind().dialect.name, []):
        op.execute(statement)
    op.drop_table("uploaded_files")
    op.drop_table("rag_chunks")
    op.drop_table("rag_documents")
    op.drop_table("rag_collections")
