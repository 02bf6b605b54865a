"""`/v1/files` and `/v1/vector_stores`: OpenAI's shapes, so the official client works unchanged; the logic is in
`server/files.py` and `server/vector_stores.py`. The `OpenAI-Beta` header the client sends is ignored."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import Depends, File, Form, Query, UploadFile
from fastapi.responses import JSONResponse, Response
from starlette.requests import HTTPConnection

from mini_claude.server.files import FileService
from mini_claude.server.routes.common import api_router
from mini_claude.server.vector_stores import (
    VectorStoreCreate,
    VectorStoreFileCreate,
    VectorStoreSearch,
    VectorStoreService,
)

router = api_router()
POLL_HEADERS = {"openai-poll-after-ms": "100"}  # how soon upload_and_poll asks again


def get_files(conn: HTTPConnection) -> FileService:
    return conn.app.state.files


def get_vector_stores(conn: HTTPConnection) -> VectorStoreService:
    return conn.app.state.vector_stores


FilesDep = Annotated[FileService, Depends(get_files)]
StoresDep = Annotated[VectorStoreService, Depends(get_vector_stores)]
Limit = Annotated[int, Query(ge=1, le=10_000)]
Order = Literal["asc", "desc"]


@router.post("/v1/files")
async def create_file(files: FilesDep, file: Annotated[UploadFile, File()], purpose: Annotated[str, Form()]) -> Any:
    return await files.create(file.filename or "upload", await file.read(), purpose)


@router.get("/v1/files")
async def list_files(
    files: FilesDep, after: str | None = None, limit: Limit = 10_000, order: Order = "desc", purpose: str | None = None
) -> Any:
    return await files.list(after, limit, order, purpose)


@router.get("/v1/files/{file_id}")
async def get_file(file_id: str, files: FilesDep) -> Any:
    return await files.get(file_id)


@router.get("/v1/files/{file_id}/content")
async def file_content(file_id: str, files: FilesDep) -> Response:
    data, _ = await files.content(file_id)
    return Response(data, media_type="application/octet-stream")


@router.delete("/v1/files/{file_id}")
async def delete_file(file_id: str, files: FilesDep) -> Any:
    return await files.delete(file_id)


@router.post("/v1/vector_stores")
async def create_vector_store(body: VectorStoreCreate, stores: StoresDep) -> Any:
    return await stores.create(body)


@router.get("/v1/vector_stores")
async def list_vector_stores(
    stores: StoresDep, after: str | None = None, limit: Limit = 20, order: Order = "desc"
) -> Any:
    return await stores.list(after, limit, order)


@router.get("/v1/vector_stores/{vs_id}")
async def get_vector_store(vs_id: str, stores: StoresDep) -> Any:
    return await stores.get(vs_id)


@router.delete("/v1/vector_stores/{vs_id}")
async def delete_vector_store(vs_id: str, stores: StoresDep) -> Any:
    return await stores.delete(vs_id)


@router.post("/v1/vector_stores/{vs_id}/files")
async def attach_file(vs_id: str, body: VectorStoreFileCreate, stores: StoresDep) -> Response:
    return JSONResponse(await stores.attach(vs_id, body), headers=POLL_HEADERS)


@router.get("/v1/vector_stores/{vs_id}/files")
async def list_vector_store_files(
    vs_id: str, stores: StoresDep, after: str | None = None, limit: Limit = 20, order: Order = "desc",
    filter: str | None = None,
) -> Any:  # fmt: skip
    return await stores.list_files(vs_id, after, limit, order, filter)


@router.get("/v1/vector_stores/{vs_id}/files/{file_id}")
async def get_vector_store_file(vs_id: str, file_id: str, stores: StoresDep) -> Response:
    return JSONResponse(await stores.get_file(vs_id, file_id), headers=POLL_HEADERS)


@router.delete("/v1/vector_stores/{vs_id}/files/{file_id}")
async def delete_vector_store_file(vs_id: str, file_id: str, stores: StoresDep) -> Any:
    return await stores.delete_file(vs_id, file_id)


@router.post("/v1/vector_stores/{vs_id}/search")
async def search_vector_store(vs_id: str, body: VectorStoreSearch, stores: StoresDep) -> Any:
    return await stores.search(vs_id, body)
