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
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import anyio
from jinja2.exceptions import TemplateError
from pydantic import ValidationError

from mini_claude.chat.memory import ConversationMemory
from mini_claude.engine import Completion
from mini_claude.server.conversations import History, not_found
from mini_claude.server.errors import APIError, generation_failed, invalid, validation_error
from mini_claude.server.generation import DONE, EventStream, Handle, Job, sse, usage_of
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
    from mini_claude.server.service import ChatService

CHAT_DEFAULTS: dict[str, Any] = {"temperature": 0.2, "top_p": 0.9, "repetition_penalty": 1.1}


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
    ) -> ChatCompletionResponse | EventStream:
        """Answer a chat request: a full response, or (with `stream`) an `EventStream` of chunks."""
        job = await self._prepare(req, idempotency_key)
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
            job = await self._prepare(req, None, CHAT_DEFAULTS, self.service.settings.system_prompt)
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

    async def _prepare(
        self,
        req: ChatCompletionRequest,
        idempotency_key: str | None,
        defaults: dict[str, Any] | None = None,
        default_system: str | None = None,
    ) -> Job:
        """Validate against the model, build the prompt (from memory for a stored conversation), store the turn."""
        service = self.service
        engine, _, _ = service.ready()
        store, generation = service.conversations, service.generation
        model_id, adapter = service.models.select(req.model)
        window = engine.context_window
        systems = [m.text for m in req.messages if m.norm_role == "system"]
        turns = [m.to_template() for m in req.messages if m.norm_role != "system"]
        requested = req.requested_max_tokens()
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        system: str | None = None
        history: History | None = None
        job = Job(new_id("chatcmpl"), model_id, [], [], req.stops, 0, adapter=adapter)
        job.key = "req-" + hashlib.sha256(idempotency_key.encode()).hexdigest()[:40] if idempotency_key else job.id
        try:
            if req.conversation_id is not None:
                history = await service.db_call(store.load_history, req.conversation_id, job.key)
                if history is None:
                    raise not_found(req.conversation_id)
                if not any(t["role"] == "user" for t in turns):
                    raise invalid("Invalid value for 'messages': continuing a conversation needs a new user message.",
                                  "messages")  # fmt: skip
                system = systems[-1] if systems else None  # a new system prompt replaces the stored one
                reserve = requested or min(service.settings.max_tokens, window // 4)
                known = history

                def remembered() -> list[int]:
                    memory = ConversationMemory(
                        system if system is not None else known.system_prompt, service.settings.memory_max_turns,
                        max(window - reserve, 1), lambda m: len(engine.encode_chat(m)),
                    )  # fmt: skip
                    for m in known.messages + turns:
                        memory.add(m["role"], m["content"])
                    return engine.encode_chat(memory.context())

                ids = await anyio.to_thread.run_sync(remembered)  # rendering and tokenizing: off the event loop
            else:
                system = "\n\n".join(systems) if systems else default_system
                context = [m.to_template() for m in req.messages]
                if default_system is not None and not systems:
                    context.insert(0, {"role": "system", "content": default_system})
                ids = await anyio.to_thread.run_sync(engine.encode_chat, context)
        except TemplateError as exc:
            raise invalid(f"Invalid value for 'messages': the model's chat template refused them ({exc}).",
                          "messages") from None  # fmt: skip
        budget = generation.budget(requested, len(ids), "messages", param)
        job.prompts, job.prompt_tokens = [ids] * req.n, len(ids)
        job.params = [generation.params(req, budget, i, defaults) for i in range(req.n)]
        if history is not None and history.replay is not None:  # a retry of a request that finished
            job.conversation_id, job.replay, job.prompts, job.params = req.conversation_id, history.replay, [], []
        elif req.store is not False:
            job.conversation_id = await service.db_call(
                store.store_turns, req.conversation_id, system, turns, job.key, req.user, job.model
            )
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
