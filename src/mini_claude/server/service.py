"""The server's service layer: the shared state (engine, scheduler, database, metrics) and one object per area.

No FastAPI here (STYLE.md, point 8): the routes, the WebSocket and the web UI call these objects with
validated protocol models (or plain arguments, for the UI) and get protocol models or event streams back.

Design choices:
- `ChatService` is the composition root. It is created with the app (so the web UI can be mounted at once)
  and started by the app's lifespan, which loads the model; until then every area answers with a 503.
- One module per API area, each readable on its own: `models.py` (what a request's `model` may name),
  `conversations.py` (the conversation store), `generation.py` (the one path from a prepared job through the
  scheduler to text chunks, with metrics and storing the reply), `chat.py` (chat completions and the UI's
  chat turn), `remote.py` (chat with upstream models, `UPSTREAM/MODEL`), `agents.py` (agent profiles, and
  the `knowledge` hook), `grounding.py` (grounded chat and the knowledge tool over `rag`), `completions.py`
  (text completions), `socket.py` (the WebSocket protocol), `fine_tunes.py`.
  Areas hold a reference to this object and read the engine, scheduler and database from it at call time.
- Database calls run in worker threads (SQLAlchemy is synchronous) through `db_call`, which turns a
  database failure into a 503 in OpenAI's shape.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import anyio
from sqlalchemy import Engine as Database
from sqlalchemy.exc import SQLAlchemyError

from mini_claude.db import ping
from mini_claude.engine import Engine
from mini_claude.scheduler import Scheduler
from mini_claude.server.agents import AgentService, KnowledgeHook
from mini_claude.server.audio import AudioService
from mini_claude.server.chat import ChatCompletions, ReplyEvent
from mini_claude.server.completions import TextCompletions
from mini_claude.server.conversations import ConversationStore
from mini_claude.server.errors import APIError
from mini_claude.server.generation import Generation
from mini_claude.server.grounding import RagKnowledge
from mini_claude.server.metrics import Metrics
from mini_claude.server.models import ModelRegistry
from mini_claude.server.protocol import HealthResponse, ModelCard
from mini_claude.server.remote import RemoteChat
from mini_claude.server.response_cache import ResponseCache
from mini_claude.settings import Settings

log = logging.getLogger(__name__)


class ChatService:
    """The state every area shares, and the areas themselves (`models`, `conversations`, `chat`, ...)."""

    def __init__(self, settings: Settings, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.engine: Engine | None = None
        self.scheduler: Scheduler | None = None
        self.db: Database | None = None
        self.started_at = time.monotonic()
        self.models = ModelRegistry(self)
        self.conversations = ConversationStore(self)
        self.responses = ResponseCache(self.settings.response_cache_size)
        self.generation = Generation(self)
        self.chat = ChatCompletions(self)
        self.completions = TextCompletions(self)
        self.audio = AudioService(self)
        self.agents = AgentService(self)
        self.remote = RemoteChat(self)
        self.rag = RagKnowledge(self)  # grounded chat over rag/ (also what /v1/vector_stores searches)
        self.knowledge: KnowledgeHook = self.rag  # the hook the chat path calls (tests may swap it)

    def start(self, engine: Engine, db: Database, scheduler: Scheduler | None = None) -> None:
        self.engine, self.db = engine, db
        self.scheduler = scheduler or Scheduler(
            engine, self.settings.max_batch_size, self.settings.prefix_cache_tokens, self.settings.prefix_cache_mb
        )
        sched = self.scheduler
        self.metrics.watch_scheduler(lambda: sched.stats.waiting, lambda: sched.stats.running)
        self.metrics.watch_cache(lambda: sched.stats, lambda: self.responses.stats)
        self.metrics.watch_adapters(lambda: len(engine.adapters.names))
        self.started_at = time.monotonic()
        loaded = self.agents.load_directory()
        if loaded:
            log.info("agents from %s: %s", self.settings.agents_dir, ", ".join(loaded))

    def stop(self) -> None:
        if self.scheduler is not None:
            self.scheduler.close()

    # ------------------------------------------------------------------------------------------ state
    @property
    def model_name(self) -> str | None:
        return self.engine.name if self.engine is not None else None

    @property
    def scheduler_alive(self) -> bool:
        return self.scheduler is not None and self.scheduler.alive

    def ready(self) -> tuple[Engine, Scheduler, Database]:
        """The engine, scheduler and database, or a 503 while the server starts or after its loop stopped."""
        if self.engine is None or self.scheduler is None or self.db is None:
            raise APIError(503, "The server is starting: the model is still loading.", "server_error", code="not_ready")
        if not self.scheduler_alive:
            raise APIError(
                503, "The generation loop has stopped; restart the server.", "server_error", code="unavailable"
            )
        return self.engine, self.scheduler, self.db

    def authorized(self, token: str | None) -> bool:
        """Whether a bearer token is one of the configured keys (always true when none are configured)."""
        keys = self.settings.api_keys
        if not keys:
            return True
        given = (token or "").encode("utf-8", "surrogateescape")
        return any([hmac.compare_digest(given, key.encode()) for key in keys])  # every key compared: no early exit

    def health(self) -> HealthResponse:
        if self.db is None:
            return HealthResponse(status="starting", model=None, database="not started", scheduler="not started",
                                  voice=self.audio.health(), upstreams=self.upstream_health())  # fmt: skip
        db_ok, sched_ok = ping(self.db), self.scheduler_alive
        stats = self.scheduler.stats if self.scheduler is not None else None
        return HealthResponse(
            status="healthy" if db_ok and sched_ok else "unhealthy", model=self.model_name,
            database="ok" if db_ok else "unreachable", scheduler="running" if sched_ok else "stopped",
            waiting=stats.waiting if stats else 0, running=stats.running if stats else 0,
            uptime_s=round(time.monotonic() - self.started_at, 3), voice=self.audio.health(),
            upstreams=self.upstream_health(),
        )  # fmt: skip

    def upstream_health(self) -> dict[str, str]:
        return {name: upstream.health() for name, upstream in self.models.upstreams.items()}

    # ------------------------------------------------------------------------------------ the database
    async def db_call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a blocking database function in a worker thread; a database failure becomes a 503."""
        with self.db_errors():
            return await anyio.to_thread.run_sync(fn, *args)

    @contextmanager
    def db_errors(self) -> Iterator[None]:
        try:
            yield
        except SQLAlchemyError as exc:
            log.warning("database error: %s", str(exc).splitlines()[0])
            self.metrics.observe_error("database")
            raise APIError(503, "The database is unavailable; try again later.", "server_error",
                           code="database_unavailable") from None  # fmt: skip

    # -------------------------------------------------- the web UI's slice (see ui/web.py's ChatService)
    @property
    def model_ids(self) -> list[str]:
        return self.models.ids

    def stream_reply(self, message: str, *args: Any, **kwargs: Any) -> AsyncIterator[ReplyEvent]:
        return self.chat.stream_reply(message, *args, **kwargs)

    def list_conversations(self, limit: int = 50, offset: int = 0) -> list[dict[str, Any]]:
        return self.conversations.list(limit, offset)

    def get_conversation(self, conversation_id: str) -> dict[str, Any] | None:
        return self.conversations.get(conversation_id)

    def delete_conversation(self, conversation_id: str) -> bool:
        return self.conversations.delete(conversation_id)

    def load_adapter(self, path: str, name: str | None = None) -> ModelCard:
        return self.models.load_adapter(path, name)

    def agent_voice(self, name: str | None) -> str | None:
        """The voice of the agent `name` (the UI's play button prefers it), or None."""
        if not name or self.db is None or "/" in name:
            return None
        try:
            spec = self.agents.get_spec(name)
        except (APIError, SQLAlchemyError):
            return None
        return spec.voice.voice if spec is not None and spec.voice is not None else None
