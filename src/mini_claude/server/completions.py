"""Text completions (`/v1/completions`, OpenAI's legacy API): continue prompts as they are, no chat template.

Several prompts (texts or token-id lists) and `n` samples each become one `Job`; choice `p * n + j` is prompt
p's j-th sample, as OpenAI numbers them. An agent as `model` brings its model, adapter and sampling defaults;
its system prompt and few-shots are chat messages, so a plain completion does not use them. Token ids are
checked against the vocabulary here, because the model would index out of range with them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import TYPE_CHECKING, Any

import anyio

from mini_claude.engine import Completion
from mini_claude.server.errors import generation_failed, invalid
from mini_claude.server.generation import DONE, EventStream, Handle, Job, sse, usage_of
from mini_claude.server.protocol import CompletionChoice, CompletionRequest, CompletionResponse, new_id

if TYPE_CHECKING:
    from mini_claude.server.service import ChatService


class TextCompletions:
    def __init__(self, service: ChatService) -> None:
        self.service = service

    async def create(self, req: CompletionRequest) -> CompletionResponse | EventStream:
        """Continue plain prompts; a full response, or (with `stream`) an `EventStream` of chunks."""
        service = self.service
        engine, _, _ = service.ready()
        generation = service.generation
        route = await service.models.route(req.model)
        if route.upstream is not None:
            raise invalid(f"Invalid value for 'model': '{req.model}' runs on an upstream, which this server "
                          "proxies for chat completions only.", "model", code="unsupported_model")  # fmt: skip
        req = service.agents.with_agent(req, route)  # its sampling defaults (prompts stay as they are)
        model_id, adapter = route.model, route.adapter
        prompts, params = [], []
        vocab = engine.model.config.vocab_size
        for p in req.prompts:
            ids = await anyio.to_thread.run_sync(engine.encode_text, p) if isinstance(p, str) else list(p)
            if not ids:
                raise invalid("Invalid value for 'prompt': the prompt is empty.", "prompt")
            if max(ids) >= vocab:
                raise invalid(f"Invalid value for 'prompt': token ids must be below {vocab}.", "prompt")
            budget = generation.budget(req.requested_max_tokens(), len(ids), "prompt", "max_tokens")
            for j in range(req.n):
                prompts.append(ids)
                params.append(generation.params(req, budget, j))
        job = Job(new_id("cmpl"), model_id, prompts, params, req.stops, sum(len(p) for p in prompts[:: req.n]))
        job.adapter = adapter
        handles = generation.submit(job)
        if req.stream:
            return EventStream(self._events(job, handles, req.include_usage), handles)
        finals = await generation.collect(job, handles)
        choices = [
            CompletionChoice(index=i, text=c.text, finish_reason=c.finish_reason) for i, c in sorted(finals.items())
        ]
        return CompletionResponse(
            id=job.id, created=job.created, model=job.model, choices=choices, usage=usage_of(job, finals)
        )

    async def _events(self, job: Job, handles: list[Handle], include_usage: bool) -> AsyncIterator[str]:
        def chunk(choices: list[CompletionChoice], usage: Any = None) -> str:
            return sse(
                CompletionResponse(id=job.id, created=job.created, model=job.model, choices=choices, usage=usage)
            )

        finals: dict[int, Completion] = {}
        try:
            async with aclosing(self.service.generation.generate(job, handles)) as events:
                async for i, c in events:
                    if c.completion is not None:
                        finals[i] = c.completion
                    if c.text or c.finish_reason:
                        yield chunk([CompletionChoice(index=i, text=c.text, finish_reason=c.finish_reason)])
        except RuntimeError:
            yield sse(generation_failed().body())
            yield DONE
            return
        if include_usage:
            yield chunk([], usage_of(job, finals))
        yield DONE
