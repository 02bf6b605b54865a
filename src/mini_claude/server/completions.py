"""Text completions (`/v1/completions`, OpenAI's legacy API): continue prompts as they are, no chat template.

Several prompts (texts or token-id lists) and `n` samples each become one `Job`; choice `p * n + j` is prompt
p's j-th sample, as OpenAI numbers them. An agent as `model` brings its model, adapter and sampling defaults;
its system prompt and few-shots are chat messages, so a plain completion does not use them. Token ids are
checked against the vocabulary here, because the model would index out of range with them.

`logprobs: N` reports each generated token's log-probability and its N likeliest alternatives in the legacy
shape; `echo` puts the prompt before the completion, and with `logprobs` scores the prompt too: one dense
forward (`Engine.score`, run on the scheduler's thread), which is how lm-evaluation-harness's
`local-completions` computes log-likelihoods (`echo` with `max_tokens` 0 or 1).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import TYPE_CHECKING, Any

import anyio

from mini_claude.engine import Completion
from mini_claude.generate import TokenLogprob
from mini_claude.server.errors import generation_failed, invalid, shutting_down
from mini_claude.server.generation import DONE, EventStream, Handle, Job, sse, usage_of
from mini_claude.server.logprobs import legacy_logprobs
from mini_claude.server.protocol import (
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    LegacyLogprobs,
    Usage,
    new_id,
)

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
        prompts, params, echoes = [], [], []
        vocab = engine.model.config.vocab_size
        for p in req.prompts:
            ids = await anyio.to_thread.run_sync(engine.encode_text, p) if isinstance(p, str) else list(p)
            if not ids:
                raise invalid("Invalid value for 'prompt': the prompt is empty.", "prompt")
            if max(ids) >= vocab:
                raise invalid(f"Invalid value for 'prompt': token ids must be below {vocab}.", "prompt")
            if req.max_tokens == 0:  # scoring only: the prompt must fit, nothing is generated
                if len(ids) > engine.context_window:
                    generation.budget(None, len(ids), "prompt", "max_tokens")  # raises the context error
            else:
                budget = generation.budget(req.requested_max_tokens(), len(ids), "prompt", "max_tokens")
                params += [generation.params(req, budget, j) for j in range(req.n)]
            prompts += [ids] * req.n
            if req.echo:
                echoes.append(await self._echo(p, ids, req.logprobs, adapter))
        job = Job(new_id("cmpl"), model_id, prompts, params, req.stops, sum(len(p) for p in prompts[:: req.n]))
        job.adapter = adapter
        echo = [e for e in echoes for _ in range(req.n)]  # choice p * n + j echoes prompt p
        if req.max_tokens == 0:
            choices = [CompletionChoice(index=i, text=t, finish_reason="length", logprobs=lp)
                       for i, (t, lp) in enumerate(echo)]  # fmt: skip
            return CompletionResponse(id=job.id, created=job.created, model=job.model, choices=choices,
                                      usage=Usage.of(job.prompt_tokens, 0))  # fmt: skip
        handles = generation.submit(job)
        if req.stream:
            return EventStream(self._events(job, handles, req.include_usage, echo), handles)
        finals = await generation.collect(job, handles)
        choices = [self._choice(i, c, echo[i] if echo else None) for i, c in sorted(finals.items())]
        return CompletionResponse(
            id=job.id, created=job.created, model=job.model, choices=choices, usage=usage_of(job, finals)
        )

    async def _echo(
        self, prompt: str | list[int], ids: list[int], top: int | None, adapter: str | None
    ) -> tuple[str, LegacyLogprobs | None]:
        """The prompt's text and, when log-probabilities are asked for, its scores."""
        engine, scheduler, _ = self.service.ready()
        text = prompt if isinstance(prompt, str) else engine.tokenizer.decode(ids, skip_special_tokens=False)
        if top is None:
            return text, None
        try:
            scores = await asyncio.wrap_future(scheduler.call(lambda: engine.score(ids, top, adapter)))
        except RuntimeError:
            raise shutting_down() from None
        return text, legacy_logprobs(engine, ids, scores)

    def _choice(self, index: int, c: Completion, echo: tuple[str, LegacyLogprobs | None] | None) -> CompletionChoice:
        lp = self._logprobs(c.logprobs) if c.logprobs or (echo and echo[1]) else None
        if echo is None:
            return CompletionChoice(index=index, text=c.text, finish_reason=c.finish_reason, logprobs=lp)
        text, prompt_lp = echo
        if prompt_lp is not None and lp is not None:  # the prompt's entries, then the completion's after its text
            shift = len(text)
            lp = LegacyLogprobs(
                tokens=prompt_lp.tokens + lp.tokens,
                token_logprobs=prompt_lp.token_logprobs + lp.token_logprobs,
                top_logprobs=prompt_lp.top_logprobs + lp.top_logprobs,
                text_offset=prompt_lp.text_offset + [o + shift for o in lp.text_offset],
            )
        return CompletionChoice(index=index, text=text + c.text, finish_reason=c.finish_reason, logprobs=lp)

    def _logprobs(self, entries: list[TokenLogprob]) -> LegacyLogprobs:
        return legacy_logprobs(self.service.engine, [e.token_id for e in entries], entries)  # type: ignore[arg-type]

    async def _events(
        self, job: Job, handles: list[Handle], include_usage: bool, echo: list[tuple[str, LegacyLogprobs | None]]
    ) -> AsyncIterator[str]:
        def chunk(choices: list[CompletionChoice], usage: Any = None) -> str:
            return sse(
                CompletionResponse(id=job.id, created=job.created, model=job.model, choices=choices, usage=usage)
            )

        for i, (text, lp) in enumerate(echo):  # the echoed prompts come first, as OpenAI streams them
            yield chunk([CompletionChoice(index=i, text=text, logprobs=lp)])
        finals: dict[int, Completion] = {}
        try:
            async with aclosing(self.service.generation.generate(job, handles)) as events:
                async for i, c in events:
                    if c.completion is not None:
                        finals[i] = c.completion
                    if c.text or c.finish_reason or c.logprobs:
                        lp = self._logprobs(c.logprobs) if c.logprobs else None
                        yield chunk([CompletionChoice(index=i, text=c.text, finish_reason=c.finish_reason,
                                                      logprobs=lp)])  # fmt: skip
        except RuntimeError:
            yield sse(generation_failed().body())
            yield DONE
            return
        if include_usage:
            yield chunk([], usage_of(job, finals))
        yield DONE
