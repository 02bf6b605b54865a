"""Grounded chat on the server: the retrieval hook over `rag`, and the built-in `search_knowledge` tool round.

No FastAPI here (STYLE.md, point 8). The prompt numbering, budget fitting and [n]-mark parsing are
`rag/grounding.py`'s; this module resolves the collections a request names, runs the searches off the event
loop, and turns what goes wrong into OpenAI-shaped errors (an unknown collection is a 400 naming it).

Design choices:
- One `Knowledge` per server (`RagKnowledge.knowledge`), shared with `/v1/vector_stores`, so the embedder is
  loaded once and each collection's dense index is kept in step once.
- A collection is named by its name (`mini-claude ingest --collection NAME`) or its id (a vector store's
  `vs_...`): `Knowledge.resolve` tries both, like the vector-store routes.
- The knowledge tool (agents with `retrieval.mode: tool`) is one extra, internal generation before the answer:
  the model sees `search_knowledge` described in its system prompt, the grammar of `tools.py` holds it to a
  well-formed call (or, with `tool_choice: auto`, a plain reply), and if it calls, the server runs the search
  and appends the call and its numbered result as the next two turns; the answer is then generated (streamed,
  stored, cited) like any grounded answer. The internal round is greedy and capped at `SEARCH_CALL_TOKENS`;
  its tokens are not in `usage`, which counts the answer's prompt and completion. If the model answers
  without searching, that text is discarded and the answer generated from the plain prompt: a reply cut at
  the call's small budget would be worse than a second prefill.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import anyio

from mini_claude.agents import Retrieval
from mini_claude.generate import SamplingParams, TokenLogprob
from mini_claude.rag import grounding as rag_grounding
from mini_claude.rag.grounding import SEARCH_TOOL, Grounding, merge_hits, search_query, tool_result, with_system
from mini_claude.rag.rerank import QueryLikelihood
from mini_claude.rag.retrieve import Hit
from mini_claude.rag.store import CollectionError
from mini_claude.server import tools
from mini_claude.server.errors import invalid, shutting_down
from mini_claude.server.generation import Job
from mini_claude.server.protocol import new_id

if TYPE_CHECKING:
    from mini_claude.rag.knowledge import Knowledge
    from mini_claude.server.models import Route
    from mini_claude.server.service import ChatService

SEARCH_CALL_TOKENS = 64  # `<tool_call>` + the name + a query of a dozen words
Count = Callable[[list[dict[str, str]]], int]


class RagKnowledge:
    """The server's retrieval hook (`agents.KnowledgeHook`): grounds prompts in collections of `rag.Knowledge`."""

    def __init__(self, service: ChatService) -> None:
        self.service = service
        self._knowledge: Knowledge | None = None

    @property
    def knowledge(self) -> Knowledge:
        """The `Knowledge` over the server's database, made on first use (its embedder loads on first search)."""
        if self._knowledge is None:
            from mini_claude.rag.knowledge import Knowledge

            _, _, db = self.service.ready()
            settings = self.service.settings
            self._knowledge = Knowledge(db, index_dir=settings.rag_index_dir, embed_precision=settings.embed_precision)
        return self._knowledge

    async def search(
        self, collections: list[str], retrieval: Retrieval, query: str, adapter: str | None = None
    ) -> list[tuple[str, Hit]]:
        """(collection, hit) pairs, best first: `retrieval.top_k` over all collections, or with `full_context`
        every chunk of each, in document order; `retrieval.rerank` reorders them under the answering model (the
        base model or `adapter`). A 400 names the collections that do not exist."""
        knowledge = self.knowledge
        reranker = self.reranker(adapter) if retrieval.rerank else None

        def run() -> list[tuple[str, Hit]]:
            try:
                ids = knowledge.resolve(collections)
                if retrieval.mode == "full_context":
                    return [(name, h) for name, cid in ids.items() for h in knowledge.all_chunks(cid)]
                if not query.strip():
                    return []
                found = {name: knowledge.search(query, cid, retrieval.top_k, retrieval.search, retrieval.rrf_k,
                                                reranker) for name, cid in ids.items()}  # fmt: skip
            except CollectionError as exc:
                raise invalid(f"Invalid value for 'knowledge': {exc}.", "knowledge", "collection_not_found") from None
            return merge_hits(found, retrieval.top_k, retrieval.score_threshold)

        return await self.service.db_call(run)

    def reranker(self, adapter: str | None = None) -> QueryLikelihood:
        """The model that will answer (the base model, or with `adapter` an agent's fine-tune) as a
        query-likelihood reranker: the passages it ranks first are the ones it reads best. Its forwards run on
        the scheduler's thread, between generation steps (the engine is not thread-safe); the search's worker
        thread waits for each."""
        engine, scheduler, _ = self.service.ready()

        def score(ids: Sequence[int], *, start: int) -> list[TokenLogprob | None]:
            try:
                return scheduler.call(lambda: engine.score(ids, start=start, adapter=adapter)).result()
            except RuntimeError:
                raise shutting_down() from None

        return QueryLikelihood(engine.tokenizer, score)

    async def ground(
        self, collections: list[str], retrieval: Retrieval, messages: list[dict[str, str]], count: Count | None = None,
        budget: int | None = None, adapter: str | None = None,
    ) -> Grounding:  # fmt: skip
        """`messages` with the best chunks for their latest user turn numbered into the system message, as many
        as fit `budget` prompt tokens (counted by `count`); the rest are reported in `Grounding.left_out`."""
        query = search_query(messages)
        found = await self.search(collections, retrieval, query, adapter)
        return await anyio.to_thread.run_sync(lambda: rag_grounding.ground(  # counting tokenizes: off the loop
            messages, found, count=count, budget=budget, citations=retrieval.citations, refusal=retrieval.refusal,
            query=query, collections=collections, mode=retrieval.mode,
        ))  # fmt: skip

    async def tool_round(
        self, route: Route, collections: list[str], retrieval: Retrieval, messages: list[dict[str, str]],
        count: Count | None = None, budget: int | None = None,
    ) -> Grounding:  # fmt: skip
        """Let the model call `search_knowledge` (see the module docstring); the grounding of its answer."""
        service = self.service
        engine = service.engine
        assert engine is not None
        plan = tools.ToolPlan([SEARCH_TOOL], retrieval.tool_choice, parallel=False)
        grammar = plan.grammar()
        native = engine.tokenizer.knows_tools
        specs = [{"type": "function", "function": SEARCH_TOOL}] if native else None
        prompt = messages if native else with_system(messages, tools.system_prompt([SEARCH_TOOL]))
        ids = await anyio.to_thread.run_sync(engine.encode_chat, prompt, specs)
        room = service.generation.budget(None, len(ids), "messages", "max_tokens")
        params = SamplingParams(max_new_tokens=min(SEARCH_CALL_TOKENS, room), temperature=0.0, grammar=grammar)
        job = Job(new_id("search"), route.model, [ids], [params], [], len(ids), adapter=route.adapter)
        finals = await service.generation.collect(job, service.generation.submit(job))
        query = _query_of(tools.tool_calls(plan, finals[0].text)[1])
        if query is None:
            return Grounding(list(messages), [], [], "", list(collections), retrieval.citations, "tool",
                             "the model answered without searching")  # fmt: skip
        found = await self.search(collections, retrieval, query, route.adapter)
        call = {"role": "assistant", "content": tools.format_call(SEARCH_TOOL["name"], {"query": query})}

        def render(sources: list[rag_grounding.Source]) -> list[dict[str, str]]:
            result = tool_result(sources, retrieval.citations)
            return [*messages, call, {"role": "user", "content": f"<tool_response>\n{result}\n</tool_response>"}]

        return await anyio.to_thread.run_sync(lambda: rag_grounding.ground(
            messages, found, count=count, budget=budget, citations=retrieval.citations, query=query,
            collections=collections, mode="tool", render=render,
        ))  # fmt: skip


def _query_of(calls: list[dict[str, Any]]) -> str | None:
    """The query of the first complete `search_knowledge` call, or None (no call, or an empty query)."""
    for call in calls:
        if call["function"]["name"] == SEARCH_TOOL["name"]:
            try:
                query = json.loads(call["function"]["arguments"]).get("query")
            except (ValueError, AttributeError):
                return None
            return query if isinstance(query, str) and query.strip() else None
    return None
