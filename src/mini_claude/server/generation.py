"""The one generation path: a prepared `Job` goes to the scheduler and comes back as text chunks.

Design choices:
- Every request (chat, completions, the WebSocket, the UI) becomes a `Job`: prompt ids and one
  `SamplingParams` per choice. It is submitted to the app's one `Scheduler` (continuous batching) and read back
  through `Generation.generate`, which owns the rest of the request's life: metrics, storing the reply, and
  cancelling the sequences when the consumer goes away. The areas only format its `TextChunk`s; none samples,
  stops or detokenizes on its own.
- `n` choices are `n` sequences submitted together (the scheduler prefills them in one forward); a seeded
  request gives choice i the seed `seed + i`, so choice 0 equals the single-choice answer.
- Nothing is cut silently: a prompt that does not fit the context, or `max_tokens` that cannot fit after it,
  is a 400 `context_length_exceeded` (`budget`).
- A store that must happen while the request is being cancelled (the partial reply) is shielded from that
  cancellation.
- Deterministic jobs may be answered from the response cache (`response_cache.py`, opt-in): `submit` then
  returns `CachedReply`s, which `generate` reads exactly like live handles, so the rest of the path is the same.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Hashable, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio
from pydantic import BaseModel

from mini_claude.adapters import AdapterError
from mini_claude.engine import Completion, TextChunk
from mini_claude.generate import SamplingParams
from mini_claude.scheduler import RequestHandle
from mini_claude.server.errors import APIError, generation_failed, invalid, shutting_down
from mini_claude.server.protocol import Usage, now
from mini_claude.server.response_cache import CachedReply

if TYPE_CHECKING:
    from mini_claude.rag.grounding import Grounding
    from mini_claude.server.service import ChatService
    from mini_claude.server.tools import ToolPlan

log = logging.getLogger(__name__)

DONE = "data: [DONE]\n\n"
Handle = RequestHandle | CachedReply  # a live generation, or a cached answer read the same way


@dataclass
class Job:
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
    reply_seq: int | None = None  # the reply's place in the conversation, reserved with its question
    replay: Completion | None = None  # the reply stored by an earlier attempt of this same request
    adapter: str | None = None  # the LoRA adapter the model id names; None for the base model
    cache_key: Hashable | None = None  # set when the answer, once finished, goes into the response cache
    tools: ToolPlan | None = None  # the request's tools, when the model may call them
    grounding: Grounding | None = None  # the numbered sources of a grounded chat (unknown [n] marks are cut)

    def shown(self, text: str) -> str:
        """The reply as clients see it and the store keeps it: without [n] marks that name no source."""
        return self.grounding.clean(text) if self.grounding is not None else text


@dataclass
class EventStream:
    """A response whose body is server-sent-event lines.

    `aclose()` stops its generation even when the body was never iterated (a generator that never started
    runs no cleanup of its own), so the HTTP layer calls it whatever happened.
    """

    events: AsyncIterator[str]
    handles: Sequence[Handle]
    conversation_id: str | None = None

    async def aclose(self) -> None:
        await self.events.aclose()  # type: ignore[attr-defined]
        for handle in self.handles:
            handle.cancel()  # no-op for finished ones (the scheduler has forgotten them)


def sse(payload: BaseModel) -> str:
    return f"data: {payload.model_dump_json()}\n\n"


def usage_of(job: Job, finals: dict[int, Completion]) -> Usage:
    return Usage.of(job.prompt_tokens, sum(c.completion_tokens for c in finals.values()))


async def merge(handles: Sequence[Handle]) -> AsyncIterator[tuple[int, TextChunk]]:
    """(choice index, chunk) from several handles as they arrive; one handle is read directly."""
    if len(handles) == 1:
        async for chunk in handles[0]:
            yield 0, chunk
        return
    queue: asyncio.Queue[tuple[int, TextChunk | BaseException | None]] = asyncio.Queue()

    async def pump(i: int, handle: Handle) -> None:
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


class Generation:
    def __init__(self, service: ChatService) -> None:
        self.service = service

    def budget(self, requested: int | None, prompt_tokens: int, prompt_param: str, budget_param: str) -> int:
        """Tokens to generate: as requested if prompt + that fits the context (else a 400), or the room left
        (capped by the `max_tokens` setting). The error names the prompt when the prompt alone cannot fit."""
        window = self.service.engine.context_window  # type: ignore[union-attr]
        if prompt_tokens <= window - 1 and (requested is None or prompt_tokens + requested <= window):
            return requested if requested is not None else min(self.service.settings.max_tokens, window - prompt_tokens)
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
    def params(req: Any, budget: int, choice: int, defaults: dict[str, Any] | None = None) -> SamplingParams:
        try:
            return req.to_sampling_params(budget, choice, defaults)
        except ValueError as exc:  # the protocol's ranges are tighter, so this means a bug, but stay a 400
            raise invalid(str(exc)) from None

    def submit(self, job: Job) -> list[Handle]:
        """Start a job's sequences (or find its answer in the response cache); read them with `generate`."""
        engine, scheduler, _ = self.service.ready()
        responses = self.service.responses
        key = responses.key(engine.adapters.version, job.model, job.prompts, job.params, job.stop)
        if key is not None and job.replay is None:
            cached = responses.get(key)
            if cached is not None:
                return list(cached)
            job.cache_key = key
        loop = asyncio.get_running_loop()
        handles: list[Handle] = []
        try:
            for prompt, params in zip(job.prompts, job.params, strict=True):
                handles.append(scheduler.submit(prompt, params, job.stop, loop=loop, adapter=job.adapter))
        except BaseException as exc:
            for handle in handles:
                handle.cancel()
            if isinstance(exc, RuntimeError):  # closed while we were preparing
                raise shutting_down() from None
            if isinstance(exc, AdapterError):  # removed (`DELETE /v1/models`) since the request chose it
                raise APIError(404, f"The model '{job.model}' has been removed.", param="model",
                               code="model_not_found") from None  # fmt: skip
            if isinstance(exc, ValueError):
                raise invalid(str(exc), "prompt") from None
            raise
        return handles

    async def generate(self, job: Job, handles: Sequence[Handle]) -> AsyncIterator[tuple[int, TextChunk]]:
        """(choice, chunk) until every sequence finishes; then store the reply. Closing early cancels.

        Raises:
            RuntimeError: the scheduler failed the generation (already logged there).
            APIError: the reply could not be stored (503).
        """
        if job.replay is not None:  # nothing to generate: the answer an earlier attempt stored
            yield 0, TextChunk(0, job.replay.text, [], job.replay.finish_reason, job.replay)
            return
        metrics, store = self.service.metrics, self.service.conversations
        texts: list[list[str]] = [[] for _ in handles]
        chunks: list[list[TextChunk]] = [[] for _ in handles]
        finals: dict[int, Completion] = {}
        outcome = "cancelled"
        try:
            async for i, chunk in merge(handles):
                texts[i].append(chunk.text)
                if job.cache_key is not None:
                    chunks[i].append(chunk)
                if chunk.completion is not None:
                    finals[i] = chunk.completion
                    metrics.observe_completion(chunk.completion)
                yield i, chunk
            outcome = "finished"
            if job.cache_key is not None:
                self.service.responses.put(job.cache_key, chunks)
        except RuntimeError:
            outcome = "failed"
            metrics.observe_error("generation_failed")
            raise
        finally:
            if outcome != "finished":
                for handle in handles:
                    handle.cancel()
            if outcome == "cancelled":
                metrics.observe_cancelled(len(handles) - len(finals))
                partial = job.shown("".join(texts[0]))
                if job.conversation_id is not None and 0 not in finals and partial:
                    with anyio.CancelScope(shield=True):  # the request is being cancelled; this store must finish
                        try:
                            await self.service.db_call(store.store_reply, job, partial, None)
                        except APIError:
                            log.warning("could not store the partial reply of %s", job.id)
        if job.conversation_id is not None:
            await self.service.db_call(store.store_reply, job, job.shown(finals[0].text), finals[0])

    async def collect(self, job: Job, handles: Sequence[Handle]) -> dict[int, Completion]:
        """Run a job to the end (non-streaming responses): the final `Completion` of each choice."""
        finals: dict[int, Completion] = {}
        try:
            async with aclosing(self.generate(job, handles)) as events:
                async for i, chunk in events:
                    if chunk.completion is not None:
                        finals[i] = chunk.completion
        except RuntimeError:
            raise generation_failed() from None
        return finals
