"""The OpenAI-compatible HTTP server.

`protocol` is the wire format (pydantic models); `service` composes the serving logic, one module per area
(`models`, `conversations`, `generation`, `chat`, `completions`, `chat_socket`, `fine_tunes`), none of which
imports FastAPI; `routes/` holds the thin handlers, one module per area; `app` builds it all
(`create_app(settings, engine=None)`); `metrics` is Prometheus. `mini-claude serve` runs it with uvicorn.
"""

from mini_claude.server.app import create_app

__all__ = ["create_app"]
