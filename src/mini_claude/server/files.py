"""`/v1/files`: OpenAI's Files API over the project database (no FastAPI here; the routes are thin).

Uploads are stored whole (`uploaded_files`), so a vector store can ingest them later and `/content` returns
them. Lists are OpenAI's cursor pages: newest first by default, `after=<id>` continues after that id, and
`has_more` tells the official client whether to ask again (it keeps asking until it is false).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import select

from mini_claude.db import session_scope
from mini_claude.db.models import UploadedFile, utcnow
from mini_claude.server.errors import APIError, invalid
from mini_claude.server.service import ChatService

PURPOSES = ("assistants", "batch", "fine-tune", "vision", "user_data", "evals")
MAX_FILE_BYTES = 64 * 1024 * 1024


def page(items: Sequence[dict[str, Any]], after: str | None, limit: int, key: str = "id") -> dict[str, Any]:
    """One cursor page of already ordered items: those after the item whose id is `after`, at most `limit`."""
    start = 0
    if after is not None:
        ids = [item[key] for item in items]
        if after not in ids:
            raise invalid(f"No item with id '{after}' to list after.", "after")
        start = ids.index(after) + 1
    data = list(items[start : start + limit])
    return {
        "object": "list", "data": data, "has_more": start + limit < len(items),
        "first_id": data[0][key] if data else None, "last_id": data[-1][key] if data else None,
    }  # fmt: skip


def file_object(f: UploadedFile) -> dict[str, Any]:
    return {"id": f.id, "object": "file", "bytes": f.size_bytes, "created_at": int(f.created_at.timestamp()),
            "filename": f.filename, "purpose": f.purpose, "status": "processed", "expires_at": None,
            "status_details": None}  # fmt: skip


def _not_found(file_id: str) -> APIError:
    return APIError(404, f"No such File object: {file_id}", param="id", code="file_not_found")


class FileService:
    def __init__(self, chat: ChatService) -> None:
        self.chat = chat

    def _db(self):  # type: ignore[no-untyped-def]
        if self.chat.db is None:
            raise APIError(503, "The server is starting.", "server_error", code="not_ready")
        return self.chat.db

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await self.chat.db_call(fn, *args)

    async def create(self, filename: str, data: bytes, purpose: str) -> dict[str, Any]:
        if purpose not in PURPOSES:
            raise invalid(f"purpose must be one of {', '.join(PURPOSES)}", "purpose")
        if len(data) > MAX_FILE_BYTES:
            raise invalid(f"The file is larger than {MAX_FILE_BYTES // 2**20} MiB.", "file")

        def store() -> dict[str, Any]:
            with session_scope(self._db()) as session:
                row = UploadedFile(id=f"file-{uuid.uuid4().hex}", filename=filename or "upload", purpose=purpose,
                                   size_bytes=len(data), data=data, created_at=utcnow())  # fmt: skip
                session.add(row)
                session.flush()
                return file_object(row)

        return await self._run(store)

    async def list(self, after: str | None, limit: int, order: str, purpose: str | None) -> dict[str, Any]:
        def load() -> list[dict[str, Any]]:
            with session_scope(self._db()) as session:
                query = select(UploadedFile).order_by(UploadedFile.created_at, UploadedFile.id)
                if purpose:
                    query = query.where(UploadedFile.purpose == purpose)
                rows = [file_object(f) for f in session.scalars(query)]
            return rows[::-1] if order == "desc" else rows

        return page(await self._run(load), after, limit)

    def get_row(self, file_id: str) -> UploadedFile:
        with session_scope(self._db()) as session:
            row = session.get(UploadedFile, file_id)
            if row is None:
                raise _not_found(file_id)
            return row

    async def get(self, file_id: str) -> dict[str, Any]:
        return file_object(await self._run(self.get_row, file_id))

    async def content(self, file_id: str) -> tuple[bytes, str]:
        row = await self._run(self.get_row, file_id)
        return row.data, row.filename

    async def delete(self, file_id: str) -> dict[str, Any]:
        def remove() -> None:
            with session_scope(self._db()) as session:
                row = session.get(UploadedFile, file_id)
                if row is None:
                    raise _not_found(file_id)
                session.delete(row)

        await self._run(remove)
        return {"id": file_id, "object": "file", "deleted": True}
