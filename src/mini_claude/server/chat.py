"""Chat completions (`/v1/chat/completions`) and the chat turn of the web UI and the WebSocket.

Design choices:
- A request is prepared once (`_prepare`): validated against the model, its prompt built with the model's own
  chat template (from memory for a stored conversation), its new turns stored; then it is a `Job` for
  `generation.py`, and the response is a full `ChatCompletionResponse` or an `EventStream` of chunks.
- Rendering and tokenizing run in a worker thread (the tokenizer releases the GIL): a megabyte of prompt takes
  seconds, and the event loop must keep serving other streams and /health meanwhile.
- Only a stored conversation is trimmed, by whole turns, with `ConversationMemory` (the system prompt always
  stays): that is what server-side memory means. A request without `conversation_id` that does not fit is a
  400, never silently cut.
- The UI and the WebSocket use `stream_reply`, which yields `ReplyEvent`s (start, token..., done, or one
  error) and defaults to the chat UI's gentler sampling (`CHAT_DEFAULTS`, the same as `mini-claude chat`); the
  OpenAI route uses OpenAI's defaults (temperature 1, top_p 1), because clients of that API expect them.
- `model` is resolved to a `Route` first (`models.py`). An agent's sampling defaults are merged into the
  request (request > agent > server), and `frame` opens the prompt with its system prompt and few-shots.
  Upstream models go to `remote.py`, which builds its context with the same `_context` and stores the
  exchange with the same `_store`, so a proxied conversation is stored like a local one.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import anyio
from jinja2.exceptions import TemplateError
from pydantic import ValidationError

from mini_claude.agents import AgentSpec
from mini_claude.chat.memory import ConversationMemory
from mini_claude.engine import Completion
from mini_claude.server.conversations import History, not_found
from mini_claude.server.errors import APIError, generation_failed, invalid, validation_error
from mini_claude.server.generation import DONE, EventStream, Handle, Job, sse, usage_of
from mini_claude.server.models import Route
from mini_claude.server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    new_id,
)

if TYPE_CHECKING:
    from mini_claude.server.remote import ProxiedResponse
    from mini_claude.server.service import ChatService

CHAT_DEFAULTS: dict[str, Any] = {"temperature": 0.2, "top_p": 0.9, "repetition_penalty": 1.1}


def idempotency_job_key(idempotency_key: str | None) -> str | None:
    return "req-" + hashlib.sha256(idempotency_key.encode()).hexdigest()[:40] if idempotency_key else None


def frame(
    agent: AgentSpec | None, messages: list[dict[str, str]], default_system: str | None = None
) -> list[dict[str, str]]:
    """`messages` opened the agent's way: its system prompt (then the messages' own), then its few-shots."""
    if agent is None:
        return messages
    systems = [m["content"] for m in messages if m["role"] == "system"]
    rest = [m for m in messages if m["role"] != "system"]
    return agent.prompt_prefix("\n\n".join(systems) or None, default_system) + rest


@dataclass
class Context:
    """A chat request's prompt messages and what to store of it."""

    messages: list[dict[str, str]]  # everything the model sees, in order
    system: str | None  # the system prompt to store with the conversation
    turns: list[dict[str, str]]  # the request's new (non-system) messages, to store
    history: History | None  # the stored conversation, when continuing one


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


class ChatCompletions:
    def __init__(self, service: ChatService) -> None:
        self.service = service

    async def create(
        self, req: ChatCompletionRequest, idempotency_key: str | None = None
    ) -> ChatCompletionResponse | ProxiedResponse | EventStream:
        """Answer a chat request: a full response, or (with `stream`) an `EventStream` of chunks.

        The model may be local (the base model or an adapter), an upstream's (proxied by `remote.py`), or an
        agent running on either; an agent's settings are merged in first (`AgentService.apply`).
        """
        route = await self.service.models.route(req.model)
        req = self.service.agents.with_agent(req, route)
        if route.upstream is not None:
            return await self.service.remote.create(req, route, idempotency_key)
        job = await self._prepare(req, idempotency_key, route=route)
        handles = self.service.generation.submit(job)
        if req.stream:
            return EventStream(self._events(job, handles, req.include_usage), handles, job.conversation_id)
        finals = await self.service.generation.collect(job, handles)
        choices = [
            ChatChoice(index=i, message=AssistantMessage(content=c.text), finish_reason=c.finish_reason)
            for i, c in sorted(finals.items())
        ]
        return ChatCompletionResponse(
            id=job.id, created=job.created, model=job.model, choices=choices, usage=usage_of(job, finals),
            conversation_id=job.conversation_id,
        )  # fmt: skip

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
        adapter (see `ModelRegistry`). Closing the iterator early (`aclose()`) cancels the generation and
        stores the partial reply.
        """
        conv = conversation_id or ""
        generation = self.service.generation
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
            route = await self.service.models.route(model)
            req = self.service.agents.with_agent(req, route)
            if route.upstream is not None:
                remote = self.service.remote.reply(req, route, self.service.settings.system_prompt)
                async with aclosing(remote) as events:
                    async for event in events:
                        yield event
                return
            job = await self._prepare(req, None, CHAT_DEFAULTS, self.service.settings.system_prompt, route)
            handles = generation.submit(job)
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
            async with aclosing(generation.generate(job, handles)) as events:
                async for _, chunk in events:
                    if chunk.text:
                        yield ReplyEvent("token", conv, chunk.text)
                    final = chunk.completion or final
        except (APIError, RuntimeError) as exc:
            yield ReplyEvent("error", conv, exc.message if isinstance(exc, APIError) else "The generation failed.")
            return
        finally:  # closed before `generate` started (e.g. right after "start"): nobody else cancels these
            for handle in handles:
                handle.cancel()
        assert final is not None  # every finished sequence ends with its Completion
        usage = usage_of(job, {0: final}).model_dump() | {
            "ttft_ms": round(final.ttft_ms, 1), "decode_tokens_per_s": round(final.decode_tokens_per_s, 1),
        }  # fmt: skip
        yield ReplyEvent("done", conv, usage=usage, finish_reason=final.finish_reason)

    async def _context(
        self, req: ChatCompletionRequest, route: Route, key: str, default_system: str | None,
        count: Callable[[list[dict[str, str]]], int] | None = None, budget: int | None = None,
    ) -> Context:  # fmt: skip
        """The messages to send for `req` (from memory for a stored conversation), framed by the route's agent.

        `count` and `budget` trim a stored conversation to the context window (remote models pass neither:
        their history is trimmed by turns only, and the upstream judges its own window).
        """
        service, agent = self.service, route.agent
        systems = [m.text for m in req.messages if m.norm_role == "system"]
        turns = [m.to_template() for m in req.messages if m.norm_role != "system"]
        history: History | None = None
        if req.conversation_id is not None:
            history = await service.db_call(service.conversations.load_history, req.conversation_id, key)
            if history is None:
                raise not_found(req.conversation_id)
            if not any(t["role"] == "user" for t in turns):
                raise invalid("Invalid value for 'messages': continuing a conversation needs a new user message.",
                              "messages")  # fmt: skip
            system = systems[-1] if systems else None  # a new system prompt replaces the stored one
            memory = ConversationMemory(
                system if system is not None else history.system_prompt, service.settings.memory_max_turns,
                budget, None if count is None else (lambda m: count(frame(agent, m))),
            )  # fmt: skip
            for m in history.messages + turns:
                memory.add(m["role"], m["content"])
            messages = frame(agent, memory.context())
        elif agent is not None:  # the agent's system prompt stands in for the server's default
            system = "\n\n".join(systems) if systems else None
            messages = frame(agent, [m.to_template() for m in req.messages], default_system)
        else:
            system = "\n\n".join(systems) if systems else default_system
            messages = [m.to_template() for m in req.messages]
            if default_system is not None and not systems:
                messages.insert(0, {"role": "system", "content": default_system})
        if agent is not None and agent.knowledge:
            messages = (await service.knowledge.ground(agent, messages)).messages  # the retrieval hook
        return Context(messages, system, turns, history)

    async def _store(self, req: ChatCompletionRequest, job: Job, context: Context) -> None:
        """Store the request's new turns (or, for a retry of a finished request, take its stored reply)."""
        history = context.history
        if history is not None and history.replay is not None:  # a retry of a request that finished
            job.conversation_id, job.replay, job.prompts, job.params = req.conversation_id, history.replay, [], []
        elif req.store is not False:
            job.conversation_id = await self.service.db_call(
                self.service.conversations.store_turns, req.conversation_id, context.system, context.turns,
                job.key, req.user, job.model,
            )  # fmt: skip

    async def _prepare(
        self,
        req: ChatCompletionRequest,
        idempotency_key: str | None,
        defaults: dict[str, Any] | None = None,
        default_system: str | None = None,
        route: Route | None = None,
    ) -> Job:
        """Validate against the model, build the prompt (from memory for a stored conversation), store the turn."""
        service = self.service
        engine, _, _ = service.ready()
        generation = service.generation
        if route is None:
            route = Route(*service.models.select(req.model))
        window = engine.context_window
        requested = req.requested_max_tokens()
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        job = Job(new_id("chatcmpl"), route.model, [], [], req.stops, 0, adapter=route.adapter)
        job.key = idempotency_job_key(idempotency_key) or job.id
        reserve = requested or min(service.settings.max_tokens, window // 4)
        try:
            context = await self._context(
                req, route, job.key, default_system, lambda m: len(engine.encode_chat(m)), max(window - reserve, 1)
            )
            ids = await anyio.to_thread.run_sync(engine.encode_chat, context.messages)  # off the event loop
        except TemplateError as exc:
            raise invalid(f"Invalid value for 'messages': the model's chat template refused them ({exc}).",
                          "messages") from None  # fmt: skip
        budget = generation.budget(requested, len(ids), "messages", param)
        job.prompts, job.prompt_tokens = [ids] * req.n, len(ids)
        job.params = [generation.params(req, budget, i, defaults) for i in range(req.n)]
        await self._store(req, job, context)
        return job

    async def _events(self, job: Job, handles: list[Handle], include_usage: bool) -> AsyncIterator[str]:
        def chunk(choices: list[ChatChunkChoice], usage: Any = None) -> str:
            return sse(ChatCompletionChunk(id=job.id, created=job.created, model=job.model, choices=choices,
                                           usage=usage, conversation_id=job.conversation_id))  # fmt: skip

        for i in range(1 if job.replay is not None else len(handles)):
            yield chunk([ChatChunkChoice(index=i, delta={"role": "assistant", "content": ""})])
        finals: dict[int, Completion] = {}
        try:
            async with aclosing(self.service.generation.generate(job, handles)) as events:
                async for i, c in events:
                    if c.text:
                        yield chunk([ChatChunkChoice(index=i, delta={"content": c.text})])
                    if c.completion is not None:
                        finals[i] = c.completion
                        yield chunk([ChatChunkChoice(index=i, finish_reason=c.completion.finish_reason)])
        except (APIError, RuntimeError) as exc:
            yield sse(exc.body() if isinstance(exc, APIError) else generation_failed().body())
            yield DONE
            return
        if include_usage:
            yield chunk([], usage_of(job, finals))
        yield DONE
