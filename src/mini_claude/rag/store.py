"""Collections, documents and chunks in the project database, and keyword search over them.

Design choices:
- Plain functions over a `Session`, like `db.crud`: the caller owns the transaction, so replacing a document's
  chunks (delete the old, insert the new, update its hash) commits or rolls back as one.
- Vectors live beside their chunk as float32 bytes, so a chunk, its text and its vector are deleted together
  and the dense index (`index.py`) can always be brought back in step from the database.
- Keyword search is the database's own, maintained by it as rows change (`db.models.KEYWORD_INDEX_DDL`);
  the query side (stop words, rare words first, rescoring) is `rag.keyword`.
- Each change to a collection's documents bumps its `updated_at`, which is what an in-memory dense index
  compares to know it is stale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from mini_claude.db.models import KnowledgeChunk, KnowledgeCollection, KnowledgeDocument, utcnow
from mini_claude.rag import keyword
from mini_claude.rag.chunking import EMBED_RECIPE, Chunk


class CollectionError(ValueError):
    """A collection that does not exist, or whose embedder differs from the one asked for."""


@dataclass
class ChunkRecord:
    """A stored chunk with what a citation needs of its document."""

    id: int
    document_id: str
    source: str
    filename: str
    seq: int
    text: str
    heading: str
    start_char: int
    end_char: int
    page: int | None
    n_tokens: int


# ----------------------------------------------------------------------------------------------- collections


def get_collection(session: Session, name: str) -> KnowledgeCollection | None:
    return session.scalars(select(KnowledgeCollection).where(KnowledgeCollection.name == name)).one_or_none()


def get_collection_by_id(session: Session, collection_id: str) -> KnowledgeCollection | None:
    return session.get(KnowledgeCollection, collection_id)


def ensure_collection(session: Session, name: str, embedder: str, dim: int) -> KnowledgeCollection:
    """The collection called `name`, created if new; an existing one must use the same embedder."""
    collection = get_collection(session, name)
    if collection is None:
        now = utcnow()
        collection = KnowledgeCollection(name=name, embedder=embedder, dim=dim, meta={}, created_at=now, updated_at=now)
        session.add(collection)
        session.flush()
    elif (collection.embedder, collection.dim) != (embedder, dim):
        raise CollectionError(
            f"collection {name!r} holds {collection.embedder} vectors ({collection.dim}-d), not {embedder} ({dim}-d)"
        )
    return collection


def list_collections(session: Session) -> list[KnowledgeCollection]:
    return list(session.scalars(select(KnowledgeCollection).order_by(KnowledgeCollection.name)))


def delete_collection(session: Session, collection_id: str) -> bool:
    """Delete a collection with its documents and chunks (ON DELETE CASCADE; the keyword index follows, and on
    PostgreSQL so does the collection's pgvector index, which is its own partial index)."""
    if session.get_bind().dialect.name == "postgresql":
        from mini_claude.rag import pgvector

        pgvector.drop_index(session, collection_id)
    return session.execute(delete(KnowledgeCollection).where(KnowledgeCollection.id == collection_id)).rowcount > 0


def touch(session: Session, collection_id: str) -> None:
    session.execute(
        update(KnowledgeCollection).where(KnowledgeCollection.id == collection_id).values(updated_at=utcnow())
    )


# ------------------------------------------------------------------------------------------------- documents


def get_document(session: Session, collection_id: str, source: str) -> KnowledgeDocument | None:
    query = select(KnowledgeDocument).where(
        KnowledgeDocument.collection_id == collection_id, KnowledgeDocument.source == source
    )
    return session.scalars(query).one_or_none()


def list_documents(session: Session, collection_id: str) -> list[KnowledgeDocument]:
    query = select(KnowledgeDocument).where(KnowledgeDocument.collection_id == collection_id)
    return list(session.scalars(query.order_by(KnowledgeDocument.source)))


def put_document(
    session: Session,
    collection_id: str,
    source: str,
    filename: str,
    content_hash: str,
    size_bytes: int,
    chunks: list[Chunk],
    vectors: np.ndarray,
    *,
    meta: dict[str, Any] | None = None,
) -> KnowledgeDocument:
    """Store a document's chunks and vectors, replacing whatever the collection held for `source`."""
    now = utcnow()
    document = get_document(session, collection_id, source)
    if document is None:
        document = KnowledgeDocument(collection_id=collection_id, source=source, created_at=now, meta=dict(meta or {}))
        session.add(document)
    else:
        session.execute(delete(KnowledgeChunk).where(KnowledgeChunk.document_id == document.id))
    document.filename, document.content_hash, document.size_bytes = filename, content_hash, size_bytes
    document.meta = {**(document.meta or {}), "embed_recipe": EMBED_RECIPE}  # what re-ingestion compares
    document.n_chunks, document.status, document.error, document.updated_at = len(chunks), "completed", None, now
    session.flush()
    vectors = np.ascontiguousarray(vectors, dtype="<f4")
    rows = [
        {
            "document_id": document.id,
            "collection_id": collection_id,
            "seq": c.seq,
            "text": c.text,
            "heading": c.heading,
            "start_char": c.start,
            "end_char": c.end,
            "page": c.page,
            "n_tokens": c.n_tokens,
            "embedding": vectors[i].tobytes(),
        }
        for i, c in enumerate(chunks)
    ]
    if rows:
        session.execute(KnowledgeChunk.__table__.insert(), rows)
    touch(session, collection_id)
    return document


def mark_document(
    session: Session, collection_id: str, source: str, filename: str, status: str, error: str | None = None
) -> KnowledgeDocument:
    """Create or update a document row without chunks: `in_progress` while it is ingested in the background,
    `failed` with the reason when it could not be (its old chunks, if any, are dropped)."""
    now = utcnow()
    document = get_document(session, collection_id, source)
    if document is None:
        document = KnowledgeDocument(collection_id=collection_id, source=source, created_at=now, meta={},
                                     content_hash="", size_bytes=0, n_chunks=0)  # fmt: skip
        session.add(document)
    elif status == "failed":
        session.execute(delete(KnowledgeChunk).where(KnowledgeChunk.document_id == document.id))
        document.n_chunks = 0
    document.filename, document.status, document.error, document.updated_at = filename, status, error, now
    session.flush()
    touch(session, collection_id)
    return document


def delete_document(session: Session, collection_id: str, source: str) -> bool:
    """Remove a document and its chunks from a collection; False if it was not there."""
    deleted = session.execute(
        delete(KnowledgeDocument).where(
            KnowledgeDocument.collection_id == collection_id, KnowledgeDocument.source == source
        )
    ).rowcount
    if deleted:
        touch(session, collection_id)
    return deleted > 0


# ---------------------------------------------------------------------------------------------------- chunks


def chunk_ids(session: Session, collection_id: str) -> np.ndarray:
    rows = session.scalars(select(KnowledgeChunk.id).where(KnowledgeChunk.collection_id == collection_id))
    return np.fromiter(rows, dtype=np.int64)


def load_vectors(session: Session, collection_id: str, ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(ids, (n, dim) float32 vectors) of a collection's chunks, or of the given chunk ids only."""
    query = select(KnowledgeChunk.id, KnowledgeChunk.embedding).where(KnowledgeChunk.collection_id == collection_id)
    if ids is not None and len(ids) <= 10_000:
        query = query.where(KnowledgeChunk.id.in_([int(i) for i in ids]))
    rows = session.execute(query).all()
    if ids is not None and len(ids) > 10_000:
        wanted = set(ids.tolist())
        rows = [r for r in rows if r[0] in wanted]
    if not rows:
        return np.zeros(0, dtype=np.int64), np.zeros((0, 0), dtype=np.float32)
    out_ids = np.array([r[0] for r in rows], dtype=np.int64)
    return out_ids, np.frombuffer(b"".join(r[1] for r in rows), dtype="<f4").reshape(len(rows), -1).copy()


def get_chunks(session: Session, ids: list[int]) -> dict[int, ChunkRecord]:
    """The chunks with these ids, with their documents' source and file name."""
    if not ids:
        return {}
    c, d = KnowledgeChunk, KnowledgeDocument
    query = select(
        c.id, c.document_id, d.source, d.filename, c.seq, c.text, c.heading, c.start_char, c.end_char, c.page,
        c.n_tokens,
    ).join(d, d.id == c.document_id).where(c.id.in_(ids))  # fmt: skip
    return {row[0]: ChunkRecord(*row) for row in session.execute(query)}


def keyword_search(session: Session, collection_id: str, query: str, k: int) -> list[tuple[int, float]]:
    """The k chunks that best match the query's words, as (chunk id, score), best first (`rag.keyword`)."""
    return keyword.search(session, collection_id, query, k)


def count_chunks(session: Session, collection_id: str) -> int:
    query = select(func.count()).select_from(KnowledgeChunk).where(KnowledgeChunk.collection_id == collection_id)
    return session.scalar(query) or 0
