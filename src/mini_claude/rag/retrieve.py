"""Ranked lists and their fusion: reciprocal rank fusion (Cormack, Clarke & Büttcher, 2009).

RRF scores a chunk by sum over lists of 1 / (k + rank), rank counted from 1, with k = 60 as in the paper and
in LangChain's EnsembleRetriever, LlamaIndex's and Haystack's joiners. It needs no score calibration: BM25
scores and cosine similarities live on different scales, their ranks do not. A chunk found by both searches
outranks one found high by a single one, which is what makes hybrid beat either alone on mixed questions
(exact identifiers favour keywords, paraphrases favour the dense vectors).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

RRF_K = 60
MODES = ("hybrid", "keyword", "dense")


@dataclass
class Hit:
    """One retrieved chunk, with what a citation shows and how each search ranked it."""

    chunk_id: int
    score: float
    text: str = ""
    heading: str = ""
    source: str = ""
    filename: str = ""
    document_id: str = ""
    start_char: int = 0
    end_char: int = 0
    page: int | None = None
    ranks: dict[str, int] = field(default_factory=dict)  # {"keyword": 3, "dense": 1}: 1-based, where found

    def to_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


def rrf(lists: dict[str, Sequence[tuple[int, float]]], k: int = RRF_K, limit: int | None = None) -> list[Hit]:
    """Fuse ranked (id, score) lists, each best first, into one list by reciprocal rank fusion."""
    fused: dict[int, Hit] = {}
    for name, ranked in lists.items():
        for rank, (chunk_id, _) in enumerate(ranked, start=1):
            hit = fused.setdefault(chunk_id, Hit(chunk_id, 0.0))
            hit.score += 1.0 / (k + rank)
            hit.ranks[name] = rank
    hits = sorted(fused.values(), key=lambda h: (-h.score, min(h.ranks.values()), h.chunk_id))
    return hits[:limit] if limit is not None else hits


def single(name: str, ranked: Sequence[tuple[int, float]], limit: int) -> list[Hit]:
    """One search's list as hits, its own scores kept."""
    return [Hit(i, s, ranks={name: r}) for r, (i, s) in enumerate(ranked[:limit], start=1)]
