"""Chat and text completions (OpenAI's routes, also without the /v1 prefix) and the WebSocket chat."""

from __future__ import annotations

from fastapi import Request, Response, WebSocket
from starlette.websockets import WebSocketDisconnect

from mini_claude.server.chat_socket import ChatSocket
from mini_claude.server.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
)
from mini_claude.server.routes.common import SSE_DOC, ServiceDep, api_router, respond, unless_disconnected

router = api_router()


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=SSE_DOC)
@router.post("/chat/completions", response_model=ChatCompletionResponse, responses=SSE_DOC, include_in_schema=False)
async def chat_completions(body: ChatCompletionRequest, request: Request, service: ServiceDep) -> Response:
    """OpenAI's chat completions, plus `conversation_id` (server-side memory) and sampling extensions."""
    work = service.chat.create(body, request.headers.get("idempotency-key"))
    return respond(await unless_disconnected(request, work))


@router.post("/v1/completions", response_model=CompletionResponse, responses=SSE_DOC)
@router.post("/completions", response_model=CompletionResponse, responses=SSE_DOC, include_in_schema=False)
async def completions(body: CompletionRequest, request: Request, service: ServiceDep) -> Response:
    """OpenAI's (legacy) text completions: continue a prompt as is, without the chat template."""
    return respond(await unless_disconnected(request, service.completions.create(body)))


@router.websocket("/chat/stream")
@router.websocket("/ws")
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
