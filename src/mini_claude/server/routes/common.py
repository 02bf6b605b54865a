"""What every area's routes share: the service dependency, API-key checks, SSE and disconnect handling."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.requests import HTTPConnection
from starlette.types import Receive, Scope, Send

from mini_claude.server.errors import APIError
from mini_claude.server.fine_tunes import FineTuneService
from mini_claude.server.generation import EventStream
from mini_claude.server.protocol import ErrorResponse
from mini_claude.server.service import ChatService

T = TypeVar("T")
CLIENT_CLOSED = 499


def get_service(conn: HTTPConnection) -> ChatService:
    return conn.app.state.service


ServiceDep = Annotated[ChatService, Depends(get_service)]


def get_fine_tunes(conn: HTTPConnection) -> FineTuneService:
    return conn.app.state.fine_tunes


FineTunesDep = Annotated[FineTuneService, Depends(get_fine_tunes)]


def require_api_key(conn: HTTPConnection, service: ServiceDep) -> None:
    """`Authorization: Bearer <key>` when keys are configured (a WebSocket may pass `?api_key=` instead)."""
    scheme, _, token = conn.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" and conn.scope["type"] == "websocket":  # browsers cannot set WS headers
        token = conn.query_params.get("api_key", "")
    elif scheme.lower() != "bearer":
        token = ""
    if not service.authorized(token.strip()):
        raise APIError(401, "Invalid or missing API key: send 'Authorization: Bearer <key>'.", code="invalid_api_key")


ERRORS: dict[int | str, dict[str, Any]] = {s: {"model": ErrorResponse} for s in (400, 401, 404, 503)}
SSE_DOC: dict[int | str, dict[str, Any]] = {200: {"content": {"text/event-stream": {}}}, **ERRORS}


def api_router() -> APIRouter:
    """A router whose every route needs an API key (when keys are configured) and documents the error shape."""
    return APIRouter(dependencies=[Depends(require_api_key)], responses=ERRORS)


class SSEResponse(StreamingResponse):
    """Sends an `EventStream` and closes it at the end, on disconnect, or on error."""

    def __init__(self, stream: EventStream) -> None:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        if stream.conversation_id:
            headers["X-Conversation-Id"] = stream.conversation_id
        super().__init__(stream.events, media_type="text/event-stream", headers=headers)
        self.stream = stream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.stream.aclose()


def respond(result: Any) -> Response:
    """A service result as a response: SSE for streams, JSON (with `X-Conversation-Id` when stored) otherwise."""
    if isinstance(result, Response):  # the client left first (`unless_disconnected`'s 499)
        return result
    if isinstance(result, EventStream):
        return SSEResponse(result)
    conversation_id = getattr(result, "conversation_id", None)
    headers = {"X-Conversation-Id": conversation_id} if conversation_id else None
    return JSONResponse(result.model_dump(mode="json"), headers=headers)


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T | Response:
    """Run `work`, but cancel it if the client disconnects first (then the response goes nowhere)."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        return Response(status_code=CLIENT_CLOSED)
    return task.result()
