"""Ingestion and search composed: the object the CLI, the server and the evaluation call.

Design choices:
- Idempotent by content hash (LangChain's indexing API, LlamaIndex's docstore strategies): a file is keyed by
  its resolved path within a collection; the sha256 of its bytes decides whether it is skipped (unchanged),
  replaced (changed) or added (new). A document embedded with another `chunking.EMBED_RECIPE` than today's
  counts as changed, so a new embedding recipe reaches stores made before it. Files that were ingested from a
  folder named again and are gone from it now are deleted. The outcome is an `IngestReport` {added, updated,
  deleted, skipped}, plus the files that could not be read, each with a one-line reason; an unreadable file
  never stops the rest.
- Embedding dominates ingestion, so chunks of many files are embedded together (batches sorted by length,
  `Encoder.embed`) and written per file, each file in one transaction.
- The dense index of a collection lives in memory and is brought in step with the database when the
  collection changed (its `updated_at`): only the chunks added since are inserted and the deleted ones
  removed, never a rebuild. `exact` below `HNSW_MIN_VECTORS` chunks, HNSW above ("auto"), persisted under
  `index_dir` (one .npz per collection) so a restart loads the graph instead of building it again.
- On PostgreSQL with the pgvector extension, "auto" searches inside the database instead, with pgvector's HNSW
  (`rag/pgvector.py`): the index then lives with the data, is shared by every replica and survives restarts.
  Without the extension the in-process index above is the fallback, on the same schema.
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from mini_claude.db import session_scope
from mini_claude.db.models import KnowledgeCollection
from mini_claude.encoder import Encoder, Precision
from mini_claude.rag import pgvector, store
from mini_claude.rag.chunking import EMBED_RECIPE, Chunk, ChunkingConfig, chunk_document
from mini_claude.rag.index import ExactIndex, HNSWIndex
from mini_claude.rag.readers import UnreadableFileError, iter_files, read, supported
from mini_claude.rag.rerank import RERANK_DEPTH, QueryLikelihood, rerank
from mini_claude.rag.retrieve import MODES, RRF_K, Hit, rrf, single

DenseKind = Literal["auto", "exact", "hnsw", "pgvector"]
HNSW_MIN_VECTORS = 50_000
CANDIDATES = 50  # how deep each list goes before fusion
EMBED_BATCH_CHUNKS = 256  # chunks gathered across files before one embedding run
FULL_CONTEXT_CHUNKS = 256  # `full_context` reads at most this many chunks: more fit no model's window here


@dataclass
class IngestReport:
    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (file, one-line reason)
    chunks: int = 0  # chunks written
    seconds: float = 0.0

    def counts(self) -> dict[str, int]:
        return {name: len(getattr(self, name)) for name in ("added", "updated", "deleted", "skipped", "failed")}


@dataclass
class _Pending:
    source: str
    filename: str
    content_hash: str
    size: int
    chunks: list[Chunk]
    is_update: bool


class Knowledge:
    """Collections of documents in a database, searched by keyword, by meaning, or both."""

    def __init__(
        self,
        db: Engine,
        encoder: Encoder | None = None,
        *,
        chunking: ChunkingConfig = ChunkingConfig(),
        dense: DenseKind = "auto",
        index_dir: str | Path | None = None,
        embed_precision: Precision = "auto",
    ) -> None:
        self.db = db
        self._encoder = encoder
        self.embed_precision = embed_precision  # used when the encoder is loaded here (see encoder.py)
        self.chunking = chunking
        self.dense = dense
        self.index_dir = Path(index_dir) if index_dir is not None else None
        self._indexes: dict[str, tuple[object, ExactIndex | HNSWIndex]] = {}  # collection id -> (version, index)
        self._pgvector: bool | None = None  # whether the database has pgvector (asked once)
        self._pg_synced: dict[str, object] = {}  # collection id -> version whose vectors pgvector holds
        self._lock = threading.Lock()

    @property
    def encoder(self) -> Encoder:
        if self._encoder is None:
            self._encoder = Encoder.load(precision=self.embed_precision)
        return self._encoder

    # ------------------------------------------------------------------------------------------ ingestion
    def ingest(
        self,
        paths: Iterable[str | Path],
        collection: str,
        *,
        progress: bool = False,
        on_error: Callable[[str, str], None] | None = None,
    ) -> IngestReport:
        """Add files and folders (recursively) to a collection, idempotently (see the module docstring)."""
        import time

        from tqdm import tqdm

        encoder = self.encoder  # loaded before the clock starts: throughput is of ingestion, not of start-up
        start = time.perf_counter()
        paths = [Path(p).expanduser() for p in paths]
        files = list(dict.fromkeys(p.resolve() for p in iter_files(paths)))  # a file named twice is read once
        report = IngestReport()
        with session_scope(self.db) as session:
            coll = store.ensure_collection(session, collection, encoder.name, encoder.dim)
            known = {d.source: (d.content_hash, d.meta.get("embed_recipe", 1)) for d in
                     store.list_documents(session, coll.id)}  # fmt: skip
        pending: list[_Pending] = []
        seen: set[str] = set()
        bar = tqdm(files, desc=f"ingest {collection}", unit="file", disable=not progress, file=sys.stderr)
        for path in bar:
            source = str(path.resolve())
            seen.add(source)

            def fail(reason: str, source: str = source) -> None:
                report.failed.append((source, reason))
                if on_error is not None:
                    on_error(source, reason)
                elif progress:
                    bar.write(f"skipped {source}: {reason}", file=sys.stderr)

            if not supported(path):
                fail(f"unsupported file type {path.suffix or '(none)'}")
                continue
            try:
                data = path.read_bytes()
            except OSError as exc:
                fail(exc.strerror or str(exc))
                continue
            digest = hashlib.sha256(data).hexdigest()
            if known.get(source) == (digest, EMBED_RECIPE):  # same bytes, embedded the same way
                report.skipped.append(source)
                continue
            try:
                chunks = chunk_document(read(path, data), encoder.tokenizer, self.chunking)
            except UnreadableFileError as exc:
                fail(str(exc))
                continue
            pending.append(_Pending(source, path.name, digest, len(data), chunks, source in known))
            if sum(len(p.chunks) for p in pending) >= EMBED_BATCH_CHUNKS:
                self._write(coll.id, pending, report)
                pending = []
            bar.set_postfix(chunks=report.chunks)
        self._write(coll.id, pending, report)
        bar.close()
        folders = [str(p.resolve()) + os.sep for p in paths if p.is_dir()]
        gone = [s for s in known if s not in seen and any(s.startswith(f) for f in folders)]
        if gone:
            with session_scope(self.db) as session:
                for source in gone:
                    store.delete_document(session, coll.id, source)
            report.deleted.extend(gone)
        report.seconds = time.perf_counter() - start
        return report

    def _write(self, collection_id: str, pending: list[_Pending], report: IngestReport) -> None:
        if not pending:
            return
        texts = [c.embed_text for p in pending for c in p.chunks]
        vectors = self.encoder.embed(texts).numpy()
        at = 0
        for p in pending:
            with session_scope(self.db) as session:
                store.put_document(
                    session, collection_id, p.source, p.filename, p.content_hash, p.size, p.chunks,
                    vectors[at : at + len(p.chunks)],
                )  # fmt: skip
            at += len(p.chunks)
            (report.updated if p.is_update else report.added).append(p.source)
            report.chunks += len(p.chunks)

    def ingest_data(self, collection_id: str, source: str, filename: str, data: bytes) -> tuple[str, str | None]:
        """Ingest one file's bytes (an upload) under `source`; returns ("completed", None) or ("failed", reason).
        The document row says the same, so a background ingestion is polled by reading it."""
        try:
            chunks = chunk_document(read(Path(filename), data), self.encoder.tokenizer, self.chunking)
        except UnreadableFileError as exc:
            with session_scope(self.db) as session:
                store.mark_document(session, collection_id, source, filename, "failed", str(exc))
            return "failed", str(exc)
        vectors = self.encoder.embed([c.embed_text for c in chunks]).numpy()
        with session_scope(self.db) as session:
            digest = hashlib.sha256(data).hexdigest()
            store.put_document(session, collection_id, source, filename, digest, len(data), chunks, vectors)
        return "completed", None

    def remove(self, paths: Iterable[str | Path], collection: str) -> list[str]:
        """Remove files (or every file under a folder) from a collection; returns the sources removed."""
        with session_scope(self.db) as session:
            coll = self._collection(session, collection)
            sources = [d.source for d in store.list_documents(session, coll.id)]
            removed = []
            for raw in paths:
                target = str(Path(raw).expanduser().resolve())
                for source in sources:
                    if (source == target or source.startswith(target + os.sep)) and source not in removed:
                        store.delete_document(session, coll.id, source)
                        removed.append(source)
        return removed

    # ---------------------------------------------------------------------------------------------- search
    def search(
        self, query: str, collection: str, k: int = 5, mode: str = "hybrid", rrf_k: int = RRF_K,
        reranker: QueryLikelihood | None = None, rerank_depth: int = RERANK_DEPTH,
    ) -> list[Hit]:  # fmt: skip
        """The k chunks that best answer `query`: by keyword (BM25), by meaning (dense), or both fused (RRF);
        with a `reranker`, the first `rerank_depth` of that list re-ordered by it (`rerank.rerank`)."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        final_k, k = k, max(k, rerank_depth) if reranker is not None else k
        with session_scope(self.db) as session:
            coll = self._collection(session, collection)
            lists: dict[str, list[tuple[int, float]]] = {}
            depth = max(k, CANDIDATES) if mode == "hybrid" else k
            if mode in ("hybrid", "keyword"):
                lists["keyword"] = store.keyword_search(session, coll.id, query, depth)
            if mode in ("hybrid", "dense"):
                vector = self.encoder.embed([query])[0].numpy()
                if self._uses_pgvector(session, coll):
                    labels, scores = pgvector.search(session, coll.id, coll.dim, vector, depth)
                else:
                    labels, scores = self._dense_index(session, coll).search(vector, depth)
                lists["dense"] = list(zip(labels.tolist(), scores.tolist(), strict=True))
            hits = rrf(lists, rrf_k, k) if mode == "hybrid" else single(mode, lists[mode], k)
            records = store.get_chunks(session, [h.chunk_id for h in hits])
        for hit in hits:
            r = records[hit.chunk_id]
            hit.text, hit.heading, hit.source, hit.filename, hit.document_id = (
                r.text, r.heading, r.source, r.filename, r.document_id,
            )  # fmt: skip
            hit.start_char, hit.end_char, hit.page = r.start_char, r.end_char, r.page
        if reranker is not None:
            return rerank(query, hits, reranker, final_k, rerank_depth, rrf_k)
        return hits

    def resolve(self, names: Sequence[str]) -> dict[str, str]:
        """{name as given: collection id} for collection names or ids (a vector store's id is its collection's).

        Raises:
            CollectionError: naming every one that does not exist, on one line.
        """
        with session_scope(self.db) as session:
            found = {n: c.id for n in names if (c := store.get_collection(session, n) or
                                                 store.get_collection_by_id(session, n)) is not None}  # fmt: skip
        missing = [n for n in names if n not in found]
        if missing:
            listed = ", ".join(repr(n) for n in missing)
            raise store.CollectionError(f"no collection named {listed} (create one with `mini-claude ingest` "
                                        "or POST /v1/vector_stores)")  # fmt: skip
        return found

    def all_chunks(self, collection: str, limit: int = FULL_CONTEXT_CHUNKS) -> list[Hit]:
        """A collection's chunks in document order (by source, then position): what `full_context` reads."""
        with session_scope(self.db) as session:
            coll = self._collection(session, collection)
            records = store.get_chunks(session, store.chunk_ids(session, coll.id).tolist())
        ordered = sorted(records.values(), key=lambda r: (r.source, r.seq))[:limit]
        return [
            Hit(r.id, 0.0, r.text, r.heading, r.source, r.filename, r.document_id, r.start_char, r.end_char, r.page)
            for r in ordered
        ]

    def _collection(self, session: Session, name: str) -> KnowledgeCollection:
        coll = store.get_collection(session, name) or store.get_collection_by_id(session, name)
        if coll is None:
            raise store.CollectionError(f"no collection named {name!r}; create it with `mini-claude ingest`")
        return coll

    def _uses_pgvector(self, session: Session, coll: KnowledgeCollection) -> bool:
        """Whether this search runs in PostgreSQL's pgvector index (bringing it in step first if it does)."""
        if self.dense not in ("auto", "pgvector"):
            return False
        with self._lock:
            if self._pgvector is None:
                self._pgvector = pgvector.available(session)
            if not self._pgvector:
                if self.dense == "pgvector":
                    raise ValueError("dense='pgvector' needs PostgreSQL with the vector extension")
                return False
            if self._pg_synced.get(coll.id) != coll.updated_at:
                pgvector.sync(session, coll.id, coll.dim)
                self._pg_synced[coll.id] = coll.updated_at
        return True

    def _dense_index(self, session: Session, coll: KnowledgeCollection) -> ExactIndex | HNSWIndex:
        """The collection's dense index, brought in step with the database if the collection changed."""
        with self._lock:
            version = coll.updated_at
            cached = self._indexes.get(coll.id)
            if cached is not None and cached[0] == version:
                return cached[1]
            ids = store.chunk_ids(session, coll.id)
            index = cached[1] if cached is not None else None
            kind = self.dense
            if kind not in ("exact", "hnsw"):  # "auto" (or "pgvector" where the database lacks it: never reached)
                kind = "hnsw" if len(ids) >= HNSW_MIN_VECTORS else "exact"
            path = self.index_dir / f"{coll.id}.hnsw.npz" if self.index_dir is not None else None
            if kind == "hnsw" and not isinstance(index, HNSWIndex):
                loadable = path is not None and path.exists()
                index = HNSWIndex.load(path) if loadable else HNSWIndex(coll.dim)  # type: ignore[arg-type]
            elif kind == "exact" and not isinstance(index, ExactIndex):
                index = ExactIndex(coll.dim)
            assert index is not None
            have = index.labels_alive() if isinstance(index, HNSWIndex) else index.labels
            index.remove(np.setdiff1d(have, ids))
            missing = np.setdiff1d(ids, have)
            if len(missing):
                new_ids, vectors = store.load_vectors(session, coll.id, missing)
                index.add(new_ids, vectors)
            if isinstance(index, HNSWIndex) and path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                index.save(path)
            self._indexes[coll.id] = (version, index)
            return index
