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
- `tools` and `response_format` become a grammar in every choice's `SamplingParams` (`tools.py`); a schema the
  grammar engine cannot compile is a 400 that names what it refused. Tool calls are read out of the text
  (`tools.tool_calls`, or `ToolCallParser` while streaming) into OpenAI's `tool_calls`.
- The UI and the WebSocket use `stream_reply`, which yields `ReplyEvent`s (start, token..., done, or one
  error) and defaults to the chat UI's gentler sampling (`CHAT_DEFAULTS`, the same as `mini-claude chat`); the
  OpenAI route uses OpenAI's defaults (temperature 1, top_p 1), because clients of that API expect them.
- `model` is resolved to a `Route` first (`models.py`). An agent's sampling defaults are merged into the
  request (request > agent > server), and `frame` opens the prompt with its system prompt and few-shots.
  Upstream models go to `remote.py`, which builds its context with the same `_context` and stores the
  exchange with the same `_store`, so a proxied conversation is stored like a local one.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import anyio
from jinja2.exceptions import TemplateError
from pydantic import ValidationError

from mini_claude.agents import AgentSpec, Retrieval
from mini_claude.chat.memory import ConversationMemory
from mini_claude.engine import Completion
from mini_claude.grammar import Grammar, GrammarError
from mini_claude.rag.grounding import Grounding, MarkFilter
from mini_claude.server import tools
from mini_claude.server.conversations import History, not_found
from mini_claude.server.errors import APIError, generation_failed, invalid, validation_error
from mini_claude.server.generation import DONE, EventStream, Handle, Job, sse, usage_of
from mini_claude.server.logprobs import chat_logprobs
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
    native: bool = False  # the model's template renders the request's tools itself
    grounding: Grounding | None = None  # grounded chat: the numbered sources in `messages`


@dataclass
class ReplyEvent:
    """What `stream_reply` yields to the UI and the WebSocket: start, tokens, then done (or an error)."""

    type: Literal["start", "token", "done", "error"]
    conversation_id: str
    content: str = ""
    usage: dict[str, Any] | None = None
    finish_reason: str | None = None
    citations: list[dict[str, Any]] | None = None  # grounded chat: on "done" only
    knowledge: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The WebSocket message: `content` is named for what it is (`message` for errors)."""
        out: dict[str, Any] = {"type": self.type, "conversation_id": self.conversation_id}
        if self.type == "token":
            out["content"] = self.content
        elif self.type == "error":
            out["message"] = self.content
        elif self.type == "done":
            out.update(usage=self.usage, finish_reason=self.finish_reason)
            if self.knowledge is not None:
                out.update(citations=self.citations or [], knowledge=self.knowledge)
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
        job, context = await self._prepare(req, idempotency_key, route=route)
        handles = await self._start(req, job, context)
        if req.stream:
            return EventStream(self._events(job, handles, req.include_usage), handles, job.conversation_id)
        finals = await self.service.generation.collect(job, handles)
        choices = [self._choice(job, i, c, req.logprobs) for i, c in sorted(finals.items())]
        grounded = job.grounding
        citations = None if grounded is None else [
            cite for c in choices for cite in grounded.cite(c.message.content or "", c.index)
        ]  # fmt: skip
        return ChatCompletionResponse(
            id=job.id, created=job.created, model=job.model, choices=choices, usage=usage_of(job, finals),
            conversation_id=job.conversation_id, citations=citations,
            knowledge=None if grounded is None else grounded.report(),
        )  # fmt: skip

    def _choice(self, job: Job, index: int, c: Completion, logprobs: bool | None) -> ChatChoice:
        message, finish = AssistantMessage(content=job.shown(c.text)), c.finish_reason
        if job.tools is not None:
            plan = dataclasses.replace(job.tools, ids=[])  # each choice its own call ids
            content, calls = tools.tool_calls(plan, c.text)
            if calls:
                message = AssistantMessage(content=content, tool_calls=calls)
                finish = "tool_calls" if finish == "stop" else finish
        lp = chat_logprobs(self.service.engine, c.logprobs) if logprobs else None  # type: ignore[arg-type]
        return ChatChoice(index=index, message=message, finish_reason=finish, logprobs=lp)  # type: ignore[arg-type]

    def _grammar(self, req: ChatCompletionRequest) -> tuple[Grammar | None, tools.ToolPlan | None]:
        """The grammar every choice is held to (and the tool plan behind it); 400 for what cannot compile."""
        engine = self.service.engine
        plan, grammar, param = None, None, "response_format"
        if (mode := req.tool_mode) is not None:
            functions = [t.function.model_dump(exclude_none=True) for t in req.tools or []]
            plan = tools.ToolPlan(functions, mode, req.parallel_tool_calls is not False)
            grammar, param = plan.grammar(), "tools"
        elif req.response_format is not None and req.response_format.type == "json_object":
            grammar = Grammar.json_schema({"type": "object"})
        elif req.response_format is not None and req.response_format.type == "json_schema":
            grammar = Grammar.json_schema(req.response_format.json_schema.schema_)  # type: ignore[union-attr]
            param = "response_format.json_schema.schema"
        if grammar is not None:
            try:
                engine.grammars.check(grammar)  # type: ignore[union-attr]
            except GrammarError as exc:
                raise invalid(f"Invalid value for '{param}': this schema is not supported: {exc}", param,
                              "unsupported_schema") from None  # fmt: skip
        return grammar, plan

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
        knowledge: list[str] | None = None,
    ) -> AsyncIterator[ReplyEvent]:
        """The UI's (and WebSocket's) chat turn: start, token..., done; or one error event.

        A new conversation is created when `conversation_id` is None (its id is in every event); the exchange
        is stored like any API chat. `system_prompt` sets (or, for an existing conversation, replaces) the
        system prompt; new conversations default to the configured one. `model` picks the base model or an
        adapter (see `ModelRegistry`). `knowledge` names collections to ground the answer in (grounded chat,
        as the API's extension field); the "done" event then carries the citations and the knowledge report.
        Closing the iterator early (`aclose()`) cancels the generation and stores the partial reply.
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
                    "knowledge": knowledge or None,
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
            job, context = await self._prepare(req, None, CHAT_DEFAULTS, self.service.settings.system_prompt, route)
            handles = await self._start(req, job, context)
        except ValidationError as exc:
            yield ReplyEvent("error", conv, validation_error(exc.errors()).message)
            return
        except APIError as exc:
            yield ReplyEvent("error", conv, exc.message)
            return
        conv = job.conversation_id or ""
        final: Completion | None = None
        marks = MarkFilter(job.grounding.numbers) if job.grounding is not None else None
        try:
            yield ReplyEvent("start", conv)
            async with aclosing(generation.generate(job, handles)) as events:
                async for _, chunk in events:
                    text = marks.feed(chunk.text) if marks is not None else chunk.text
                    if chunk.completion is not None and marks is not None:
                        text += marks.flush()
                    if text:
                        yield ReplyEvent("token", conv, text)
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
        grounded = job.grounding
        yield ReplyEvent(
            "done", conv, usage=usage, finish_reason=final.finish_reason,
            citations=None if grounded is None else grounded.cite(job.shown(final.text)),
            knowledge=None if grounded is None else grounded.report(),
        )  # fmt: skip

    async def _context(
        self, req: ChatCompletionRequest, route: Route, key: str, default_system: str | None,
        count: Callable[[list[dict[str, str]]], int] | None = None, budget: int | None = None,
        plan: tools.ToolPlan | None = None,
    ) -> Context:  # fmt: skip
        """The messages to send for `req` (from memory for a stored conversation), framed by the route's agent.

        `count` and `budget` trim a stored conversation to the context window (remote models pass neither:
        their history is trimmed by turns only, and the upstream judges its own window). With tools (`plan`),
        a template that knows tools gets the request's messages as they are (`Context.native`); otherwise tool
        calls and results are written out as plain turns and the documented tool prompt follows the system
        prompt (in the prompt only, never stored).
        """
        service, agent = self.service, route.agent
        engine = service.engine
        native = plan is not None and engine is not None and engine.tokenizer.knows_tools
        tool_system = tools.system_prompt(plan.functions) if plan is not None and not native else None
        systems = [m.text for m in req.messages if m.norm_role == "system"]
        # stored and remembered as plain turns: tool calls and results written out as the model saw them
        turns = [tools.plain_turn(m.to_template()) for m in req.messages if m.norm_role != "system"]
        given = [m.to_template() if native else tools.plain_turn(m.to_template()) for m in req.messages]
        history: History | None = None
        if req.conversation_id is not None:
            history = await service.db_call(service.conversations.load_history, req.conversation_id, key)
            if history is None:
                raise not_found(req.conversation_id)
            if not any(t["role"] == "user" for t in turns):
                raise invalid("Invalid value for 'messages': continuing a conversation needs a new user message.",
                              "messages")  # fmt: skip
            system = systems[-1] if systems else None  # a new system prompt replaces the stored one
            kept = system if system is not None else history.system_prompt
            memory = ConversationMemory(
                "\n\n".join(p for p in (kept, tool_system) if p) or None, service.settings.memory_max_turns,
                budget, None if count is None else (lambda m: count(frame(agent, m))),
            )  # fmt: skip
            for m in history.messages + turns:
                memory.add(m["role"], m["content"])
            messages = frame(agent, memory.context())
        else:
            if agent is not None:  # the agent's system prompt stands in for the server's default
                system = "\n\n".join(systems) if systems else None
                messages = frame(agent, given, default_system)
            else:
                system = "\n\n".join(systems) if systems else default_system
                messages = given
                if default_system is not None and not systems and not native:
                    messages.insert(0, {"role": "system", "content": default_system})
            if tool_system is not None:  # one system message: the caller's (or agent's), then the tool prompt
                first = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
                prompt = "\n\n".join(p for p in (first, tool_system) if p)
                messages = [{"role": "system", "content": prompt}] + [m for m in messages if m["role"] != "system"]
        grounding = None
        knowledge = self.knowledge_of(req, route)
        # The knowledge tool (mode "tool") runs in `_prepare`, unless the request brings tools of its own: then
        # the sources go into the prompt, as in every other mode.
        if knowledge is not None and (knowledge[1].mode != "tool" or plan is not None):
            collections, retrieval = knowledge
            grounding = await service.knowledge.ground(
                collections, retrieval, messages, count, budget, adapter=route.adapter
            )
            messages = grounding.messages
        return Context(messages, system, turns, history, native, grounding)

    def knowledge_of(self, req: ChatCompletionRequest, route: Route) -> tuple[list[str], Retrieval] | None:
        """The collections to ground `req` in and how (request > agent > defaults), or None for plain chat.

        Grounded chat runs on local models only: an upstream's answers would need their [n] marks read back
        from a proxied stream, which `remote.py` does not do, so asking for it is a 400 rather than ignored.
        """
        agent = route.agent
        collections = req.knowledge if req.knowledge is not None else (agent.knowledge if agent else [])
        retrieval = req.retrieval or (agent.retrieval if agent is not None else Retrieval())
        if not collections or retrieval.mode == "off":
            return None
        if route.upstream is not None:
            raise invalid("Invalid value for 'knowledge': grounded chat runs on this server's own models, not on "
                          "an upstream's.", "knowledge", "unsupported_model")  # fmt: skip
        return list(collections), retrieval

    async def _store(self, req: ChatCompletionRequest, job: Job, context: Context) -> None:
        """Store the request's new turns (or, for a retry of a finished request, take its stored reply)."""
        history = context.history
        if history is not None and history.replay is not None:  # a retry of a request that finished
            job.conversation_id, job.replay, job.prompts, job.params = req.conversation_id, history.replay, [], []
        elif req.store is not False:
            job.conversation_id, job.reply_seq = await self.service.db_call(
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
    ) -> tuple[Job, Context]:
        """Validate against the model and build the prompt (from memory for a stored conversation); `_start`
        then runs it and stores the turn."""
        service = self.service
        engine, _, _ = service.ready()
        generation = service.generation
        if route is None:
            route = Route(*service.models.select(req.model))
        window = engine.context_window
        grammar, plan = self._grammar(req)
        requested = req.requested_max_tokens()
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        job = Job(new_id("chatcmpl"), route.model, [], [], req.stops, 0, adapter=route.adapter, tools=plan)
        job.key = idempotency_job_key(idempotency_key) or job.id
        reserve = requested or min(service.settings.max_tokens, window // 4)
        try:
            context = await self._context(
                req, route, job.key, default_system, lambda m: len(engine.encode_chat(m)), max(window - reserve, 1),
                plan,
            )  # fmt: skip
            knowledge = self.knowledge_of(req, route)
            if knowledge is not None and knowledge[1].mode == "tool" and plan is None:  # the knowledge tool
                context.grounding = await service.knowledge.tool_round(
                    route, *knowledge, context.messages, lambda m: len(engine.encode_chat(m)), max(window - reserve, 1),
                )  # fmt: skip
                context.messages = context.grounding.messages
            job.grounding = context.grounding
            specs = [t.model_dump(exclude_none=True) for t in req.tools or []] if context.native else None
            # rendering and tokenizing: off the event loop
            ids = await anyio.to_thread.run_sync(engine.encode_chat, context.messages, specs)
        except TemplateError as exc:
            raise invalid(f"Invalid value for 'messages': the model's chat template refused them ({exc}).",
                          "messages") from None  # fmt: skip
        budget = generation.budget(requested, len(ids), "messages", param)
        job.prompts, job.prompt_tokens = [ids] * req.n, len(ids)
        job.params = [generation.params(req, budget, i, defaults) for i in range(req.n)]
        if grammar is not None:
            job.params = [dataclasses.replace(p, grammar=grammar) for p in job.params]
        return job, context

    async def _start(self, req: ChatCompletionRequest, job: Job, context: Context) -> list[Handle]:
        """Submit the job, then store the request's turns while its prompt is being prefilled, so the database
        write (~10 ms on SQLite, a round trip on PostgreSQL) no longer comes before the first token. A store
        that fails cancels the generation; a retry of a finished request only stores (it replays its reply)."""
        generation = self.service.generation
        if context.history is not None and context.history.replay is not None:
            await self._store(req, job, context)
            return generation.submit(job)
        handles = generation.submit(job)
        try:
            await self._store(req, job, context)
        except BaseException:
            for handle in handles:
                handle.cancel()
            raise
        return handles

    async def _events(self, job: Job, handles: list[Handle], include_usage: bool) -> AsyncIterator[str]:
        def chunk(choices: list[ChatChunkChoice], usage: Any = None, **extensions: Any) -> str:
            return sse(ChatCompletionChunk(id=job.id, created=job.created, model=job.model, choices=choices,
                                           usage=usage, conversation_id=job.conversation_id, **extensions))  # fmt: skip

        grounded = job.grounding
        marks = {i: MarkFilter(grounded.numbers) for i in range(len(handles))} if grounded is not None else {}
        shown: dict[int, list[str]] = {}  # per choice, what was sent (a replayed reply has no handles)

        def content(i: int, text: str, last: bool) -> list[dict[str, Any]]:
            """Content deltas of choice i, with unknown [n] marks held back and cut (grounded chat)."""
            if i in marks:
                text = marks[i].feed(text) + (marks[i].flush() if last else "")
            shown.setdefault(i, []).append(text)
            return [{"content": text}] if text else []

        for i in range(1 if job.replay is not None else len(handles)):
            yield chunk([ChatChunkChoice(index=i, delta={"role": "assistant", "content": ""})])
        finals: dict[int, Completion] = {}
        engine = self.service.engine
        parsers = {i: tools.ToolCallParser(dataclasses.replace(job.tools, ids=[])) for i in range(len(handles))
                   if job.tools is not None}  # fmt: skip
        try:
            async with aclosing(self.service.generation.generate(job, handles)) as events:
                async for i, c in events:
                    lp = chat_logprobs(engine, c.logprobs) if c.logprobs else None  # type: ignore[arg-type]
                    lp = lp if lp is not None and lp.content else None
                    last = c.completion is not None
                    deltas = parsers[i].feed(c.text) if i in parsers else content(i, c.text, last)
                    for n, delta in enumerate(deltas):
                        yield chunk([ChatChunkChoice(index=i, delta=delta, logprobs=lp if n == 0 else None)])
                    if lp is not None and not deltas:  # tokens whose text is held back still report logprobs
                        yield chunk([ChatChunkChoice(index=i, delta={}, logprobs=lp)])
                    if c.completion is not None:
                        finals[i] = c.completion
                        finish = c.completion.finish_reason
                        if i in parsers and parsers[i].called and finish == "stop":
                            finish = "tool_calls"
                        yield chunk([ChatChunkChoice(index=i, finish_reason=finish)])
        except (APIError, RuntimeError) as exc:
            yield sse(exc.body() if isinstance(exc, APIError) else generation_failed().body())
            yield DONE
            return
        if grounded is not None:  # the citations, once, on the final chunk (with the usage, when asked for)
            citations = [cite for i in sorted(shown) for cite in grounded.cite("".join(shown[i]), i)]
            usage = usage_of(job, finals) if include_usage else None
            yield chunk([], usage, citations=citations, knowledge=grounded.report())
        elif include_usage:
            yield chunk([], usage_of(job, finals))
        yield DONE
