"""Tables of the store: conversations, messages, fine-tuning jobs, knowledge collections, predictions, agents.

Design choices:
- Typed SQLAlchemy 2 declarative models (`Mapped[...]`), one flat module (it stays far below the size at which
  a split pays off). Column types are spelled out rather than inferred from the annotations, because the
  migrations in `migrations/versions/` freeze the same DDL and a test checks that a migrated database and a fresh
  `create_all` reflect to the same schema.
- Ids are UUID4 strings (36 characters) made in Python, so an id is known before the INSERT and the same
  schema works on SQLite and PostgreSQL without a native UUID type.
- Timestamps are stored in UTC and always come back timezone-aware (`UTCDateTime`), because SQLite keeps no
  offset and PostgreSQL returns the session's zone: callers get one kind of datetime from both backends.
- Free text (titles, prompts, contents, model names, errors) is `Text`, so length limits never differ between
  the backends (SQLite ignores `VARCHAR(n)`, PostgreSQL enforces it), written through `NulFreeText`:
  PostgreSQL's text cannot hold NUL, which users paste and models emit, so a NUL is stored as U+FFFD on every
  backend. The column type does it, so no caller can forget it (a job's error text, from a child's log, did).
- Messages are ordered by a per-conversation sequence number `seq`, not by `created_at`: two messages stored
  within the clock's resolution, or by hosts whose clocks differ, still keep the order they were added in.
  The conversation row carries the last number handed out (`last_seq`); `crud.add_message` increments it
  with one UPDATE, which also serialises concurrent writers to the same conversation.
- `messages.conversation_id` has `ON DELETE CASCADE` in the database (not only an ORM cascade), so deleting a
  conversation with plain SQL, or from another program, removes its messages as well.
- `(conversation_id, idempotency_key)` is unique: a caller that stores a reply under a key of its choosing
  (e.g. the completion id) can retry the store and it lands once.
- Allowed roles and job statuses are CHECK constraints, so bad rows are refused by the database itself.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any, Literal, get_args

from sqlalchemy import (
    DDL,
    JSON,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    event,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

Role = Literal["system", "user", "assistant"]
ROLES: tuple[str, ...] = get_args(Role)

# The job states of OpenAI's fine-tuning API, so the later endpoint can report them unchanged.
JobStatus = Literal["validating_files", "queued", "running", "succeeded", "failed", "cancelled"]
JOB_STATUSES: tuple[str, ...] = get_args(JobStatus)

ID_LENGTH = 36  # str(uuid.uuid4())
IDEMPOTENCY_KEY_MAX_LENGTH = 255
OWNER_LENGTH = 128  # a job runner's id: host, process id and a random suffix
AGENT_NAME_MAX_LENGTH = 64


def new_id() -> str:
    """A fresh random UUID4 in its 36-character text form."""
    return str(uuid.uuid4())


def utcnow() -> datetime:
    """The current time as an aware UTC datetime (the only kind this package stores)."""
    return datetime.now(UTC)


def in_list_check(column: str, values: tuple[str, ...]) -> str:
    """SQL text of a `column IN (...)` CHECK; shared with the migrations so both emit identical DDL."""
    quoted = ", ".join(f"'{value}'" for value in values)
    return f"{column} IN ({quoted})"


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware `DateTime` that is written as UTC and always read back as aware UTC.

    SQLite stores datetimes as text without an offset, so an aware value would be written as its local wall
    time and read back naive. Converting to UTC on the way in and tagging UTC on the way out gives the same
    values on SQLite and PostgreSQL.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column; pass an aware datetime")
        value = value.astimezone(UTC)
        # SQLite's DATETIME formatting ignores tzinfo; store the UTC wall time explicitly.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class NulFreeText(TypeDecorator[str]):
    """`Text` that stores NUL characters as U+FFFD (see the module docstring)."""

    impl = Text
    cache_ok = True

    def process_bind_param(self, value: str | None, dialect: Dialect) -> str | None:
        return None if value is None else value.replace("\x00", "\ufffd")


class Base(DeclarativeBase):
    """Declarative base whose `metadata` holds every table of the store (used by `create_all`)."""


class Conversation(Base):
    """A chat thread: its settings and, through `messages`, its turns in order."""

    __tablename__ = "conversations"
    __table_args__ = (Index("ix_conversations_updated_at", "updated_at"),)

    id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True, default=new_id)
    title: Mapped[str] = mapped_column(NulFreeText, nullable=False)
    model: Mapped[str | None] = mapped_column(NulFreeText)
    system_prompt: Mapped[str | None] = mapped_column(NulFreeText)
    # `metadata` is reserved on declarative classes, so the attribute is `meta` over a column named "metadata".
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", JSON, nullable=False, default=dict)
    # The sequence number of the newest message (0 when empty); see the module docstring.
    last_seq: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)
    # Bumped by every new message or title change, so "most recently active first" is one indexed sort.
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)

    messages: Mapped[list[Message]] = relationship(
        back_populates="conversation",
        order_by="Message.seq",
        cascade="all, delete-orphan",
        passive_deletes=True,  # the database's ON DELETE CASCADE removes the rows; no need to load them first
    )

    def __repr__(self) -> str:
        return f"Conversation(id={self.id!r}, title={self.title!r})"


class Message(Base):
    """One turn of a conversation, with the generation statistics of assistant replies."""

    __tablename__ = "messages"
    __table_args__ = (
        Index("ix_messages_conversation_seq", "conversation_id", "seq", unique=True),
        Index("uq_messages_conversation_idempotency_key", "conversation_id", "idempotency_key", unique=True),
        CheckConstraint(in_list_check("role", ROLES), name="ck_messages_role"),
    )

    id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True, default=new_id)
    conversation_id: Mapped[str] = mapped_column(
        String(ID_LENGTH), ForeignKey("conversations.id", ondelete="CASCADE"), nullable=False
    )
    seq: Mapped[int] = mapped_column(Integer, nullable=False)
    role: Mapped[str] = mapped_column(String(16), nullable=False)
    content: Mapped[str] = mapped_column(NulFreeText, nullable=False)
    prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    completion_tokens: Mapped[int | None] = mapped_column(Integer)
    model: Mapped[str | None] = mapped_column(NulFreeText)
    ttft_ms: Mapped[float | None] = mapped_column(Float)  # time to first token
    duration_ms: Mapped[float | None] = mapped_column(Float)
    finish_reason: Mapped[str | None] = mapped_column(NulFreeText)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)
    # Chosen by the caller to make a store idempotent; NULLs never collide, so unkeyed messages are unaffected.
    idempotency_key: Mapped[str | None] = mapped_column(String(IDEMPOTENCY_KEY_MAX_LENGTH))

    conversation: Mapped[Conversation] = relationship(back_populates="messages")

    def __repr__(self) -> str:
        return f"Message(id={self.id!r}, seq={self.seq}, role={self.role!r})"


class FineTuneJob(Base):
    """A fine-tuning run requested through the API: its configuration, progress and outcome."""

    __tablename__ = "fine_tune_jobs"
    __table_args__ = (
        Index("ix_fine_tune_jobs_created_at", "created_at"),
        CheckConstraint(in_list_check("status", JOB_STATUSES), name="ck_fine_tune_jobs_status"),
    )

    id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True, default=new_id)
    status: Mapped[str] = mapped_column(String(32), nullable=False, default="queued")
    config: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False, default=dict)
    progress: Mapped[float] = mapped_column(Float, nullable=False, default=0.0)  # fraction done, 0..1
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))  # SQL NULL, not JSON null
    error: Mapped[str | None] = mapped_column(NulFreeText)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)
    # The runner that holds a running job, and until when: it renews the lease while the job trains; once the
    # lease has run out (the runner died) another runner may claim the job (`crud.claim_next_fine_tune_job`).
    owner: Mapped[str | None] = mapped_column(String(OWNER_LENGTH))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    def __repr__(self) -> str:
        return f"FineTuneJob(id={self.id!r}, status={self.status!r})"


# ------------------------------------------------------------------------------------- knowledge (retrieval)

DOCUMENT_STATUSES: tuple[str, ...] = ("in_progress", "completed", "failed")  # OpenAI's vector-store file states


class KnowledgeCollection(Base):
    """A named set of documents searched together (a vector store, in OpenAI's words), tied to one embedder."""

    __tablename__ = "rag_collections"

    id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(Text, nullable=False, unique=True)
    embedder: Mapped[str] = mapped_column(Text, nullable=False)  # vectors of different models never mix
    dim: Mapped[int] = mapped_column(Integer, nullable=False)
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", JSON, nullable=False, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)


class KnowledgeDocument(Base):
    """One file of a collection: where it came from and the hash that makes re-ingesting it idempotent."""

    __tablename__ = "rag_documents"
    __table_args__ = (
        Index("uq_rag_documents_collection_source", "collection_id", "source", unique=True),
        CheckConstraint(in_list_check("status", DOCUMENT_STATUSES), name="ck_rag_documents_status"),
    )

    id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True, default=new_id)
    collection_id: Mapped[str] = mapped_column(
        String(ID_LENGTH), ForeignKey("rag_collections.id", ondelete="CASCADE"), nullable=False
    )
    source: Mapped[str] = mapped_column(Text, nullable=False)  # an absolute path, or an uploaded file's id
    filename: Mapped[str] = mapped_column(Text, nullable=False)
    content_hash: Mapped[str] = mapped_column(String(64), nullable=False)  # sha256 of the file's bytes
    size_bytes: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    n_chunks: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    status: Mapped[str] = mapped_column(String(16), nullable=False, default="completed")
    error: Mapped[str | None] = mapped_column(Text)
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", JSON, nullable=False, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)


class KnowledgeChunk(Base):
    """A piece of a document that fits the embedder: its text, span, page, heading path and vector.

    The id is an integer so SQLite's FTS5 index can refer to rows by rowid (an external-content table).
    """

    __tablename__ = "rag_chunks"
    __table_args__ = (
        Index("ix_rag_chunks_collection", "collection_id"),
        Index("ix_rag_chunks_document_seq", "document_id", "seq"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    document_id: Mapped[str] = mapped_column(
        String(ID_LENGTH), ForeignKey("rag_documents.id", ondelete="CASCADE"), nullable=False
    )
    collection_id: Mapped[str] = mapped_column(
        String(ID_LENGTH), ForeignKey("rag_collections.id", ondelete="CASCADE"), nullable=False
    )
    seq: Mapped[int] = mapped_column(Integer, nullable=False)
    text: Mapped[str] = mapped_column(Text, nullable=False)
    heading: Mapped[str] = mapped_column(Text, nullable=False, default="")
    start_char: Mapped[int] = mapped_column(Integer, nullable=False)
    end_char: Mapped[int] = mapped_column(Integer, nullable=False)
    page: Mapped[int | None] = mapped_column(Integer)
    n_tokens: Mapped[int] = mapped_column(Integer, nullable=False)
    embedding: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)  # float32, little-endian, `dim` values


class UploadedFile(Base):
    """A file uploaded through `/v1/files` (OpenAI's Files API): its bytes, kept until deleted."""

    __tablename__ = "uploaded_files"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # "file-<hex>", OpenAI's shape
    filename: Mapped[str] = mapped_column(Text, nullable=False)
    purpose: Mapped[str] = mapped_column(String(32), nullable=False)
    size_bytes: Mapped[int] = mapped_column(Integer, nullable=False)
    data: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)


# Keyword search is maintained by the database as chunks change, never rebuilt per query: on SQLite an FTS5
# index over the chunks (external content, kept in step by triggers; BM25 ranking is built in), on PostgreSQL a
# GIN index over the chunks' tsvector. The same statements serve `create_all` (below) and the migration.
KEYWORD_INDEX_DDL: dict[str, list[str]] = {
    "sqlite": [
        "CREATE VIRTUAL TABLE rag_chunks_fts USING fts5(heading, text, content='rag_chunks', content_rowid='id', "
        "tokenize='porter unicode61')",
        "CREATE TRIGGER rag_chunks_fts_insert AFTER INSERT ON rag_chunks BEGIN "
        "INSERT INTO rag_chunks_fts(rowid, heading, text) VALUES (new.id, new.heading, new.text); END",
        "CREATE TRIGGER rag_chunks_fts_delete AFTER DELETE ON rag_chunks BEGIN "
        "INSERT INTO rag_chunks_fts(rag_chunks_fts, rowid, heading, text) VALUES ('delete', old.id, old.heading, "
        "old.text); END",
        "CREATE TRIGGER rag_chunks_fts_update AFTER UPDATE ON rag_chunks BEGIN "
        "INSERT INTO rag_chunks_fts(rag_chunks_fts, rowid, heading, text) VALUES ('delete', old.id, old.heading, "
        "old.text); INSERT INTO rag_chunks_fts(rowid, heading, text) VALUES (new.id, new.heading, new.text); END",
    ],
    "postgresql": [
        "CREATE INDEX ix_rag_chunks_tsv ON rag_chunks USING gin (to_tsvector('english', heading || ' ' || text))",
    ],
}
KEYWORD_INDEX_DROP: dict[str, list[str]] = {
    "sqlite": [
        "DROP TRIGGER IF EXISTS rag_chunks_fts_insert",
        "DROP TRIGGER IF EXISTS rag_chunks_fts_delete",
        "DROP TRIGGER IF EXISTS rag_chunks_fts_update",
        "DROP TABLE IF EXISTS rag_chunks_fts",
    ],
    "postgresql": ["DROP INDEX IF EXISTS ix_rag_chunks_tsv"],
}
for _dialect, _statements in KEYWORD_INDEX_DDL.items():
    for _statement in _statements:
        event.listen(KnowledgeChunk.__table__, "after_create", DDL(_statement).execute_if(dialect=_dialect))
for _dialect, _statements in KEYWORD_INDEX_DROP.items():
    for _statement in _statements:
        event.listen(KnowledgeChunk.__table__, "before_drop", DDL(_statement).execute_if(dialect=_dialect))


class Prediction(Base):
    """One request to a served scikit-learn model: what came in, what went out, which model file, how long.

    One row per request (not per instance), as KServe's request logger records a request with its response:
    `inputs` is the list of instances and `outputs` holds the labels and probabilities in the same order.
    """

    __tablename__ = "predictions"
    __table_args__ = (
        Index("ix_predictions_created_at", "created_at"),
        Index("ix_predictions_model_created_at", "model", "created_at"),
        Index("ix_predictions_request_id", "request_id"),
    )

    id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True, default=new_id)
    request_id: Mapped[str] = mapped_column(Text, nullable=False)
    protocol: Mapped[str] = mapped_column(String(16), nullable=False)  # "v1" (/predict) or "v2" (KServe V2)
    model: Mapped[str] = mapped_column(Text, nullable=False)
    model_version: Mapped[str] = mapped_column(Text, nullable=False)  # the file's sha256 prefix
    inputs: Mapped[list[Any]] = mapped_column(JSON, nullable=False)
    outputs: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False)
    latency_ms: Mapped[float] = mapped_column(Float, nullable=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)

    def __repr__(self) -> str:
        return f"Prediction(id={self.id!r}, model={self.model!r}, request_id={self.request_id!r})"


class Agent(Base):
    """A named agent profile; `definition` is its whole definition as JSON (the package validates it).

    `source` says where it came from (a YAML file's path, or None for the API and CLI), so a server that
    re-reads its agents directory updates only what it loaded from there.
    """

    __tablename__ = "agents"
    __table_args__ = (Index("uq_agents_name", "name", unique=True),)

    id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(AGENT_NAME_MAX_LENGTH), nullable=False)
    definition: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False, default=dict)
    source: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)

    def __repr__(self) -> str:
        return f"Agent(name={self.name!r})"
