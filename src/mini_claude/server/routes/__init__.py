"""HTTP and WebSocket routes, one module per API area; each handler translates between FastAPI and the service.

Design choices:
- Every area's router is made by `common.api_router()`, which carries the API-key dependency, so a route
  cannot be added without deciding whether it is protected; `/health` alone is public (`system.public`).
- Streaming bodies are `EventStream`s from the service, sent by `SSEResponse`, which closes the stream
  whatever happens: a client that disconnects mid-stream cancels its sequences in the scheduler.
- A non-streaming request runs while a watcher waits for the client's `http.disconnect`; if the client
  leaves first, the work is cancelled the same way (and 499, nginx's "client closed request", is logged).
- A new area adds its module here and its router to `ROUTERS`.
"""

from __future__ import annotations

from fastapi import APIRouter

from mini_claude.server.routes import (
    agents,
    audio,
    chat,
    conversations,
    fine_tunes,
    models,
    predict,
    system,
    vector_stores,
)

ROUTERS: list[APIRouter] = [system.public, system.router, chat.router, models.router, conversations.router,
                            fine_tunes.router, audio.router, vector_stores.router, predict.router,
                            agents.router]  # fmt: skip
