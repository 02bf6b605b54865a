"""Query-likelihood reranking (`rag/rerank.py`): the score against transformers on the bundled SmolLM2, the
fusion of the two orders, and the reranked search over a real collection."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from sqlalchemy import Engine

from mini_claude.encoder import Encoder
from mini_claude.generate import TokenLogprob
from mini_claude.rag.knowledge import Knowledge
from mini_claude.rag.rerank import QueryLikelihood, passage_text, rerank
from mini_claude.rag.retrieve import Hit

PASSAGES = {
    "shuffle": "random.shuffle(x): Shuffle the sequence x in place, putting its items in a random order.",
    "bread": "Knead the dough for ten minutes, then let it rise in a warm place until it doubles in size.",
    "sockets": "A TCP socket connects two programs over a network; call connect() with a host and a port.",
    "tax": "Income tax is paid on wages and profits; the rate rises with the amount that is earned.",
}
QUESTIONS = {
    "How do I put the items of my list in a random order?": "shuffle",
    "How long should I knead the dough?": "bread",
    "How does my program talk to another one over the network?": "sockets",
}


class ToyTokenizer:
    """One token per character (its code point): enough to see which tokens are scored."""

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]


def toy_scores(ids: Sequence[int], *, start: int) -> list[TokenLogprob | None]:
    return [None] * start + [TokenLogprob(i, -i / 1000) for i in ids[start:]]


def test_the_score_is_the_mean_log_probability_of_the_question_tokens() -> None:
    model = QueryLikelihood(ToyTokenizer(), toy_scores, max_passage_tokens=5)
    ids, start = model.prompt_ids("ab", "Long passage")
    assert ids[:start] == [ord(c) for c in "Passage: "[:5]] + [ord(c) for c in model_instruction()]
    assert ids[start:] == [ord(" "), ord("a"), ord("b")]  # the question, after a space, is what is scored
    assert model.score("ab", "Long passage") == pytest.approx(-(32 + 97 + 98) / 3 / 1000)


def model_instruction() -> str:
    from mini_claude.rag.rerank import INSTRUCTION

    return INSTRUCTION


def test_the_score_equals_transformers_on_the_bundled_model(ours_bundled_fp32: Any, hf_bundled: Any) -> None:
    hf, _ = hf_bundled
    engine = ours_bundled_fp32
    model = QueryLikelihood(engine.tokenizer, engine.score)
    for question, name in QUESTIONS.items():
        ids, start = model.prompt_ids(question, PASSAGES[name])
        with torch.no_grad():
            logits = hf(torch.tensor([ids])).logits[0, :-1].float()
        logprobs = torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
        expected = logprobs[start - 1 :].mean().item()  # position t-1 predicts token t
        assert model.score(question, PASSAGES[name]) == pytest.approx(expected, abs=1e-3)


def test_the_bundled_model_finds_each_question_most_likely_after_its_own_passage(ours_bundled_fp32: Any) -> None:
    model = QueryLikelihood(ours_bundled_fp32.tokenizer, ours_bundled_fp32.score)
    names = list(PASSAGES)
    for question, answer in QUESTIONS.items():
        scores = model.scores(question, [PASSAGES[n] for n in names])
        assert names[max(range(len(names)), key=scores.__getitem__)] == answer, (question, scores)


class FixedModel(QueryLikelihood):
    """Scores passages from a table (the passage text is the key)."""

    def __init__(self, table: dict[str, float]) -> None:
        self.table = table
        self.read: list[str] = []

    def score(self, query: str, passage: str) -> float:
        self.read.append(passage)
        return self.table[passage]


def test_rerank_fuses_the_first_stage_rank_with_the_model_s() -> None:
    hits = [Hit(i, 1.0 - i / 10, text=f"p{i}", filename="notes.txt") for i in range(6)]
    model = FixedModel({"p0": -3.0, "p1": -2.0, "p2": -0.5, "p3": -0.1, "p4": -9.0, "p5": 0.0})
    out = rerank("q", hits, model, k=4, depth=4, rrf_k=60)
    assert model.read == ["p0", "p1", "p2", "p3"]  # only `depth` passages are read
    # fused: p0 1/61+1/64, p1 1/62+1/63, p2 1/63+1/62, p3 1/64+1/61: p0/p3 tie (first stage wins), p1/p2 tie
    assert [h.chunk_id for h in out] == [0, 3, 1, 2]
    assert {h.chunk_id: h.ranks["rerank"] for h in out} == {3: 1, 2: 2, 1: 3, 0: 4}
    assert out[0].score == pytest.approx(1 / 61 + 1 / 64)
    # depth 3: p0 1/61+1/63 > p1 2/62, p2 1/63+1/61 ties p0; the hits past `depth` follow in their order
    deeper = rerank("q", [Hit(i, 0.0, text=f"p{i}") for i in range(6)], model, k=6, depth=3)
    assert [h.chunk_id for h in deeper] == [0, 2, 1, 3, 4, 5] and "rerank" not in deeper[3].ranks


def test_passage_text_is_what_the_encoder_embeds() -> None:
    hit = Hit(1, 0.0, text="Use :func:`random.shuffle`.", heading="random > Functions", filename="random.rst.txt")
    assert passage_text(hit) == "random > Functions\nUse random.shuffle."
    plain = Hit(1, 0.0, text="Use :func:`x`.", heading="", filename="a.txt")
    assert passage_text(plain) == "Use :func:`x`."


@pytest.mark.slow
def test_a_reranked_search_reorders_the_first_stage_hits(
    db: Engine, minilm: Encoder, tmp_path: Path, ours_bundled_fp32: Any
) -> None:
    (tmp_path / "docs").mkdir()
    for name, text in PASSAGES.items():
        (tmp_path / "docs" / f"{name}.txt").write_text(text + "\n")
    knowledge = Knowledge(db, minilm)
    knowledge.ingest([tmp_path / "docs"], "notes")
    model = QueryLikelihood(ours_bundled_fp32.tokenizer, ours_bundled_fp32.score)
    for question, answer in QUESTIONS.items():
        first = knowledge.search(question, "notes", 4)
        hits = knowledge.search(question, "notes", 2, reranker=model)
        assert len(hits) == 2 and hits[0].filename == f"{answer}.txt"
        before = {h.chunk_id: h.ranks for h in first}  # 4 chunks in all: every one is in the first stage's 4
        for h in hits:
            assert h.ranks.pop("rerank") in range(1, 5) and h.ranks == before[h.chunk_id]
