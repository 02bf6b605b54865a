"""Request -> scheduler -> response: the logic behind every route, the WebSocket and the web UI.

No FastAPI here (STYLE.md, point 8): `ChatService` takes validated protocol models (or plain arguments,
for the UI) and returns protocol models or streams of server-sent-event lines; routes only translate.

Design choices:
- One generation path. Every request becomes a `_Job` (prompt ids and one `SamplingParams` per choice),
  is submitted to the app's one `Scheduler` (continuous batching), and is read back through `_generate`,
  which owns the rest of a request's life: metrics, storing the reply, and cancelling the sequences when
  the consumer goes away. Chat, completions, SSE, the WebSocket and the UI all format its `TextChunk`s;
  none samples, stops or detokenizes on its own.
- `n` choices are `n` sequences submitted together (the scheduler prefills them in one forward); a seeded
  request gives choice i the seed `seed + i`, so choice 0 equals the single-choice answer.
- Nothing is cut silently: a prompt that does not fit the context, or `max_tokens` that cannot fit after
  it, is a 400 `context_length_exceeded`. Only a stored conversation is trimmed, by whole turns, with
  `ConversationMemory` (the system prompt always stays) - that is what server-side memory means.
- Persistence: the user's turn is stored before generating (so the conversation id exists for the first
  SSE chunk and the `X-Conversation-Id` header), the reply when it finishes - or, if the client leaves
  mid-reply, what was generated so far with finish reason "cancelled". Every message carries an
  idempotency key derived from the request (or its `Idempotency-Key` header), so a store that is retried
  or reached twice lands once; a request retried with the same header in a conversation gets the stored
  reply back instead of a new generation. NUL characters (which PostgreSQL cannot store, and random
  models emit) are stored as U+FFFD on every backend. Database calls run in worker threads (SQLAlchemy is
  synchronous); a store that must happen while the request is being cancelled is shielded from that
  cancellation.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import aclosing, contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import anyio
from jinja2.exceptions import TemplateError
from pydantic import BaseModel, ValidationError
from sqlalchemy import Engine as Database
from sqlalchemy.exc import SQLAlchemyError

from mini_claude.chat.memory import ConversationMemory
from mini_claude.db import crud, ping, session_scope
from mini_claude.engine import Completion, Engine, TextChunk
from mini_claude.generate import SamplingParams
from mini_claude.scheduler import RequestHandle, Scheduler
from mini_claude.server.metrics import Metrics
from mini_claude.server.protocol import (
    AdapterDetail,
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ConversationDeleted,
    ConversationDetail,
    ConversationInfo,
    ConversationList,
    ErrorDetail,
    ErrorResponse,
    HealthResponse,
    ModelCard,
    ModelDetail,
    ModelDetails,
    ModelList,
    SocketRequest,
    Usage,
    new_id,
    now,
)
from mini_claude.settings import Settings

log = logging.getLogger(__name__)

# Sampling defaults of the chat UI and the WebSocket (the same as `mini-claude chat`); the OpenAI routes use
# OpenAI's (temperature 1, top_p 1), because clients of that API expect them.
CHAT_DEFAULTS: dict[str, Any] = {"temperature": 0.2, "top_p": 0.9, "repetition_penalty": 1.1}
TITLE_CHARS = 60
MAX_OFFSET = 2**31 - 1  # databases store offsets as 32- or 64-bit integers; no listing is that long
DONE = "data: [DONE]\n\n"


class APIError(Exception):
    """A failure to report to the client in OpenAI's error shape, with its HTTP status."""

    def __init__(
        self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
        code: str | None = None,
    ) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> ErrorResponse:
        return ErrorResponse(error=ErrorDetail(message=self.message, type=self.type, param=self.param, code=self.code))


def invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


_TYPE_TAGS = {"body", "query", "path", "header", "str", "int", "float", "bool", "list", "dict", "none"}


def validation_error(errors: Sequence[Any]) -> APIError:
    """A 400 from pydantic's error list: the first problem, and where it is (`messages[0].role`).

    Model-level checks in `protocol.py` raise `ValueError("field: problem")`; the field is read back from that
    prefix, since pydantic gives such errors no location.
    """
    first = dict(errors[0]) if errors else {"msg": "invalid request", "loc": ()}
    # Drop "body" and the union-member tags pydantic puts in locations (`str`, `function-after[...]`, ...).
    loc = [p for p in first.get("loc", ()) if isinstance(p, int) or (p.isidentifier() and p not in _TYPE_TAGS)]
    message = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
    if first.get("type") == "json_invalid":
        return invalid("We could not parse the JSON body of your request: it is not valid JSON.", code="invalid_json")
    if not loc and first.get("type") in ("missing", "model_attributes_type", "dict_type"):
        return invalid("The request body must be a JSON object.", code="invalid_body")
    param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or None
    if param is None and ": " in message and message.split(": ", 1)[0].isidentifier():
        param, message = message.split(": ", 1)
    text = f"Invalid value for '{param}': {message}" if param else message
    return invalid(text, param=param)


@dataclass
class ReplyEvent:
    """What `stream_reply` yields to the UI and the WebSocket: start, tokens, then done (or an error)."""

    type: Literal["start", "token", "done", "error"]
    conversation_id: str
    content: str = ""
    usage: dict[str, Any] | None = None
    finish_reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The WebSocket message: `content` is named for what it is (`message` for errors)."""
        out: dict[str, Any] = {"type": self.type, "conversation_id": self.conversation_id}
        if self.type == "token":
            out["content"] = self.content
        elif self.type == "error":
            out["message"] = self.content
        elif self.type == "done":
            out.update(usage=self.usage, finish_reason=self.finish_reason)
        return out


@dataclass
class EventStream:
    """A response whose body is server-sent-event lines.

    `aclose()` stops its generation even when the body was never iterated (a generator that never started
    runs no cleanup of its own), so the HTTP layer calls it whatever happened.
    """

    events: AsyncIterator[str]
    handles: list[RequestHandle]
    conversation_id: str | None = None

    async def aclose(self) -> None:
        await self.events.aclose()  # type: ignore[attr-defined]
        for handle in self.handles:
            handle.cancel()  # no-op for finished ones (the scheduler has forgotten them)


@dataclass
class _Job:
    """One request, ready for the scheduler: a prompt and sampling parameters per sequence."""

    id: str
    model: str  # the id the client asked for: the base model's or an adapter's
    prompts: list[list[int]]
    params: list[SamplingParams]
    stop: list[str]
    prompt_tokens: int  # for usage: each distinct prompt counted once, as OpenAI does for n > 1
    created: int = field(default_factory=now)
    conversation_id: str | None = None
    key: str | None = None  # idempotency key of this request's messages: `{key}:{i}`, `{key}:reply`
    replay: Completion | None = None  # the reply stored by an earlier attempt of this same request
    adapter: str | None = None  # the LoRA adapter the model id names; None for the base model


@dataclass
class _History:
    system_prompt: str | None
    messages: list[dict[str, str]]  # without the messages an earlier attempt of this request stored
    replay: Completion | None = None


def sse(payload: BaseModel) -> str:
    return f"data: {payload.model_dump_json()}\n\n"


def _usage(job: _Job, finals: dict[int, Completion]) -> Usage:
    return Usage.of(job.prompt_tokens, sum(c.completion_tokens for c in finals.values()))


def _db_text(text: str) -> str:
    # PostgreSQL's text type cannot hold NUL, which a model (or a user) may well produce.
    return text.replace("\x00", "\ufffd")


def _is_uuid(value: str) -> bool:
    try:
        return str(uuid.UUID(value)) == value
    except (ValueError, AttributeError, TypeError):
        return False


def _iso(value: Any) -> str:
    return value.isoformat() if value is not None else ""


def _title(turns: Sequence[dict[str, str]]) -> str:
    first = next((t["content"] for t in turns if t["role"] == "user"), "")
    words = " ".join(first.split())
    return (words[: TITLE_CHARS - 1] + "…" if len(words) > TITLE_CHARS else words) or crud.DEFAULT_TITLE


async def _merge(handles: Sequence[RequestHandle]) -> AsyncIterator[tuple[int, TextChunk]]:
    """(choice index, chunk) from several handles as they arrive; one handle is read directly."""
    if len(handles) == 1:
        async for chunk in handles[0]:
            yield 0, chunk
        return
    queue: asyncio.Queue[tuple[int, TextChunk | BaseException | None]] = asyncio.Queue()

    async def pump(i: int, handle: RequestHandle) -> None:
        try:
            async for chunk in handle:
                queue.put_nowait((i, chunk))
        except Exception as exc:  # a failed generation: re-raised in the consumer
            queue.put_nowait((i, exc))
        finally:
            queue.put_nowait((i, None))

    tasks = [asyncio.create_task(pump(i, h)) for i, h in enumerate(handles)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()  # ends the task's `async for`, which cancels its handle


class ChatService:
    """The service layer shared by the HTTP routes, the WebSocket and the web UI.

    Created with the app (so the UI can be mounted at once) and started by its lifespan, which loads the model:
    until then generation and storage raise a 503 `APIError`.
    """

    def __init__(self, settings: Settings, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.engine: Engine | None = None
        self.scheduler: Scheduler | None = None
        self.db: Database | None = None
        self.started_at = time.monotonic()
        self._adapter_created: dict[str, int] = {}  # adapters loaded after start: when (for /v1/models)

    def start(self, engine: Engine, db: Database, scheduler: Scheduler | None = None) -> None:
        self.engine, self.db = engine, db
        self.scheduler = scheduler or Scheduler(engine, self.settings.max_batch_size)
        sched = self.scheduler
        self.metrics.watch_scheduler(lambda: sched.stats.waiting, lambda: sched.stats.running)
        self.started_at = time.monotonic()

    def stop(self) -> None:
        if self.scheduler is not None:
            self.scheduler.close()

    # ------------------------------------------------------------------------------------------ state
    @property
    def model_name(self) -> str | None:
        return self.engine.name if self.engine is not None else None

    @property
    def scheduler_alive(self) -> bool:
        # The Scheduler has no public liveness flag (see the report); its thread is the truth.
        return self.scheduler is not None and self.scheduler.alive

    def _ready(self) -> tuple[Engine, Scheduler, Database]:
        if self.engine is None or self.scheduler is None or self.db is None:
            raise APIError(503, "The server is starting: the model is still loading.", "server_error", code="not_ready")
        if not self.scheduler_alive:
            raise APIError(
                503, "The generation loop has stopped; restart the server.", "server_error", code="unavailable"
            )
        return self.engine, self.scheduler, self.db

    @property
    def model_ids(self) -> list[str]:
        """What `model` may name: the base model, then each loaded adapter."""
        return [self.engine.name, *self.engine.adapters.names] if self.engine is not None else []

    def select_model(self, name: str | None) -> tuple[str, str | None]:
        """(model id, adapter) for a request's `model`: None is the base model; adapters are models of their own."""
        engine, _, _ = self._ready()
        if name is None or name == engine.name:
            return engine.name, None
        if name in engine.adapters:
            return name, name
        raise APIError(
            404, f"The model '{name}' does not exist; this server serves {', '.join(map(repr, self.model_ids))}.",
            param="model", code="model_not_found",
        )  # fmt: skip

    def authorized(self, token: str | None) -> bool:
        """Whether a bearer token is one of the configured keys (always true when none are configured)."""
        keys = self.settings.api_keys
        if not keys:
            return True
        given = (token or "").encode("utf-8", "surrogateescape")
        return any([hmac.compare_digest(given, key.encode()) for key in keys])  # every key compared: no early exit

    def health(self) -> HealthResponse:
        if self.db is None:
            return HealthResponse(status="starting", model=None, database="not started", scheduler="not started")
        db_ok, sched_ok = ping(self.db), self.scheduler_alive
        stats = self.scheduler.stats if self.scheduler is not None else None
        return HealthResponse(
            status="healthy" if db_ok and sched_ok else "unhealthy", model=self.model_name,
            database="ok" if db_ok else "unreachable", scheduler="running" if sched_ok else "stopped",
            waiting=stats.waiting if stats else 0, running=stats.running if stats else 0,
            uptime_s=round(time.monotonic() - self.started_at, 3),
        )  # fmt: skip

    def models(self) -> ModelList:
        """The base model and every loaded adapter, each a model (vLLM's convention: `parent` names the base)."""
        engine, _, _ = self._ready()
        started = int(time.time() - (time.monotonic() - self.started_at))
        cards = [ModelCard(id=engine.name, created=started)]
        for name in engine.adapters.names:
            created = self._adapter_created.get(name, started)
            cards.append(ModelCard(id=name, created=created, parent=engine.name, root=engine.adapters.info(name).path))
        return ModelList(data=cards)

    def model(self, name: str) -> ModelCard:
        model_id, _ = self.select_model(name)
        return next(card for card in self.models().data if card.id == model_id)

    def model_details(self) -> ModelDetails:
        engine, _, _ = self._ready()
        config = engine.model.config
        details = [
            ModelDetail(
                id=engine.name, context_window=engine.context_window, parameters=config.n_params, source=engine.source
            )
        ]
        for name in engine.adapters.names:
            info = engine.adapters.info(name)
            details.append(
                ModelDetail(
                    id=name, context_window=engine.context_window, parameters=config.n_params + info.parameters,
                    source=info.path, parent=engine.name,
                    adapter=AdapterDetail(rank=info.rank, alpha=info.alpha, targets=info.targets,
                                          parameters=info.parameters, base_model=info.base_model),
                )
            )  # fmt: skip
        return ModelDetails(models=details)

    def load_adapter(self, path: str, name: str | None = None) -> ModelCard:
        """Serve the adapter in `path` as a new model, without a restart (fine-tune jobs call this when done)."""
        engine, _, _ = self._ready()
        info = engine.load_adapter(path, name)
        self._adapter_created[info.name] = int(time.time())
        log.info("serving adapter %s from %s", info.name, info.path)
        return self.model(info.name)

    # ---------------------------------------------------------------------------------------- requests
    async def chat_completion(
        self, req: ChatCompletionRequest, idempotency_key: str | None = None
    ) -> ChatCompletionResponse | EventStream:
        """Answer a chat request: a full response, or (with `stream`) an `EventStream` of chunks."""
        job = await self._prepare_chat(req, idempotency_key)
        handles = self._submit(job)
        if req.stream:
            return EventStream(self._chat_events(job, handles, req.include_usage), handles, job.conversation_id)
        finals = await self._collect(job, handles)
        choices = [
            ChatChoice(index=i, message=AssistantMessage(content=c.text), finish_reason=c.finish_reason)
            for i, c in sorted(finals.items())
        ]
        return ChatCompletionResponse(
            id=job.id, created=job.created, model=job.model, choices=choices, usage=_usage(job, finals),
            conversation_id=job.conversation_id,
        )  # fmt: skip

    async def completion(self, req: CompletionRequest) -> CompletionResponse | EventStream:
        """Continue plain prompts (`/v1/completions`); choice `p * n + j` is prompt p's j-th sample."""
        engine, _, _ = self._ready()
        model_id, adapter = self.select_model(req.model)
        prompts, params = [], []
        vocab = engine.model.config.vocab_size
        for p in req.prompts:
            ids = engine.encode_text(p) if isinstance(p, str) else list(p)
            if not ids:
                raise invalid("Invalid value for 'prompt': the prompt is empty.", "prompt")
            if max(ids) >= vocab:
                raise invalid(f"Invalid value for 'prompt': token ids must be below {vocab}.", "prompt")
            budget = self._budget(req.requested_max_tokens(), len(ids), "prompt", "max_tokens")
            for j in range(req.n):
                prompts.append(ids)
                params.append(self._params(req, budget, j))
        job = _Job(new_id("cmpl"), model_id, prompts, params, req.stops, sum(len(p) for p in prompts[:: req.n]))
        job.adapter = adapter
        handles = self._submit(job)
        if req.stream:
            return EventStream(self._completion_events(job, handles, req.include_usage), handles)
        finals = await self._collect(job, handles)
        choices = [
            CompletionChoice(index=i, text=c.text, finish_reason=c.finish_reason) for i, c in sorted(finals.items())
        ]
        return CompletionResponse(
            id=job.id, created=job.created, model=job.model, choices=choices, usage=_usage(job, finals)
        )

    async def stream_reply(
        self,
        message: str,
        conversation_id: str | None = None,
        system_prompt: str | None = None,
        temperature: float | None = None,
        max_tokens: int | None = None,
        *,
        top_p: float | None = None,
        top_k: int | None = None,
        repetition_penalty: float | None = None,
        seed: int | None = None,
        model: str | None = None,
    ) -> AsyncIterator[ReplyEvent]:
        """The UI's (and WebSocket's) chat turn: start, token..., done; or one error event.

        A new conversation is created when `conversation_id` is None (its id is in every event); the exchange
        is stored like any API chat. `system_prompt` sets (or, for an existing conversation, replaces) the
        system prompt; new conversations default to the configured one. `model` picks the base model or an
        adapter (see `models()`). Closing the iterator early
        (`aclose()`) cancels the generation and stores the partial reply.
        """
        conv = conversation_id or ""
        try:
            messages = ([{"role": "system", "content": system_prompt}] if system_prompt is not None else []) + [
                {"role": "user", "content": message}
            ]
            req = ChatCompletionRequest.model_validate(
                {
                    "messages": messages,
                    "conversation_id": conversation_id,
                    "temperature": temperature,
                    "max_tokens": max_tokens,
                    "top_p": top_p,
                    "top_k": top_k,
                    "repetition_penalty": repetition_penalty,
                    "seed": seed,
                    "model": model,
                }
            )
            job = await self._prepare_chat(req, None, CHAT_DEFAULTS, self.settings.system_prompt)
            handles = self._submit(job)
        except ValidationError as exc:
            yield ReplyEvent("error", conv, validation_error(exc.errors()).message)
            return
        except APIError as exc:
            yield ReplyEvent("error", conv, exc.message)
            return
        conv = job.conversation_id or ""
        final: Completion | None = None
        try:
            yield ReplyEvent("start", conv)
            async with aclosing(self._generate(job, handles)) as events:
                async for _, chunk in events:
                    if chunk.text:
                        yield ReplyEvent("token", conv, chunk.text)
                    final = chunk.completion or final
        except (APIError, RuntimeError) as exc:
            yield ReplyEvent("error", conv, exc.message if isinstance(exc, APIError) else "The generation failed.")
            return
        finally:  # closed before `_generate` started (e.g. right after "start"): nobody else cancels these
            for handle in handles:
                handle.cancel()
        assert final is not None  # every finished sequence ends with its Completion
        usage = _usage(job, {0: final}).model_dump() | {
            "ttft_ms": round(final.ttft_ms, 1), "decode_tokens_per_s": round(final.decode_tokens_per_s, 1),
        }  # fmt: skip
        yield ReplyEvent("done", conv, usage=usage, finish_reason=final.finish_reason)

    # ------------------------------------------------------------------------------------ preparation
    async def _prepare_chat(
        self,
        req: ChatCompletionRequest,
        idempotency_key: str | None,
        defaults: dict[str, Any] | None = None,
        default_system: str | None = None,
    ) -> _Job:
        """Validate against the model, build the prompt (from memory for a stored conversation), store the turn."""
        engine, _, _ = self._ready()
        model_id, adapter = self.select_model(req.model)
        window = engine.context_window
        systems = [m.text for m in req.messages if m.norm_role == "system"]
        turns = [m.to_template() for m in req.messages if m.norm_role != "system"]
        requested = req.requested_max_tokens()
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        system: str | None = None
        history: _History | None = None
        job = _Job(new_id("chatcmpl"), model_id, [], [], req.stops, 0, adapter=adapter)
        job.key = "req-" + hashlib.sha256(idempotency_key.encode()).hexdigest()[:40] if idempotency_key else job.id
        try:
            if req.conversation_id is not None:
                history = await self._db_call(self._load_history, req.conversation_id, job.key)
                if history is None:
                    raise APIError(404, f"No conversation with id '{req.conversation_id}'.",
                                   param="conversation_id", code="conversation_not_found")  # fmt: skip
                if not any(t["role"] == "user" for t in turns):
                    raise invalid("Invalid value for 'messages': continuing a conversation needs a new user message.",
                                  "messages")  # fmt: skip
                system = systems[-1] if systems else None  # a new system prompt replaces the stored one
                reserve = requested or min(self.settings.max_tokens, window // 4)
                memory = ConversationMemory(
                    system if system is not None else history.system_prompt, self.settings.memory_max_turns,
                    max(window - reserve, 1), lambda m: len(engine.encode_chat(m)),
                )  # fmt: skip
                for m in history.messages + turns:
                    memory.add(m["role"], m["content"])
                ids = engine.encode_chat(memory.context())
            else:
                system = "\n\n".join(systems) if systems else default_system
                context = [m.to_template() for m in req.messages]
                if default_system is not None and not systems:
                    context.insert(0, {"role": "system", "content": default_system})
                ids = engine.encode_chat(context)
        except TemplateError as exc:
            raise invalid(f"Invalid value for 'messages': the model's chat template refused them ({exc}).",
                          "messages") from None  # fmt: skip
        budget = self._budget(requested, len(ids), "messages", param)
        job.prompts, job.prompt_tokens = [ids] * req.n, len(ids)
        job.params = [self._params(req, budget, i, defaults) for i in range(req.n)]
        if history is not None and history.replay is not None:  # a retry of a request that finished
            job.conversation_id, job.replay, job.prompts, job.params = req.conversation_id, history.replay, [], []
        elif req.store is not False:
            job.conversation_id = await self._db_call(
                self._store_turns, req.conversation_id, system, turns, job.key, req.user, job.model
            )
        return job

    def _budget(self, requested: int | None, prompt_tokens: int, prompt_param: str, budget_param: str) -> int:
        """Tokens to generate: as requested if prompt + that fits the context (else a 400), or the room left
        (capped by the `max_tokens` setting). The error names the prompt when the prompt alone cannot fit."""
        window = self.engine.context_window  # type: ignore[union-attr]
        if prompt_tokens <= window - 1 and (requested is None or prompt_tokens + requested <= window):
            return requested if requested is not None else min(self.settings.max_tokens, window - prompt_tokens)
        if prompt_tokens > window - 1:
            wanted, param = f"{prompt_tokens} tokens in the prompt", prompt_param
        else:
            wanted = f"{prompt_tokens + requested} tokens ({prompt_tokens} in the prompt, {requested} to generate)"  # type: ignore[operator]
            param = budget_param
        raise APIError(
            400, f"This model's maximum context length is {window} tokens; you requested {wanted}. "
            f"Shorten the {prompt_param} or lower {budget_param}.", param=param, code="context_length_exceeded",
        )  # fmt: skip

    @staticmethod
    def _params(req: Any, budget: int, choice: int, defaults: dict[str, Any] | None = None) -> SamplingParams:
        try:
            return req.to_sampling_params(budget, choice, defaults)
        except ValueError as exc:  # the protocol's ranges are tighter, so this means a bug, but stay a 400
            raise invalid(str(exc)) from None

    def _submit(self, job: _Job) -> list[RequestHandle]:
        _, scheduler, _ = self._ready()
        loop = asyncio.get_running_loop()
        handles: list[RequestHandle] = []
        try:
            for prompt, params in zip(job.prompts, job.params, strict=True):
                handles.append(scheduler.submit(prompt, params, job.stop, loop=loop, adapter=job.adapter))
        except BaseException as exc:
            for handle in handles:
                handle.cancel()
            if isinstance(exc, RuntimeError):  # closed while we were preparing
                raise APIError(503, "The server is shutting down.", "server_error", code="unavailable") from None
            if isinstance(exc, ValueError):
                raise invalid(str(exc), "prompt") from None
            raise
        return handles

    # ------------------------------------------------------------------------------------ generation
    async def _generate(self, job: _Job, handles: list[RequestHandle]) -> AsyncIterator[tuple[int, TextChunk]]:
        """(choice, chunk) until every sequence finishes; then store the reply. Closing early cancels.

        Raises:
            RuntimeError: the scheduler failed the generation (already logged there).
            APIError: the reply could not be stored (503).
        """
        if job.replay is not None:  # nothing to generate: the answer an earlier attempt stored
            yield 0, TextChunk(0, job.replay.text, [], job.replay.finish_reason, job.replay)
            return
        texts: list[list[str]] = [[] for _ in handles]
        finals: dict[int, Completion] = {}
        outcome = "cancelled"
        try:
            async for i, chunk in _merge(handles):
                texts[i].append(chunk.text)
                if chunk.completion is not None:
                    finals[i] = chunk.completion
                    self.metrics.observe_completion(chunk.completion)
                yield i, chunk
            outcome = "finished"
        except RuntimeError:
            outcome = "failed"
            self.metrics.observe_error("generation_failed")
            raise
        finally:
            if outcome != "finished":
                for handle in handles:
                    handle.cancel()
            if outcome == "cancelled":
                self.metrics.observe_cancelled(len(handles) - len(finals))
                partial = "".join(texts[0])
                if job.conversation_id is not None and 0 not in finals and partial:
                    with anyio.CancelScope(shield=True):  # the request is being cancelled; this store must finish
                        try:
                            await self._db_call(self._store_reply, job, partial, None)
                        except APIError:
                            log.warning("could not store the partial reply of %s", job.id)
        if job.conversation_id is not None:
            await self._db_call(self._store_reply, job, finals[0].text, finals[0])

    async def _collect(self, job: _Job, handles: list[RequestHandle]) -> dict[int, Completion]:
        finals: dict[int, Completion] = {}
        try:
            async with aclosing(self._generate(job, handles)) as events:
                async for i, chunk in events:
                    if chunk.completion is not None:
                        finals[i] = chunk.completion
        except RuntimeError:
            raise APIError(500, "The generation failed; try again.", "server_error", code="generation_failed") from None
        return finals

    async def _chat_events(self, job: _Job, handles: list[RequestHandle], include_usage: bool) -> AsyncIterator[str]:
        def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> str:
            return sse(ChatCompletionChunk(id=job.id, created=job.created, model=job.model, choices=choices,
                                           usage=usage, conversation_id=job.conversation_id))  # fmt: skip

        for i in range(1 if job.replay is not None else len(handles)):
            yield chunk([ChatChunkChoice(index=i, delta={"role": "assistant", "content": ""})])
        finals: dict[int, Completion] = {}
        try:
            async with aclosing(self._generate(job, handles)) as events:
                async for i, c in events:
                    if c.text:
                        yield chunk([ChatChunkChoice(index=i, delta={"content": c.text})])
                    if c.completion is not None:
                        finals[i] = c.completion
                        yield chunk([ChatChunkChoice(index=i, finish_reason=c.completion.finish_reason)])
        except (APIError, RuntimeError) as exc:
            yield sse(exc.body() if isinstance(exc, APIError) else _generation_failed().body())
            yield DONE
            return
        if include_usage:
            yield chunk([], _usage(job, finals))
        yield DONE

    async def _completion_events(
        self, job: _Job, handles: list[RequestHandle], include_usage: bool
    ) -> AsyncIterator[str]:
        def chunk(choices: list[CompletionChoice], usage: Usage | None = None) -> str:
            return sse(
                CompletionResponse(id=job.id, created=job.created, model=job.model, choices=choices, usage=usage)
            )

        finals: dict[int, Completion] = {}
        try:
            async with aclosing(self._generate(job, handles)) as events:
                async for i, c in events:
                    if c.completion is not None:
                        finals[i] = c.completion
                    if c.text or c.finish_reason:
                        yield chunk([CompletionChoice(index=i, text=c.text, finish_reason=c.finish_reason)])
        except RuntimeError:
            yield sse(_generation_failed().body())
            yield DONE
            return
        if include_usage:
            yield chunk([], _usage(job, finals))
        yield DONE

    # ------------------------------------------------------------------------------------ the database
    async def _db_call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a blocking database function in a worker thread; a database failure becomes a 503."""
        with self._db_errors():
            return await anyio.to_thread.run_sync(fn, *args)

    @contextmanager
    def _db_errors(self) -> Iterator[None]:
        try:
            yield
        except SQLAlchemyError as exc:
            log.warning("database error: %s", str(exc).splitlines()[0])
            self.metrics.observe_error("database")
            raise APIError(503, "The database is unavailable; try again later.", "server_error",
                           code="database_unavailable") from None  # fmt: skip

    def _load_history(self, conversation_id: str, key: str) -> _History | None:
        """The conversation so far, as it was before this request (whose earlier attempts may have stored
        messages under `key`); with the finished reply of such an attempt, if there is one, to replay."""
        if not _is_uuid(conversation_id):
            return None
        with session_scope(self.db) as s:  # type: ignore[arg-type]
            conversation = crud.get_conversation(s, conversation_id)
            if conversation is None:
                return None
            stored = crud.list_messages(s, conversation_id)
            mine = f"{key}:"
            messages = [
                {"role": m.role, "content": m.content} for m in stored if not (m.idempotency_key or "").startswith(mine)
            ]
            reply = next((m for m in stored if m.idempotency_key == f"{key}:reply"), None)
            if reply is None:
                return _History(conversation.system_prompt, messages)
            # Only counts survive in the database; `completion_ids` stands in for them so usage is reported.
            replay = Completion(
                reply.content, [0] * (reply.prompt_tokens or 0), [0] * (reply.completion_tokens or 0),
                reply.finish_reason or "stop", reply.ttft_ms or 0.0, 0.0,
            )  # fmt: skip
            return _History(conversation.system_prompt, messages, replay)

    def _store_turns(
        self, conversation_id: str | None, system: str | None, turns: list[dict[str, str]], key: str,
        user: str | None, model: str,
    ) -> str:  # fmt: skip
        """Store the request's new messages (creating the conversation if needed) in one transaction."""
        with session_scope(self.db) as s:  # type: ignore[arg-type]
            if conversation_id is None:
                meta = {"user": _db_text(user)} if user else {}
                conversation = crud.create_conversation(
                    s,
                    title=_db_text(_title(turns)),
                    model=model,
                    meta=meta,
                    system_prompt=None if system is None else _db_text(system),
                )
            else:
                conversation = crud.get_conversation(s, conversation_id)
                if conversation is None:  # deleted since we read it
                    raise APIError(404, f"No conversation with id '{conversation_id}'.", param="conversation_id",
                                   code="conversation_not_found")  # fmt: skip
                if system is not None and system != conversation.system_prompt:
                    conversation.system_prompt = _db_text(system)
            for i, turn in enumerate(turns):
                crud.add_message(
                    s, conversation.id, turn["role"], _db_text(turn["content"]), idempotency_key=f"{key}:{i}"
                )
            return conversation.id

    def _store_reply(self, job: _Job, text: str, completion: Completion | None) -> None:
        with session_scope(self.db) as s:  # type: ignore[arg-type]
            try:
                crud.add_message(
                    s, job.conversation_id, "assistant", _db_text(text),  # type: ignore[arg-type]
                    # A cancelled reply has a key of its own, so that a retry's full reply can still be stored.
                    idempotency_key=f"{job.key}:{'reply' if completion else 'partial'}",
                    model=job.model, prompt_tokens=job.prompt_tokens,
                    completion_tokens=completion.completion_tokens if completion else None,
                    ttft_ms=completion.ttft_ms if completion else None,
                    finish_reason=completion.finish_reason if completion else "cancelled",
                )  # fmt: skip
            except crud.NotFoundError:  # the conversation was deleted while we generated: nothing to add to
                log.info("conversation %s was deleted before its reply was stored", job.conversation_id)

    # --------------------------------------------------------------------------------- conversations
    def list_conversations(self, limit: int = 50, offset: int = 0) -> list[dict[str, Any]]:
        """Most recently active first: id, title, model, system_prompt, created_at, updated_at (ISO 8601)."""
        _, _, db = self._ready()
        if not (1 <= limit <= crud.MAX_PAGE_SIZE and 0 <= offset <= MAX_OFFSET):
            raise invalid(f"limit must be in 1..{crud.MAX_PAGE_SIZE} and offset in 0..{MAX_OFFSET}", "limit")
        with self._db_errors(), session_scope(db) as s:
            return [_conversation_dict(c) for c in crud.list_conversations(s, limit=limit, offset=offset)]

    def get_conversation(self, conversation_id: str) -> dict[str, Any] | None:
        """A conversation with its `messages` (role, content, created_at), or None."""
        _, _, db = self._ready()
        if not _is_uuid(conversation_id):
            return None
        with self._db_errors(), session_scope(db) as s:
            conversation = crud.get_conversation(s, conversation_id)
            if conversation is None:
                return None
            messages = [
                {"role": m.role, "content": m.content, "created_at": _iso(m.created_at)}
                for m in crud.list_messages(s, conversation_id)
            ]
            return _conversation_dict(conversation) | {"messages": messages}

    def delete_conversation(self, conversation_id: str) -> bool:
        _, _, db = self._ready()
        if not _is_uuid(conversation_id):
            return False
        with self._db_errors(), session_scope(db) as s:
            return crud.delete_conversation(s, conversation_id)

    def conversation_page(self, limit: int, offset: int) -> ConversationList:
        _, _, db = self._ready()
        data = [ConversationInfo(**c) for c in self.list_conversations(limit, offset)]
        with self._db_errors(), session_scope(db) as s:
            total = crud.count_conversations(s)
        return ConversationList(data=data, has_more=offset + len(data) < total)

    def conversation(self, conversation_id: str) -> ConversationDetail:
        found = self.get_conversation(conversation_id)
        if found is None:
            raise _conversation_not_found(conversation_id)
        return ConversationDetail(**found)

    def remove_conversation(self, conversation_id: str) -> ConversationDeleted:
        if not self.delete_conversation(conversation_id):
            raise _conversation_not_found(conversation_id)
        return ConversationDeleted(id=conversation_id)


def _conversation_dict(c: Any) -> dict[str, Any]:
    return {"id": c.id, "title": c.title, "model": c.model, "system_prompt": c.system_prompt,
            "created_at": _iso(c.created_at), "updated_at": _iso(c.updated_at)}  # fmt: skip


def _conversation_not_found(conversation_id: str) -> APIError:
    return APIError(404, f"No conversation with id '{conversation_id}'.", param="conversation_id",
                    code="conversation_not_found")  # fmt: skip


def _generation_failed() -> APIError:
    return APIError(500, "The generation failed; try again.", "server_error", code="generation_failed")


class ChatSocket:
    """The WebSocket chat protocol of one connection, independent of the web framework.

    The route feeds it each text frame (`on_message`) and gives it a `send` for JSON messages. Client
    messages: `{"message": ..., "conversation_id"?, "system_prompt"?, sampling fields?}` starts a reply,
    `{"type": "cancel"}` stops it, `{"type": "ping"}` gets a pong. The server answers a reply with
    `start`, `token`..., `done` (or `error`); after a cancel, `done` has finish_reason "cancelled". A bad
    message gets an `error` and the socket stays open; one reply runs at a time.
    """

    def __init__(self, service: ChatService, send: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
        self.service = service
        self.send = send
        self.task: asyncio.Task[None] | None = None
        self.conversation_id = ""

    async def on_message(self, data: str | bytes | None) -> None:
        try:
            payload = json.loads(data or "")
        except (ValueError, UnicodeDecodeError):
            await self._error("Messages must be JSON objects.", "invalid_json")
            return
        kind = payload.get("type", "message") if isinstance(payload, dict) else None
        if kind == "cancel":
            await self.cancel()
        elif kind == "ping":
            await self.send({"type": "pong"})
        elif kind != "message":
            await self._error('Send {"message": "..."} to chat or {"type": "cancel"} to stop a reply.', "invalid_type")
        elif self.task is not None and not self.task.done():
            await self._error('A reply is in progress; wait for "done" or send {"type": "cancel"}.', "busy")
        else:
            try:
                req = SocketRequest.model_validate(payload)
            except ValidationError as exc:
                await self._error(validation_error(exc.errors()).message, "invalid_request")
                return
            self.conversation_id = req.conversation_id or ""
            self.task = asyncio.create_task(self._relay(req))

    async def _relay(self, req: SocketRequest) -> None:
        fields = req.model_dump(exclude={"type", "message", "conversation_id", "system_prompt"})
        events = self.service.stream_reply(req.message, req.conversation_id, req.system_prompt, **fields)
        try:
            async with aclosing(events):
                async for event in events:
                    self.conversation_id = event.conversation_id or self.conversation_id
                    await self.send(event.to_dict())
        except Exception as exc:  # the socket closed under us (or a bug): the reply is over either way
            log.warning("WebSocket reply ended early: %r", exc)
            with contextlib.suppress(Exception):
                await self._error("The reply failed.", "server_error")

    async def cancel(self) -> None:
        """Stop the reply in progress (its partial text is stored) and say so with a `done` message."""
        if self.task is None or self.task.done():
            return  # nothing to stop (it may have just finished): not an error
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await self.send({"type": "done", "conversation_id": self.conversation_id, "usage": None,
                         "finish_reason": "cancelled"})  # fmt: skip

    async def close(self) -> None:
        """The connection is gone: stop whatever it was waiting for."""
        if self.task is not None and not self.task.done():
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)

    async def _error(self, message: str, code: str) -> None:
        await self.send({"type": "error", "message": message, "code": code, "conversation_id": self.conversation_id})
