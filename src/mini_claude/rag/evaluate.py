"""Retrieval quality and speed on the Python documentation: hit@k and MRR for keyword, dense and hybrid search.

Two question sets over Debian's python3.11-doc reST sources, each question with its gold file and character span:
- "titles" (`data/python_docs_questions.jsonl`, built by `scripts/make_rag_questions.py`): 120 questions, 50 of
  the Python FAQ's own questions (gold: the answering section) and 70 "Which function returns ...?" questions
  made from library entries (gold: the function's entry). They copy the docs' own words, so they measure
  whether a search finds a passage quoted back at it: keyword search's home ground.
- "paraphrased" (`data/python_docs_paraphrased.jsonl`, `scripts/make_paraphrased_questions.py`): 140 questions
  written by hand in a user's words ("put the items of my list in a random order"), gold spans in the same 40
  files, split into "dev" (28) and "test" (112) so that anything tuned on them is tuned on dev only.
A retrieved chunk is a hit when it comes from the gold file and its span overlaps the gold span; hit@k counts
questions with a hit among the first k, MRR averages 1 / rank of the first hit (0 when none in the top k).

The corpus is the gold files (`corpus="gold"`, 40 files) or every reST source (`corpus="all"`, ~500 files,
~20k chunks). Ingestion is idempotent, so a second run over the same database only searches.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from mini_claude.rag.knowledge import IngestReport, Knowledge
from mini_claude.rag.rerank import QueryLikelihood
from mini_claude.rag.retrieve import MODES

PYTHON_DOCS = Path("/usr/share/doc/python3.11/html/_sources")
QUESTIONS = Path(__file__).parent / "data" / "python_docs_questions.jsonl"
PARAPHRASED = Path(__file__).parent / "data" / "python_docs_paraphrased.jsonl"
QUESTION_SETS = {"titles": QUESTIONS, "paraphrased": PARAPHRASED}
KS = (1, 5, 10)
RERANKED = "hybrid+rerank"


@dataclass
class Question:
    id: str
    question: str
    file: str  # relative to the docs folder
    start: int
    end: int
    kind: str
    answer: str | None = None
    anchor: str = ""
    split: str = ""  # "dev" or "test" in the paraphrased set; "" where a set has no split


@dataclass
class ModeResult:
    hits: dict[int, float] = field(default_factory=dict)  # k -> fraction of questions with a hit in the top k
    mrr: float = 0.0
    latency_ms: dict[str, float] = field(default_factory=dict)  # p50, p95 of one search (embedding included)
    ranks: list[int | None] = field(default_factory=list)  # per question: rank of the first hit, None if none


def figures(ranks: list[int | None], k: int = 10) -> tuple[dict[int, float], float]:
    """hit@k for each of `KS` up to k, and MRR, of the first hits' ranks."""
    n = max(len(ranks), 1)
    hits = {c: sum(1 for r in ranks if r is not None and r <= c) / n for c in KS if c <= k}
    return hits, sum(1 / r for r in ranks if r is not None) / n


def by_split(results: dict[str, ModeResult], questions: list[Question]) -> dict[str, dict[str, ModeResult]]:
    """The same results for each split of a question set ("dev", "test"); {} for a set without splits."""
    splits = sorted({q.split for q in questions if q.split})
    out: dict[str, dict[str, ModeResult]] = {}
    for split in splits:
        keep = [i for i, q in enumerate(questions) if q.split == split]
        out[split] = {}
        for mode, r in results.items():
            ranks = [r.ranks[i] for i in keep]
            hits, mrr = figures(ranks)
            out[split][mode] = ModeResult(hits, mrr, ranks=ranks)
    return out


def load_questions(path: Path = QUESTIONS, docs: Path = PYTHON_DOCS) -> list[Question]:
    """The question set, checked against the docs on this machine (a gold span must still hold its anchor)."""
    questions = [Question(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]
    for q in questions:
        text = (docs / q.file).read_text()
        if not text[q.start :].startswith(q.anchor):
            raise ValueError(f"{q.id}: {docs / q.file} differs from the one the question set was made from")
    return questions


def is_hit(hit_source: str, start: int, end: int, q: Question, docs: Path) -> bool:
    return Path(hit_source) == (docs / q.file).resolve() and start < q.end and end > q.start


def evaluate(
    knowledge: Knowledge,
    collection: str,
    questions: list[Question],
    docs: Path = PYTHON_DOCS,
    modes: tuple[str, ...] = MODES,
    k: int = 10,
    reranker: QueryLikelihood | None = None,
) -> dict[str, ModeResult]:
    """Each mode's figures; with a `reranker`, also `RERANKED` (hybrid, its top 20 re-ordered by the model)."""
    results: dict[str, ModeResult] = {}
    for mode in (*modes, RERANKED) if reranker is not None else modes:
        ranks: list[int | None] = []
        latencies: list[float] = []
        for q in questions:
            start = time.perf_counter()
            if mode == RERANKED:
                hits = knowledge.search(q.question, collection, k, "hybrid", reranker=reranker)
            else:
                hits = knowledge.search(q.question, collection, k, mode)
            latencies.append((time.perf_counter() - start) * 1e3)
            found = [i for i, h in enumerate(hits, 1) if is_hit(h.source, h.start_char, h.end_char, q, docs)]
            ranks.append(found[0] if found else None)
        hits, mrr = figures(ranks, k)
        latency = percentiles(latencies[1:] or latencies)  # the first search loads the index
        results[mode] = ModeResult(hits, mrr, latency, ranks)
    return results


def percentiles(values: list[float]) -> dict[str, float]:
    if len(values) < 2:
        return {"p50": values[0], "p95": values[0]} if values else {}
    cuts = statistics.quantiles(values, n=20, method="inclusive")
    return {"p50": statistics.median(values), "p95": cuts[18]}


def corpus_files(questions: list[Question], docs: Path, corpus: str) -> list[Path]:
    """The files to ingest: every source (`all`) or the gold files of the questions (`gold`)."""
    if corpus == "all":
        return [docs]
    return sorted({(docs / q.file) for q in questions})


def ingestion_figures(report: IngestReport) -> dict[str, float]:
    files = len(report.added) + len(report.updated)
    seconds = max(report.seconds, 1e-9)
    return {"files": files, "chunks": report.chunks, "seconds": report.seconds,
            "files_per_s": files / seconds, "chunks_per_s": report.chunks / seconds}  # fmt: skip


def chart(results: dict[str, dict[str, ModeResult]], path: Path, title: str) -> None:
    """Grouped bars, one panel per question set: hit@1/5/10 and MRR per search mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [f"hit@{c}" for c in KS] + ["MRR"]
    fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 3.8), squeeze=False)
    for ax, (name, by_mode) in zip(axes[0], results.items(), strict=True):
        width = 0.8 / len(by_mode)
        for i, (mode, r) in enumerate(by_mode.items()):
            values = [r.hits.get(c, 0.0) for c in KS] + [r.mrr]
            bars = ax.bar([x + i * width for x in range(len(metrics))], values, width, label=mode)
            ax.bar_label(bars, fmt="%.2f", fontsize=6)
        ax.set_xticks([x + width * (len(by_mode) - 1) / 2 for x in range(len(metrics))], metrics)
        ax.set_ylim(0, 1.25)  # room above the bars for the legend
        ax.set_title(f"{name} questions", fontsize=10)
        ax.legend(loc="upper center", ncol=len(by_mode), fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
