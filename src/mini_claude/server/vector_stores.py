"""`/v1/vector_stores`: OpenAI's vector stores over `rag.Knowledge` (no FastAPI here; the routes are thin).

A vector store is a knowledge collection (its id starts `vs_`; collections made by `mini-claude ingest` are
listed too, under their own ids), and a vector-store file is an uploaded file ingested into it (the document's
source is the file id). Attaching a file answers at once with `in_progress`; a worker thread reads, chunks,
embeds and stores it, then the document says `completed`, or `failed` with the reason in `last_error`, which
is what the client's `upload_and_poll` polls for. Search results carry OpenAI's fields (file_id, filename,
score, content) and ours: chunk id, character span, page, heading.
"""

from __future__ import annotations

import logging
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pydantic import BaseModel, Field

from mini_claude.db import session_scope
from mini_claude.db.models import KnowledgeCollection, KnowledgeDocument, utcnow
from mini_claude.rag import store
from mini_claude.rag.knowledge import Knowledge
from mini_claude.server.errors import APIError, invalid
from mini_claude.server.files import FileService, page
from mini_claude.server.service import ChatService

log = logging.getLogger(__name__)
STATUSES = ("in_progress", "completed", "failed", "cancelled")


class VectorStoreCreate(BaseModel):
    name: str | None = None
    file_ids: list[str] = Field(default_factory=list)
    metadata: dict[str, str] | None = None
    model_config = {"extra": "allow"}  # chunking_strategy, expires_after, description: accepted, not used


class VectorStoreFileCreate(BaseModel):
    file_id: str
    attributes: dict[str, str | float | bool] | None = None
    model_config = {"extra": "allow"}


class RankingOptions(BaseModel):
    ranker: str | None = None  # OpenAI's names ("auto", "none", ...): accepted; `rerank` picks ours
    score_threshold: float | None = Field(None, ge=0.0)


class VectorStoreSearch(BaseModel):
    query: str | list[str]
    max_num_results: int = Field(10, ge=1, le=50)
    ranking_options: RankingOptions | None = None
    rerank: bool = Field(False, description="Extension: the chat model re-orders the best 20 (rag/rerank.py).")
    model_config = {"extra": "allow"}  # filters, rewrite_query: accepted, not used


def _ts(value: Any) -> int:
    return int(value.timestamp())


def _not_found(vs_id: str) -> APIError:
    return APIError(404, f"No vector store found with id '{vs_id}'.", param="vector_store_id", code="not_found")


class VectorStoreService:
    def __init__(self, chat: ChatService, files: FileService) -> None:
        self.chat, self.files = chat, files
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vector-store-ingest")

    def stop(self) -> None:
        self.worker.shutdown(wait=False, cancel_futures=True)

    @property
    def knowledge(self) -> Knowledge:
        """The server's one `Knowledge` (grounded chat searches the same), so the embedder loads once."""
        self.files._db()  # a 503 while the server starts
        return self.chat.rag.knowledge

    # --------------------------------------------------------------------------------------------- stores
    def _store_object(self, session: Any, c: KnowledgeCollection) -> dict[str, Any]:
        docs = store.list_documents(session, c.id)
        counts = {s: sum(1 for d in docs if d.status == s) for s in STATUSES}
        return {
            "id": c.id, "object": "vector_store", "created_at": _ts(c.created_at), "name": c.meta.get("name", c.name),
            "usage_bytes": sum(d.size_bytes for d in docs), "status": "in_progress" if counts["in_progress"] else
            "completed", "file_counts": {**counts, "total": len(docs)}, "last_active_at": _ts(c.updated_at),
            "metadata": c.meta.get("metadata", {}), "expires_after": None, "expires_at": None,
        }  # fmt: skip

    def _get(self, session: Any, vs_id: str) -> KnowledgeCollection:
        c = store.get_collection_by_id(session, vs_id)
        if c is None:
            raise _not_found(vs_id)
        return c

    async def create(self, req: VectorStoreCreate) -> dict[str, Any]:
        encoder = await self.chat.db_call(lambda: self.knowledge.encoder)

        def make() -> str:
            with session_scope(self.files._db()) as session:
                vs_id = f"vs_{uuid.uuid4().hex}"
                meta = {"name": req.name or "", "metadata": dict(req.metadata or {})}
                now = utcnow()
                session.add(KnowledgeCollection(id=vs_id, name=vs_id, embedder=encoder.name, dim=encoder.dim,
                                                meta=meta, created_at=now, updated_at=now))  # fmt: skip
            return vs_id

        vs_id = await self.chat.db_call(make)
        for file_id in req.file_ids:
            await self.attach(vs_id, VectorStoreFileCreate(file_id=file_id))
        return await self.get(vs_id)

    async def get(self, vs_id: str) -> dict[str, Any]:
        def load() -> dict[str, Any]:
            with session_scope(self.files._db()) as session:
                return self._store_object(session, self._get(session, vs_id))

        return await self.chat.db_call(load)

    async def list(self, after: str | None, limit: int, order: str) -> dict[str, Any]:
        def load() -> list[dict[str, Any]]:
            with session_scope(self.files._db()) as session:
                items = [self._store_object(session, c) for c in store.list_collections(session)]
            items.sort(key=lambda s: (s["created_at"], s["id"]), reverse=order == "desc")
            return items

        return page(await self.chat.db_call(load), after, limit)

    async def delete(self, vs_id: str) -> dict[str, Any]:
        def remove() -> None:
            with session_scope(self.files._db()) as session:
                store.delete_collection(session, self._get(session, vs_id).id)

        await self.chat.db_call(remove)
        return {"id": vs_id, "object": "vector_store.deleted", "deleted": True}

    # ---------------------------------------------------------------------------------------------- files
    def _file_object(self, d: KnowledgeDocument) -> dict[str, Any]:
        error = {"code": "invalid_file", "message": d.error} if d.status == "failed" else None
        return {
            "id": d.source, "object": "vector_store.file", "created_at": _ts(d.created_at),
            "vector_store_id": d.collection_id, "status": d.status, "usage_bytes": d.size_bytes,
            "last_error": error, "attributes": d.meta.get("attributes", {}),
            "chunking_strategy": {"type": "static", "static": {"max_chunk_size_tokens": 256,
                                                               "chunk_overlap_tokens": 32}},
            "n_chunks": d.n_chunks,
        }  # fmt: skip

    async def attach(self, vs_id: str, req: VectorStoreFileCreate) -> dict[str, Any]:
        row = await self.chat.db_call(self.files.get_row, req.file_id)

        def mark() -> dict[str, Any]:
            with session_scope(self.files._db()) as session:
                self._get(session, vs_id)
                doc = store.mark_document(session, vs_id, row.id, row.filename, "in_progress")
                doc.size_bytes = row.size_bytes
                # Other keys (the embedding recipe the chunks were made with) belong to ingestion: kept.
                doc.meta = {**(doc.meta or {}), "attributes": dict(req.attributes or {})}
                session.flush()
                return self._file_object(doc)

        result = await self.chat.db_call(mark)
        self.worker.submit(self._ingest, vs_id, row.id, row.filename, row.data)
        return result

    def _ingest(self, vs_id: str, file_id: str, filename: str, data: bytes) -> None:
        try:
            status, reason = self.knowledge.ingest_data(vs_id, file_id, filename, data)
        except Exception as exc:  # the worker must record every outcome, or the file polls forever
            log.exception("ingesting %s into %s failed", file_id, vs_id)
            with session_scope(self.files._db()) as session:
                store.mark_document(session, vs_id, file_id, filename, "failed", f"server error: {exc}")
            return
        if status == "failed":
            log.info("vector store %s: %s failed: %s", vs_id, filename, reason)

    async def get_file(self, vs_id: str, file_id: str) -> dict[str, Any]:
        def load() -> dict[str, Any]:
            with session_scope(self.files._db()) as session:
                self._get(session, vs_id)
                doc = store.get_document(session, vs_id, file_id)
                if doc is None:
                    raise APIError(404, f"No file '{file_id}' in vector store '{vs_id}'.", param="file_id",
                                   code="not_found")  # fmt: skip
                return self._file_object(doc)

        return await self.chat.db_call(load)

    async def list_files(
        self, vs_id: str, after: str | None, limit: int, order: str, status: str | None
    ) -> dict[str, Any]:
        if status is not None and status not in STATUSES:
            raise invalid(f"filter must be one of {', '.join(STATUSES)}", "filter")

        def load() -> list[dict[str, Any]]:
            with session_scope(self.files._db()) as session:
                self._get(session, vs_id)
                docs = [d for d in store.list_documents(session, vs_id) if status is None or d.status == status]
                items = [self._file_object(d) for d in docs]
            items.sort(key=lambda f: (f["created_at"], f["id"]), reverse=order == "desc")
            return items

        return page(await self.chat.db_call(load), after, limit)

    async def delete_file(self, vs_id: str, file_id: str) -> dict[str, Any]:
        def remove() -> bool:
            with session_scope(self.files._db()) as session:
                self._get(session, vs_id)
                return store.delete_document(session, vs_id, file_id)

        if not await self.chat.db_call(remove):
            raise APIError(404, f"No file '{file_id}' in vector store '{vs_id}'.", param="file_id", code="not_found")
        return {"id": file_id, "object": "vector_store.file.deleted", "deleted": True}

    # --------------------------------------------------------------------------------------------- search
    async def search(self, vs_id: str, req: VectorStoreSearch) -> dict[str, Any]:
        await self.get(vs_id)
        query = req.query if isinstance(req.query, str) else " ".join(req.query)
        if not query.strip():
            raise invalid("query must not be empty", "query")
        reranker = self.chat.rag.reranker() if req.rerank else None
        hits = await self.chat.db_call(
            lambda: self.knowledge.search(query, vs_id, req.max_num_results, "hybrid", reranker=reranker)
        )
        threshold = req.ranking_options.score_threshold if req.ranking_options else None
        if threshold is not None:
            hits = [h for h in hits if h.score >= threshold]
        data = [
            {
                "file_id": h.source,
                "filename": h.filename,
                "score": h.score,
                "attributes": {},
                "content": [{"type": "text", "text": h.text}],
                "chunk_id": h.chunk_id,
                "start_char": h.start_char,
                "end_char": h.end_char,
                "page": h.page,
                "heading": h.heading,
                "ranks": h.ranks,
            }
            for h in hits
        ]
        return {"object": "vector_store.search_results.page", "search_query": [query], "data": data,
                "has_more": False, "next_page": None}  # fmt: skip
