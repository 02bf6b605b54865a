"""Re-ranking by query likelihood: the chat model reads each candidate passage with the question.

The first-stage searches score a question and a passage apart (BM25 over words, one vector each), so a
passage that shares the topic but not the answer (the section beside the entry, another function of the
same module) often outranks the entry. A reranker reads the two together. No cross-encoder ships with this
project and none can be downloaded here, but the chat model is a reader: UPR (Sachan et al., 2022,
"Improving Passage Retrieval with Zero-Shot Question Generation") scores a passage by how likely a language
model finds the question after it, the mean log-probability of the question's tokens given

    Passage: <heading path and text>
    Please write a question based on this passage.
    Question: <the question>

Design choices:
- The mean, not the sum, of the question's log-probabilities, as in UPR: every candidate is scored on the
  same question, so the two order alike; the mean keeps scores comparable across questions of any length.
- The raw prompt above rather than the chat template: on the Python-docs dev questions both were measured
  and the raw prompt ranked better (see docs/rag.md).
- The final order is reciprocal rank fusion of the first-stage order and the likelihood order over the `depth`
  candidates, not the likelihood order alone: the 135M model's judgement is noisy, and on the dev questions
  the fused order beat both (hit@5 0.857 against 0.786 reranked alone and 0.607 before; docs/rag.md).
- What the model reads is what the encoder embeds (`chunking.embed_text`: the heading path, then the text
  without reST markup), cut to `max_passage_tokens` of the chat model's tokens: the cost is one forward
  over every candidate's passage, and it grows with their length.
- No model here: `QueryLikelihood` takes the tokenizer and a scoring function (the engine's `score`, run on
  the server's scheduler thread by the server), so `rag/` knows nothing of engines or HTTP.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from mini_claude.rag.chunking import embed_text
from mini_claude.rag.readers import markup_of
from mini_claude.rag.retrieve import RRF_K, Hit

RERANK_DEPTH = 20  # first-stage candidates the model reads
MAX_PASSAGE_TOKENS = 320  # chat-model tokens of a passage (a 256-piece chunk is ~250-300 of SmolLM2's)
INSTRUCTION = "\nPlease write a question based on this passage.\nQuestion:"


class TokenScore(Protocol):
    logprob: float


class Scorer(Protocol):
    """log P(token | the tokens before it) for each token from `start` on, None before (`Engine.score`)."""

    def __call__(self, ids: Sequence[int], *, start: int) -> Sequence[TokenScore | None]: ...


class QueryLikelihood:
    """Scores passages by the mean log-probability of a question after them, under a causal language model.

    Args:
        tokenizer: the model's tokenizer (anything with `encode(text) -> list[int]`).
        score: log-probabilities of each token of a sequence given those before it (`Engine.score`).
        max_passage_tokens: passages are cut to this many tokens (their start kept).
    """

    def __init__(self, tokenizer: Any, score: Scorer, max_passage_tokens: int = MAX_PASSAGE_TOKENS) -> None:
        self.tokenizer = tokenizer
        self.score_ids = score
        self.max_passage_tokens = max_passage_tokens

    def prompt_ids(self, query: str, passage: str) -> tuple[list[int], int]:
        """The token ids of passage, instruction and question, and where the question starts."""
        encode = self.tokenizer.encode
        head = encode("Passage: " + passage)[: self.max_passage_tokens] + encode(INSTRUCTION)
        return head + encode(" " + query.strip()), len(head)

    def score(self, query: str, passage: str) -> float:
        """Mean log P(question token | passage, instruction, the question's tokens before it)."""
        ids, start = self.prompt_ids(query, passage)
        logprobs = self.score_ids(ids, start=start)[start:]
        if not logprobs:
            raise ValueError("the query has no tokens")
        return sum(t.logprob for t in logprobs if t is not None) / len(logprobs)

    def scores(self, query: str, passages: Sequence[str]) -> list[float]:
        return [self.score(query, p) for p in passages]


def passage_text(hit: Hit) -> str:
    """What the reranker reads of a hit: what its chunk was embedded as (heading path, then plain text)."""
    return embed_text(hit.heading, hit.text, markup_of(Path(hit.filename or hit.source)))


def rerank(
    query: str, hits: Sequence[Hit], model: QueryLikelihood, k: int, depth: int = RERANK_DEPTH, rrf_k: int = RRF_K
) -> list[Hit]:
    """The best `k` of the first `depth` hits, by RRF of their first-stage rank and the model's rank.

    Each hit keeps its first-stage ranks; `ranks["rerank"]` is its rank by the model and `score` its fused
    score. Hits past `depth` are not read and keep their order after the reranked ones.
    """
    head, tail = list(hits[:depth]), list(hits[depth:])
    likelihood = model.scores(query, [passage_text(h) for h in head])
    by_model = sorted(range(len(head)), key=lambda i: (-likelihood[i], i))
    fused = [1.0 / (rrf_k + i + 1) for i in range(len(head))]  # the first-stage rank's share
    for rank, i in enumerate(by_model, start=1):
        fused[i] += 1.0 / (rrf_k + rank)
        head[i].ranks["rerank"] = rank
    order = sorted(range(len(head)), key=lambda i: (-fused[i], i))
    for i in order:
        head[i].score = fused[i]
    return ([head[i] for i in order] + tail)[:k]
