"""Dense search inside PostgreSQL with pgvector's HNSW, where the server has the extension.

Design choices:
- The float32 `bytea` column stays the source of truth on every database; pgvector is an accelerator laid
  beside it. A `vector` column (`embedding_vec`) is filled from the bytes and an HNSW index with cosine
  distance (`vector_cosine_ops`) is built over it, so a server without the extension (Debian's PostgreSQL 15
  has none) runs the very same schema with the in-process index (`index.py`) and nothing to migrate back.
  That is also why the column and index are made here at run time, not in a migration: the extension can be
  installed (or dropped) on a server long after the schema was, and each case keeps working.
- One partial HNSW index per collection (`WHERE collection_id = '<id>'`) over the expression
  `embedding_vec::vector(<dim>)`: pgvector indexes only fixed dimensions, collections may differ in theirs,
  and a graph per collection needs no post-filtering (a shared graph filtered by collection loses recall when
  the collection is a small part of the table). The collection id is put in the SQL as a literal so the
  planner can match the partial index; it is checked to be a UUID first.
- Brought in step lazily, like the in-process index, when the collection changed: rows with no vector yet are
  filled (new chunks, or all of them the first time); the index is created after the first fill, so a large
  collection gets pgvector's bulk build instead of one insertion per row. Deleted chunks leave with their rows.
- `hnsw.ef_search` is set per query (default `EF_SEARCH`), above pgvector's default of 40, for recall@10 near
  the exact search's.
"""

from __future__ import annotations

import re

import numpy as np
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

EF_SEARCH = 100
FILL_BATCH = 1000
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def available(session: Session) -> bool:
    """True on PostgreSQL when the `vector` extension is installed or can be (CREATE EXTENSION needs the
    privilege; without it, or without the extension's files, the in-process index is used)."""
    if session.get_bind().dialect.name != "postgresql":
        return False
    if session.execute(text("SELECT 1 FROM pg_extension WHERE extname = 'vector'")).first():
        return True
    if not session.execute(text("SELECT 1 FROM pg_available_extensions WHERE name = 'vector'")).first():
        return False
    try:
        with session.begin_nested():  # a savepoint: a refused CREATE EXTENSION leaves the transaction usable
            session.execute(text("CREATE EXTENSION IF NOT EXISTS vector"))
    except Exception:  # any refusal (privilege, a broken install) means: fall back
        return False
    return True


def index_name(collection_id: str) -> str:
    return "ix_rag_chunks_hnsw_" + _checked(collection_id).replace("-", "")


def _checked(collection_id: str) -> str:
    if not _UUID.match(collection_id):
        raise ValueError(f"not a collection id: {collection_id!r}")
    return collection_id


def _literal(vector: np.ndarray) -> str:
    """pgvector's text form, '[x,y,...]', with float32's round-trip precision."""
    return "[" + ",".join(f"{x:.9g}" for x in np.asarray(vector, dtype=np.float32).tolist()) + "]"


def sync(session: Session, collection_id: str, dim: int) -> int:
    """Fill missing vectors of a collection's chunks and make sure its HNSW index exists; returns rows filled."""
    cid = _checked(collection_id)
    session.execute(text("ALTER TABLE rag_chunks ADD COLUMN IF NOT EXISTS embedding_vec vector"))
    filled = 0
    while True:
        rows = session.execute(
            text(
                "SELECT id, embedding FROM rag_chunks WHERE collection_id = :cid AND embedding_vec IS NULL "
                "ORDER BY id LIMIT :n"
            ),
            {"cid": cid, "n": FILL_BATCH},
        ).all()
        if not rows:
            break
        session.execute(
            text("UPDATE rag_chunks SET embedding_vec = CAST(:v AS vector) WHERE id = :id"),
            [{"id": i, "v": _literal(np.frombuffer(blob, dtype="<f4"))} for i, blob in rows],
        )
        filled += len(rows)
    session.execute(
        text(
            f"CREATE INDEX IF NOT EXISTS {index_name(cid)} ON rag_chunks "
            f"USING hnsw ((embedding_vec::vector({int(dim)})) vector_cosine_ops) WHERE collection_id = '{cid}'"
        )
    )
    return filled


def search_sql(collection_id: str, dim: int) -> str:
    """The k-nearest query, written so the planner can use the collection's partial HNSW index."""
    cid, d = _checked(collection_id), int(dim)
    distance = f"embedding_vec::vector({d}) <=> CAST(:q AS vector({d}))"
    where = f"collection_id = '{cid}'"
    return f"SELECT id, 1 - ({distance}) AS score FROM rag_chunks WHERE {where} ORDER BY {distance} LIMIT :k"


def search(
    session: Session, collection_id: str, dim: int, query: np.ndarray, k: int, ef: int = EF_SEARCH
) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest chunks by cosine similarity (labels, similarities), best first, from the HNSW index."""
    session.execute(text(f"SET LOCAL hnsw.ef_search = {max(int(ef), k)}"))
    rows = session.execute(text(search_sql(collection_id, dim)), {"q": _literal(query), "k": k}).all()
    return np.array([r[0] for r in rows], dtype=np.int64), np.array([r[1] for r in rows], dtype=np.float32)


def drop_index(connection: Session | Connection, collection_id: str) -> None:
    connection.execute(text(f"DROP INDEX IF EXISTS {index_name(collection_id)}"))
