"""Chat completions for upstream models (`UPSTREAM/MODEL`): proxied to the upstream, stored like local ones.

No FastAPI here (STYLE.md, point 8). Design choices:
- The prompt is built by the chat area's own `_context` (stored conversations, agents' system prompts and
  few-shots) and the exchange is stored by its `_store` and the conversation store, so a proxied conversation
  is continued, listed and deleted exactly like a local one. Its history is trimmed by turns only
  (`memory_max_turns`): we do not know the upstream's tokenizer, and its own context error comes back kept.
- The body is what the client sent (only the fields it set), with `model` replaced by the upstream's name and
  `messages` by the built prompt; our extensions for this server (`conversation_id`, `store`) are not sent.
  Streams always ask the upstream for usage (`stream_options.include_usage`), so the stored reply and the
  metrics have token counts; the usage chunk reaches the client only if it asked for it.
- Chunks are passed through as the upstream sent them (so fields this server does not know survive), with
  `model` set to the id the client asked for and our `conversation_id` added, one SSE event per chunk.
- Errors keep OpenAI's shape (`upstream.UpstreamError` -> `APIError`); a failure mid-stream ends the stream
  with an error event, as the local path does. A client that leaves closes the upstream connection, and the
  partial reply is stored with finish reason "cancelled".
- Metrics are labelled by upstream: requests by outcome, latency, time to first token, and tokens.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio

from mini_claude.engine import Completion
from mini_claude.server.errors import APIError
from mini_claude.server.generation import DONE, EventStream, Job
from mini_claude.server.protocol import ChatCompletionRequest, new_id
from mini_claude.upstream import ChatStream, UpstreamError

if TYPE_CHECKING:
    from mini_claude.server.chat import ReplyEvent
    from mini_claude.server.models import Route
    from mini_claude.server.service import ChatService

log = logging.getLogger(__name__)

# Fields of ours that mean something to this server only.
LOCAL_FIELDS = {"conversation_id", "store", "model", "messages", "stream_options"}


@dataclass
class ProxiedResponse:
    """An upstream's full chat response, as it sent it (model and conversation id rewritten)."""

    body: dict[str, Any]
    conversation_id: str | None = None

    def model_dump(self, mode: str = "python") -> dict[str, Any]:
        return self.body


@dataclass
class _Handle:
    """Lets `EventStream.aclose` close the upstream connection even if the body was never read."""

    stream: ChatStream

    def cancel(self) -> None:
        self.stream.cancel()


@dataclass
class _Outcome:
    text: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    ttft_s: float | None = None


def as_api_error(exc: UpstreamError) -> APIError:
    return APIError(exc.status, exc.message, exc.type, param=exc.param, code=exc.code)


class RemoteChat:
    def __init__(self, service: ChatService) -> None:
        self.service = service

    def body(self, req: ChatCompletionRequest, route: Route, messages: list[dict[str, str]]) -> dict[str, Any]:
        """The upstream's request: the fields the client set, the upstream's model name, the built messages."""
        sent = req.model_dump(include=req.model_fields_set - LOCAL_FIELDS, exclude_none=True)
        if not req.ignore_eos:
            sent.pop("ignore_eos", None)
        sent |= {"model": route.upstream_model, "messages": messages}
        if req.stream:
            sent["stream_options"] = {"include_usage": True}
        return sent

    async def _prepare(
        self, req: ChatCompletionRequest, route: Route, idempotency_key: str | None, default_system: str | None
    ) -> tuple[Job, dict[str, Any]]:
        from mini_claude.server.chat import idempotency_job_key

        chat = self.service.chat
        job = Job(new_id("chatcmpl"), route.model, [], [], req.stops, 0)
        job.key = idempotency_job_key(idempotency_key) or job.id
        context = await chat._context(req, route, job.key, default_system)
        await chat._store(req, job, context)
        return job, self.body(req, route, context.messages)

    async def create(
        self, req: ChatCompletionRequest, route: Route, idempotency_key: str | None = None
    ) -> ProxiedResponse | EventStream:
        """Proxy a chat request: the upstream's full response, or an `EventStream` of its chunks."""
        job, body = await self._prepare(req, route, idempotency_key, None)
        upstream = route.upstream
        assert upstream is not None
        if job.replay is not None:  # a retried request that finished before: answer with the stored reply
            return self._replayed(job, req)
        start = time.perf_counter()
        if req.stream:
            try:
                stream = await upstream.stream(body)
            except UpstreamError as exc:
                self.service.metrics.observe_upstream(upstream.name, exc.status, time.perf_counter() - start)
                raise as_api_error(exc) from None
            events = self._events(job, route, stream, req.include_usage, start)
            return EventStream(events, [_Handle(stream)], job.conversation_id)
        try:
            data = await upstream.chat(body)
        except UpstreamError as exc:
            self.service.metrics.observe_upstream(upstream.name, exc.status, time.perf_counter() - start)
            raise as_api_error(exc) from None
        choices = data.get("choices") or [{}]
        outcome = _Outcome(
            [str((choices[0].get("message") or {}).get("content") or "")], choices[0].get("finish_reason"),
            data.get("usage"),
        )  # fmt: skip
        self._observe(upstream.name, 200, start, outcome)
        await self._store_reply(job, outcome, final=True)
        data["model"] = job.model
        if job.conversation_id is not None:
            data["conversation_id"] = job.conversation_id
        return ProxiedResponse(data, job.conversation_id)

    def _replayed(self, job: Job, req: ChatCompletionRequest) -> ProxiedResponse | EventStream:
        replay = job.replay
        assert replay is not None
        usage = {"prompt_tokens": replay.prompt_tokens, "completion_tokens": replay.completion_tokens,
                 "total_tokens": replay.prompt_tokens + replay.completion_tokens}  # fmt: skip
        base = {"id": job.id, "created": job.created, "model": job.model, "conversation_id": job.conversation_id}
        if not req.stream:
            message = {"role": "assistant", "content": replay.text}
            choice = {"index": 0, "message": message, "finish_reason": replay.finish_reason}
            return ProxiedResponse({**base, "object": "chat.completion", "choices": [choice], "usage": usage},
                                   job.conversation_id)  # fmt: skip

        async def events() -> AsyncIterator[str]:
            chunk = {**base, "object": "chat.completion.chunk"}
            delta = {"role": "assistant", "content": replay.text}
            yield _sse({**chunk, "choices": [{"index": 0, "delta": delta, "finish_reason": replay.finish_reason}]})
            if req.include_usage:
                yield _sse({**chunk, "choices": [], "usage": usage})
            yield DONE

        return EventStream(events(), [], job.conversation_id)

    # ---------------------------------------------------------------------------------------- streams
    async def _run(self, job: Job, name: str, stream: ChatStream, start: float) -> AsyncIterator[dict[str, Any]]:
        """Each upstream chunk as it arrives; at the end (or when closed early) the reply is stored."""
        outcome, status = _Outcome(), 499  # nginx's "client closed request" until we know better
        try:
            async for chunk in stream.chunks():
                for choice in chunk.get("choices") or []:
                    if choice.get("index", 0) != 0:
                        continue
                    content = (choice.get("delta") or {}).get("content")
                    if content:
                        outcome.ttft_s = outcome.ttft_s or time.perf_counter() - start
                        outcome.text.append(content)
                    outcome.finish_reason = choice.get("finish_reason") or outcome.finish_reason
                if chunk.get("usage"):
                    outcome.usage = chunk["usage"]
                yield chunk
            status = 200
        except UpstreamError as exc:
            status = exc.status
            raise
        finally:
            with anyio.CancelScope(shield=True):  # the request may be being cancelled; this must still finish
                await stream.aclose()
                self._observe(name, status, start, outcome)
                if status != 200 and job.conversation_id is not None and outcome.text:
                    await self._store_reply(job, outcome, final=False)
        await self._store_reply(job, outcome, final=True)

    async def _events(
        self, job: Job, route: Route, stream: ChatStream, include_usage: bool, start: float
    ) -> AsyncIterator[str]:
        assert route.upstream is not None
        try:
            async with aclosing(self._run(job, route.upstream.name, stream, start)) as chunks:
                async for chunk in chunks:
                    if not chunk.get("choices") and chunk.get("usage"):  # the usage chunk we asked for
                        if include_usage:
                            yield _sse(self._rewrite(job, chunk))
                        continue
                    if not include_usage:
                        chunk.pop("usage", None)
                    yield _sse(self._rewrite(job, chunk))
        except UpstreamError as exc:
            yield _sse(as_api_error(exc).body().model_dump())
        yield DONE

    async def reply(
        self, req: ChatCompletionRequest, route: Route, default_system: str | None
    ) -> AsyncIterator[ReplyEvent]:
        """The web UI's chat turn with an upstream model: start, token..., done; or one error event."""
        from mini_claude.server.chat import ReplyEvent

        assert route.upstream is not None
        req = req.model_copy(update={"stream": True})
        job, body = await self._prepare(req, route, None, default_system)
        conv = job.conversation_id or ""
        start = time.perf_counter()
        try:
            stream = await route.upstream.stream(body)
        except UpstreamError as exc:
            self.service.metrics.observe_upstream(route.upstream.name, exc.status, time.perf_counter() - start)
            yield ReplyEvent("error", conv, exc.message)
            return
        yield ReplyEvent("start", conv)
        finish, usage = "stop", None
        try:
            async with aclosing(self._run(job, route.upstream.name, stream, start)) as chunks:
                async for chunk in chunks:
                    for choice in chunk.get("choices") or []:
                        if choice.get("index", 0) == 0 and (content := (choice.get("delta") or {}).get("content")):
                            yield ReplyEvent("token", conv, content)
                        finish = choice.get("finish_reason") or finish
                    usage = chunk.get("usage") or usage
        except UpstreamError as exc:
            yield ReplyEvent("error", conv, exc.message)
            return
        yield ReplyEvent("done", conv, usage=usage, finish_reason=finish)

    # ----------------------------------------------------------------------------------------- helpers
    @staticmethod
    def _rewrite(job: Job, chunk: dict[str, Any]) -> dict[str, Any]:
        chunk["model"] = job.model
        if job.conversation_id is not None:
            chunk["conversation_id"] = job.conversation_id
        return chunk

    def _observe(self, name: str, status: int, start: float, outcome: _Outcome) -> None:
        usage = outcome.usage or {}
        self.service.metrics.observe_upstream(
            name, status, time.perf_counter() - start, outcome.ttft_s,
            int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0),
        )  # fmt: skip

    async def _store_reply(self, job: Job, outcome: _Outcome, final: bool) -> None:
        if job.conversation_id is None:
            return
        usage = outcome.usage or {}
        job.prompt_tokens = int(usage.get("prompt_tokens") or 0)
        completion = None
        if final:
            completion = Completion(
                "".join(outcome.text), [], [0] * int(usage.get("completion_tokens") or 0),
                outcome.finish_reason or "stop", (outcome.ttft_s or 0.0) * 1000, 0.0,
            )  # fmt: skip
        try:
            await self.service.db_call(self.service.conversations.store_reply, job, "".join(outcome.text), completion)
        except APIError:
            log.warning("could not store the reply of %s", job.id)


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
