"""HTTP and WebSocket routes: each handler translates between FastAPI and `ChatService`, in a few lines.

Design choices:
- Two routers: `public` (only /health) and `api` (everything else), which carries the API-key dependency,
  so a route cannot be added without deciding whether it is protected.
- Streaming bodies are `EventStream`s from the service, sent by `SSEResponse`, which closes the stream
  whatever happens: a client that disconnects mid-stream cancels its sequences in the scheduler.
- A non-streaming request runs while a watcher waits for the client's `http.disconnect`; if the client
  leaves first, the work is cancelled the same way (and 499, nginx's "client closed request", is logged).
- The WebSocket protocol lives in `serving.ChatSocket`; the route only moves frames.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Query, Request, Response, WebSocket
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.requests import HTTPConnection
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocketDisconnect

from mini_claude.server.fine_tunes import FineTuneService
from mini_claude.server.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ConversationDeleted,
    ConversationDetail,
    ConversationList,
    ErrorResponse,
    FineTuneJob,
    FineTuneJobList,
    FineTuneRequest,
    HealthResponse,
    ModelCard,
    ModelDetails,
    ModelList,
)
from mini_claude.server.serving import MAX_OFFSET, APIError, ChatService, ChatSocket, EventStream

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

public = APIRouter()
api = APIRouter(dependencies=[Depends(require_api_key)], responses=ERRORS)


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


# ----------------------------------------------------------------------------------------------- routes


@public.get("/health", response_model=HealthResponse, responses={503: {"model": HealthResponse}})
def health(service: ServiceDep) -> JSONResponse:
    report = service.health()
    return JSONResponse(report.model_dump(), status_code=200 if report.status == "healthy" else 503)


@api.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=SSE_DOC)
@api.post("/chat/completions", response_model=ChatCompletionResponse, responses=SSE_DOC, include_in_schema=False)
async def chat_completions(body: ChatCompletionRequest, request: Request, service: ServiceDep) -> Response:
    """OpenAI's chat completions, plus `conversation_id` (server-side memory) and sampling extensions."""
    work = service.chat_completion(body, request.headers.get("idempotency-key"))
    return respond(await unless_disconnected(request, work))


@api.post("/v1/completions", response_model=CompletionResponse, responses=SSE_DOC)
@api.post("/completions", response_model=CompletionResponse, responses=SSE_DOC, include_in_schema=False)
async def completions(body: CompletionRequest, request: Request, service: ServiceDep) -> Response:
    """OpenAI's (legacy) text completions: continue a prompt as is, without the chat template."""
    return respond(await unless_disconnected(request, service.completion(body)))


@api.get("/v1/models", response_model=ModelList)
def list_models(service: ServiceDep) -> ModelList:
    return service.models()


@api.get("/v1/models/{model_id}", response_model=ModelCard)
def get_model(model_id: str, service: ServiceDep) -> ModelCard:
    return service.model(model_id)


@api.get("/models", response_model=ModelDetails)
def model_details(service: ServiceDep) -> ModelDetails:
    return service.model_details()


@api.get("/v1/conversations", response_model=ConversationList)
def list_conversations(
    service: ServiceDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> ConversationList:
    return service.conversation_page(limit, offset)


@api.get("/v1/conversations/{conversation_id}", response_model=ConversationDetail)
def get_conversation(conversation_id: str, service: ServiceDep) -> ConversationDetail:
    return service.conversation(conversation_id)


@api.delete("/v1/conversations/{conversation_id}", response_model=ConversationDeleted)
def delete_conversation(conversation_id: str, service: ServiceDep) -> ConversationDeleted:
    return service.remove_conversation(conversation_id)


@api.post("/v1/fine-tunes", response_model=FineTuneJob)
async def create_fine_tune(body: FineTuneRequest, fine_tunes: FineTunesDep) -> FineTuneJob:
    """Start a LoRA fine-tune of the served model in the background; poll the job for progress. When it has
    succeeded, its `fine_tuned_model` is served (chat with it by that `model` id) without a restart."""
    return await fine_tunes.create(body)


@api.get("/v1/fine-tunes", response_model=FineTuneJobList)
async def list_fine_tunes(
    fine_tunes: FineTunesDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> FineTuneJobList:
    return await fine_tunes.list(limit, offset)


@api.get("/v1/fine-tunes/{job_id}", response_model=FineTuneJob)
async def get_fine_tune(job_id: str, fine_tunes: FineTunesDep) -> FineTuneJob:
    return await fine_tunes.get(job_id)


@api.post("/v1/fine-tunes/{job_id}/cancel", response_model=FineTuneJob, responses={409: {"model": ErrorResponse}})
async def cancel_fine_tune(job_id: str, fine_tunes: FineTunesDep) -> FineTuneJob:
    return await fine_tunes.cancel(job_id)


@api.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
def metrics(service: ServiceDep) -> Response:
    body, content_type = service.metrics.render()
    return Response(body, media_type=content_type)


@api.websocket("/chat/stream")
@api.websocket("/ws")
async def chat_socket(websocket: WebSocket, service: ServiceDep) -> None:
    await websocket.accept()
    session = ChatSocket(service, websocket.send_json)
    try:
        while (frame := await websocket.receive())["type"] != "websocket.disconnect":
            await session.on_message(frame.get("text") or frame.get("bytes"))
    except WebSocketDisconnect:
        pass
    finally:
        await session.close()
