"""Grounded answers: retrieved chunks numbered in the prompt, fitted to the context, and [n] marks read back.

No HTTP here: the server (`server/grounding.py`), the CLI (`mini-claude chat --knowledge`) and the web UI all
compose these functions, so a grounded answer is built, numbered and cited the same way everywhere.

Design choices:
- The search query is the latest user turn, then the user turns just before it (`CONTEXT_TURNS`): a follow-up
  ("and how long does it bake?") names too little on its own, while the whole conversation would drown the
  question. The latest turn comes first because keyword search keeps only a query's first words.
- Sources go into the system message (the user's turn, and what is stored of the conversation, stay as
  written), numbered [1]..[k] in rank order, each with its file, page and heading so the model can tell them
  apart. The model is asked to cite with [n] marks, the convention of Perplexity, Bing chat and OpenAI's file
  search ("【n】"): a number is a few tokens, which even a 135M model can copy.
- Budget: sources are fitted greedily in rank order into what the context has left after the conversation
  and the reply's reserve, each tried with the real chat template's token count; one that does not fit is
  left out and the next (maybe shorter) one tried. Left-out chunks are reported, never dropped silently; the
  conversation itself is never cut to make room (it was trimmed to the window before).
- Citations are read from the answer: each known number cited becomes one citation, in the order first cited.
  A number that names no source is removed from the answer (`MarkFilter`, also while streaming) and never
  becomes a citation: an invented [7] must not look like evidence.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from mini_claude.rag.retrieve import Hit

CONTEXT_TURNS = 2  # earlier user turns added to the search query
QUERY_CHARS = 2000  # a longer query only slows the embedding; its first words carry the question
QUOTE_CHARS = 300  # how much of a chunk a citation quotes (a prefix of the chunk, cut at a space)
MAX_MARK_CHARS = 48  # "[12, 13][14]": held-back text longer than this is text, not marks
CitationsMode = Literal["required", "optional", "off"]

_MARK = re.compile(r"\[(\d{1,3}(?:\s*,\s*\d{1,3})*)\]")
_RUN = re.compile(r"( ?)((?:\[\d{1,3}(?:\s*,\s*\d{1,3})*\])+)")  # " [1][2, 3]": marks side by side
# What may still become (or extend) a run of marks when more text arrives: an open "[1, ", a run that the next
# piece may continue, or a space that may precede one.
_PARTIAL = re.compile(r"(?: ?(?:\[[\d,\s]*\])*\[[\d,\s]*| ?(?:\[[\d,\s]*\])+| )$")

INSTRUCTIONS: dict[str, str] = {
    "required": (
        "Answer only from the numbered sources below. After each sentence that uses a source, write its number "
        "in square brackets, like [1]. If the sources do not contain the answer, say that you do not know."
    ),
    "optional": (
        "Use the numbered sources below when they help. When you use one, write its number in square brackets "
        "after the sentence, like [1]."
    ),
    "off": "Use the sources below when they help.",
}
NO_SOURCES = "No document matched this question; say so if the answer depends on the documents."


@dataclass
class Source:
    """A chunk given to the model: its number in the prompt, where it came from, and its search result."""

    n: int | None  # None for a chunk left out (it has no number the model could cite)
    collection: str
    hit: Hit
    tokens: int = 0  # what it added to the prompt

    def ref(self) -> dict[str, Any]:
        """The short form the response's `knowledge` report lists."""
        h = self.hit
        return {"n": self.n, "collection": self.collection, "file_id": h.source, "filename": h.filename,
                "chunk_id": h.chunk_id, "page": h.page, "heading": h.heading, "score": h.score,
                "tokens": self.tokens}  # fmt: skip


@dataclass
class Grounding:
    """What retrieval did to a prompt: the messages to send, the numbered sources and the ones left out."""

    messages: list[dict[str, str]]
    sources: list[Source] = field(default_factory=list)
    left_out: list[Source] = field(default_factory=list)
    query: str = ""
    collections: list[str] = field(default_factory=list)
    citations_mode: CitationsMode = "optional"
    mode: str = "retrieve"
    note: str | None = None  # why nothing was retrieved, or what was left out, in words

    @property
    def numbers(self) -> set[int]:
        return {s.n for s in self.sources if s.n is not None}

    def cite(self, text: str, choice: int = 0) -> list[dict[str, Any]]:
        """The citations of an answer (already filtered by `MarkFilter`), one per source cited, first cited first."""
        if self.citations_mode == "off":
            return []
        by_n = {s.n: s for s in self.sources}
        return [citation(by_n[n], choice) for n in marks(text) if n in by_n]

    def clean(self, text: str) -> str:
        """`text` without the marks that name no source (what `MarkFilter` does to a stream)."""
        return strip_unknown(text, self.numbers)

    def report(self) -> dict[str, Any]:
        """The response's `knowledge` extension: what was searched, given to the model, and left out."""
        return {"collections": self.collections, "mode": self.mode, "query": self.query,
                "sources": [s.ref() for s in self.sources], "left_out": [s.ref() for s in self.left_out],
                "note": self.note}  # fmt: skip


def citation(source: Source, choice: int = 0) -> dict[str, Any]:
    """One citation: what the answer's [n] points at, precisely enough to open the document there."""
    h = source.hit
    quote = h.text if len(h.text) <= QUOTE_CHARS else h.text[: h.text.rfind(" ", 0, QUOTE_CHARS) + 1 or QUOTE_CHARS]
    return {
        "n": source.n, "choice": choice, "collection": source.collection, "file_id": h.source,
        "filename": h.filename, "chunk_id": h.chunk_id, "start_char": h.start_char, "end_char": h.end_char,
        "page": h.page, "heading": h.heading, "quote": quote.rstrip(), "score": h.score,
    }  # fmt: skip


# ------------------------------------------------------------------------------------------------ the query


def search_query(messages: Sequence[dict[str, str]], context_turns: int = CONTEXT_TURNS) -> str:
    """The latest user turn, then up to `context_turns` user turns before it (newest first); "" if none."""
    users = [m["content"] for m in messages if m["role"] == "user" and m["content"].strip()]
    if not users:
        return ""
    picked = [users[-1], *reversed(users[-1 - context_turns : -1])]
    return "\n".join(picked)[:QUERY_CHARS]


def merge_hits(found: dict[str, list[Hit]], k: int, score_threshold: float | None = None) -> list[tuple[str, Hit]]:
    """Hits of several collections as one list, best first: (collection, hit), at most k.

    Scores of one search mode are on one scale in every collection (RRF's 1/(60+rank) sums, BM25, cosine), so
    sorting by score is fair across collections.
    """
    pairs = [(name, h) for name, hits in found.items() for h in hits]
    if score_threshold is not None:
        pairs = [(name, h) for name, h in pairs if h.score >= score_threshold]
    pairs.sort(key=lambda p: -p[1].score)
    return pairs[:k]


# ------------------------------------------------------------------------------------------ the prompt


def source_header(n: int, hit: Hit) -> str:
    where = hit.filename or hit.source
    if hit.page:
        where += f", page {hit.page}"
    if hit.heading:
        where += f", {hit.heading}"
    return f"[{n}] ({where})"


def source_block(sources: Sequence[Source]) -> str:
    """The sources as the model reads them: `[n] (file, page, heading)` then the chunk's text."""
    return "\n\n".join(f"{source_header(s.n, s.hit)}\n{s.hit.text.strip()}" for s in sources if s.n is not None)


def with_system(messages: Sequence[dict[str, str]], text: str) -> list[dict[str, str]]:
    """`messages` with `text` added to the end of their system message (one is made when there is none)."""
    out = [dict(m) for m in messages]
    if out and out[0]["role"] == "system":
        out[0]["content"] = f"{out[0]['content']}\n\n{text}" if out[0]["content"] else text
        return out
    return [{"role": "system", "content": text}, *out]


def grounded_prompt(
    messages: Sequence[dict[str, str]], sources: Sequence[Source], citations: CitationsMode, refusal: str | None
) -> list[dict[str, str]]:
    """The messages with the instructions and the numbered sources in their system message."""
    if not any(s.n is not None for s in sources):
        return with_system(messages, f"{NO_SOURCES} Reply: {refusal}" if refusal else NO_SOURCES)
    instructions = INSTRUCTIONS[citations]
    if refusal and citations == "required":
        instructions = instructions.replace("say that you do not know.", f"reply: {refusal}")
    return with_system(messages, f"{instructions}\n\nSources:\n{source_block(sources)}")


def ground(
    messages: Sequence[dict[str, str]],
    found: Sequence[tuple[str, Hit]],
    *,
    count: Callable[[list[dict[str, str]]], int] | None = None,
    budget: int | None = None,
    citations: CitationsMode = "optional",
    refusal: str | None = None,
    query: str = "",
    collections: Sequence[str] = (),
    mode: str = "retrieve",
    render: Callable[[list[Source]], list[dict[str, str]]] | None = None,
) -> Grounding:
    """Number the found chunks into the prompt, as many as fit `budget` tokens (counted by `count`).

    Args:
        messages: the prompt as it would be sent without sources (system message first, if any).
        found: (collection, hit) pairs, best first (`merge_hits`).
        count: tokens of a message list under the model's chat template; with `budget`, sources that would
            take the prompt past `budget` are left out (and reported). None: every source is kept.
        budget: most prompt tokens (the context window less the reply's reserve).
        citations: how strongly to ask for [n] marks; "off" asks for none and cites nothing.
        refusal: what to answer when the sources do not hold the answer.
        query, collections, mode: recorded in the report.
        render: the prompt for a list of sources (default: `grounded_prompt`, sources in the system message;
            the knowledge tool puts them in its result instead).
    """
    if render is None:
        render = lambda sources: grounded_prompt(messages, sources, citations, refusal)  # noqa: E731
    kept: list[Source] = []
    left: list[Source] = []
    base = count(render([])) if count is not None else 0
    used = base
    for collection, hit in found:
        candidate = Source(len(kept) + 1, collection, hit)
        if count is None or budget is None:
            kept.append(candidate)
            continue
        total = count(render([*kept, candidate]))
        if total <= budget:
            candidate.tokens, used = total - used, total
            kept.append(candidate)
        else:
            candidate.n, candidate.tokens = None, total - used
            left.append(candidate)
    note = None
    if not found:
        note = "no chunk matched the query"
    elif left:
        note = f"{len(left)} of {len(found)} chunks did not fit the context budget ({budget} tokens) and were left out"
    return Grounding(render(kept), kept, left, query, list(collections), citations, mode, note)


# ------------------------------------------------------------------------------------------ the marks


def marks(text: str) -> list[int]:
    """The numbers cited in `text`, in the order first cited: "[2] ... [1, 2]" gives [2, 1]."""
    seen: dict[int, None] = {}
    for m in _MARK.finditer(text):
        for part in m.group(1).split(","):
            seen.setdefault(int(part), None)
    return list(seen)


def strip_unknown(text: str, known: set[int]) -> str:
    """Marks rewritten to name only `known` numbers: "[1, 9]" becomes "[1]", "[9][1]" becomes "[1]", and a
    " [9]" that names nothing known goes, with its space."""

    def one(m: re.Match[str]) -> str:
        numbers = [p.strip() for p in m.group(1).split(",") if int(p) in known]
        return "[" + ", ".join(numbers) + "]" if numbers else ""

    def run(m: re.Match[str]) -> str:
        kept = _MARK.sub(one, m.group(2))
        return m.group(1) + kept if kept else ""

    return _RUN.sub(run, text)


class MarkFilter:
    """Streaming `strip_unknown`: feed text pieces, get back what can be shown now.

    A piece that ends in what may still become a mark (" [", "[1", "[1, ") is held back until the mark closes
    or turns out to be text, so an unknown number is never shown, not even for a moment.
    """

    def __init__(self, known: set[int]) -> None:
        self.known = known
        self.held = ""

    def feed(self, piece: str) -> str:
        text = self.held + piece
        m = _PARTIAL.search(text)
        cut = m.start() if m is not None and len(text) - m.start() <= MAX_MARK_CHARS else len(text)
        self.held = text[cut:]
        return strip_unknown(text[:cut], self.known)

    def flush(self) -> str:
        text, self.held = self.held, ""
        return strip_unknown(text, self.known)


def sources_text(grounding: Grounding, answer: str) -> str:
    """The sources under a reply, as the terminal chat prints them: each given source, whether the answer
    cites it, and the chunks left out for lack of room."""
    cited = set(marks(answer)) & grounding.numbers
    lines = []
    for s in grounding.sources:
        h = s.hit
        where = (h.filename or h.source) + (f", page {h.page}" if h.page else "")
        where += f", {h.heading}" if h.heading else ""
        lines.append(f"  [{s.n}] {where} (chars {h.start_char}-{h.end_char}){'  cited' if s.n in cited else ''}")
    if grounding.left_out:
        names = ", ".join(f"{s.hit.filename or s.hit.source} #{s.hit.chunk_id}" for s in grounding.left_out)
        lines.append(f"  left out (no room in the context): {names}")
    if not lines:
        return f"(no source: {grounding.note or 'nothing was found'})"
    return "Sources:\n" + "\n".join(lines)


class Grounder:
    """Grounding over a `Knowledge`, for front ends without a server (`mini-claude chat --knowledge`).

    Args:
        knowledge: the `rag.knowledge.Knowledge` to search.
        collections: names or ids; resolved now, so an unknown one fails before the chat starts.
        top_k, search, rrf_k, score_threshold, citations, refusal: an agent's `retrieval` settings.
        reranker: a `rerank.QueryLikelihood` that re-orders each collection's hits (`retrieval.rerank`); may be
            set after the model has loaded.
    """

    def __init__(
        self, knowledge: Any, collections: Sequence[str], *, top_k: int = 4, search: str = "hybrid", rrf_k: int = 60,
        score_threshold: float | None = None, citations: CitationsMode = "optional", refusal: str | None = None,
        reranker: Any = None,
    ) -> None:  # fmt: skip
        self.knowledge, self.ids = knowledge, knowledge.resolve(list(collections))
        self.top_k, self.search, self.rrf_k, self.threshold = top_k, search, rrf_k, score_threshold
        self.citations, self.refusal, self.reranker = citations, refusal, reranker

    def __call__(
        self, messages: Sequence[dict[str, str]], count: Callable[[list[dict[str, str]]], int] | None = None,
        budget: int | None = None,
    ) -> Grounding:  # fmt: skip
        query = search_query(messages)
        hits: list[tuple[str, Hit]] = []
        if query:
            found = {n: self.knowledge.search(query, cid, self.top_k, self.search, self.rrf_k, self.reranker)
                     for n, cid in self.ids.items()}  # fmt: skip
            hits = merge_hits(found, self.top_k, self.threshold)
        return ground(messages, hits, count=count, budget=budget, citations=self.citations, refusal=self.refusal,
                      query=query, collections=list(self.ids))  # fmt: skip


# ------------------------------------------------------------------------------------ the knowledge tool

SEARCH_TOOL: dict[str, Any] = {
    "name": "search_knowledge",
    "description": "Search the documents for passages that answer a question. Returns numbered sources.",
    "parameters": {
        "type": "object",
        "properties": {"query": {"type": "string", "description": "What to look for, in a few words."}},
        "required": ["query"],
        "additionalProperties": False,
    },
}


def tool_result(sources: Sequence[Source], citations: CitationsMode = "optional") -> str:
    """What `search_knowledge` returns to the model: the numbered sources, and how to cite them."""
    if not any(s.n is not None for s in sources):
        return NO_SOURCES
    return f"{INSTRUCTIONS[citations]}\n\nSources:\n{source_block(sources)}"
