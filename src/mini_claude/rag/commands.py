"""`mini-claude ingest | search | remove-file | collections | eval-rag`: the retrieval commands (see `cli.COMMANDS`).

Each is a plain function whose signature and docstring become its flags. They open the project database
(settings' `database_url`, SQLite by default), build a `Knowledge` over it and print; the work is
`rag.knowledge`'s. An unreadable file is one line on stderr and ingestion goes on.
"""

from __future__ import annotations

import json as json_lib
import sys
from pathlib import Path
from typing import Literal

from mini_claude.settings import Settings

Mode = Literal["hybrid", "keyword", "dense"]
Dense = Literal["auto", "exact", "hnsw", "pgvector"]


def _knowledge(database_url: str | None, dense: Dense = "auto", max_tokens: int = 256, overlap: int = 32):  # type: ignore[no-untyped-def]
    from mini_claude.cli import UserError
    from mini_claude.db import init_db, make_engine
    from mini_claude.rag.chunking import ChunkingConfig
    from mini_claude.rag.knowledge import Knowledge

    settings = Settings()
    engine = make_engine(database_url or settings.database_url)
    init_db(engine)
    try:
        chunking = ChunkingConfig(max_tokens=max_tokens, overlap=overlap)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    return Knowledge(
        engine, chunking=chunking, dense=dense, index_dir=settings.rag_index_dir,
        embed_precision=settings.embed_precision,
    )  # fmt: skip


def ingest(
    paths: list[str],
    collection: str = "default",
    database_url: str | None = None,
    max_tokens: int = 256,
    overlap: int = 32,
    json: bool = False,
) -> None:
    """Add files and folders (recursively) to a collection; unchanged files are skipped, changed ones replaced.

    Formats: .txt .md .rst .html .pdf .docx .json .jsonl. Files that were ingested from a folder named here and
    are gone from it now are removed. Prints {added, updated, deleted, skipped} and each unreadable file.

    Args:
        paths: files or folders.
        collection: the collection to add them to (created if new).
        database_url: the database (default: settings, sqlite:///./mini_claude.db).
        max_tokens: most word pieces per chunk, [CLS]/[SEP] and heading included (the embedder's window: 256).
        overlap: word pieces repeated from one chunk at the start of the next.
        json: print the report as one JSON object.
    """
    from mini_claude.cli import UserError

    knowledge = _knowledge(database_url, max_tokens=max_tokens, overlap=overlap)
    try:
        report = knowledge.ingest(
            paths, collection, progress=not json and sys.stderr.isatty(),
            on_error=lambda source, reason: print(f"skipped {source}: {reason}", file=sys.stderr),
        )  # fmt: skip
    except FileNotFoundError as exc:
        raise UserError(str(exc)) from None
    counts = report.counts()
    if json:
        print(json_lib.dumps({**counts, "chunks": report.chunks, "seconds": round(report.seconds, 3),
                              "failed_files": [{"file": f, "reason": r} for f, r in report.failed]}))  # fmt: skip
        return
    rate = report.chunks / report.seconds if report.seconds else 0.0
    print(
        f"{collection}: added {counts['added']}, updated {counts['updated']}, deleted {counts['deleted']}, "
        f"skipped {counts['skipped']}, failed {counts['failed']}; {report.chunks} chunks in {report.seconds:.1f}s "
        f"({rate:.1f} chunks/s)"
    )


def _chat_model_reranker(model: str | None = None):  # type: ignore[no-untyped-def]
    """A query-likelihood reranker over the chat model (`--model`, else the settings' model)."""
    from mini_claude.cli import load_engine
    from mini_claude.rag.rerank import QueryLikelihood

    engine = load_engine(model, Settings(), quiet=True)
    return QueryLikelihood(engine.tokenizer, engine.score)


def search(
    query: str,
    collection: str = "default",
    k: int = 5,
    mode: Mode = "hybrid",
    database_url: str | None = None,
    dense: Dense = "auto",
    json: bool = False,
    rerank: bool = False,
    model: str | None = None,
) -> None:
    """Search a collection: the chunks that best answer QUERY, with file, page, heading and character span.

    Args:
        query: the question or keywords.
        collection: the collection to search.
        k: how many chunks.
        mode: hybrid (keyword and dense fused by reciprocal rank), keyword (BM25) or dense (embeddings).
        database_url: the database (default: settings, sqlite:///./mini_claude.db).
        dense: the dense index: exact, hnsw, pgvector (PostgreSQL), or auto (pgvector where the database has it,
            else HNSW from 50k chunks).
        json: print a JSON list of hits.
        rerank: re-order the best 20 by how likely the chat model finds the query after each (slower: the
            model reads every one; `rag/rerank.py`).
        model: the chat model that reranks (default: the settings' model).
    """
    from mini_claude.cli import UserError
    from mini_claude.rag.store import CollectionError

    knowledge = _knowledge(database_url, dense)
    try:
        knowledge.resolve([collection])  # an unknown collection is one line before the model loads
        reranker = _chat_model_reranker(model) if rerank else None
        hits = knowledge.search(query, collection, k, mode, reranker=reranker)
    except CollectionError as exc:
        raise UserError(str(exc)) from None
    if json:
        print(json_lib.dumps([h.to_dict() for h in hits], ensure_ascii=False, indent=2))
        return
    for n, h in enumerate(hits, 1):
        where = f"{h.source}" + (f" p.{h.page}" if h.page else "") + f" [{h.start_char}:{h.end_char}]"
        ranks = ", ".join(f"{name} #{rank}" for name, rank in h.ranks.items())
        print(f"[{n}] {where}  ({ranks}; score {h.score:.4f})")
        if h.heading:
            print(f"    {h.heading}")
        print("    " + " ".join(h.text.split())[:300])


def remove_file(paths: list[str], collection: str = "default", database_url: str | None = None) -> None:
    """Remove files (or every file under a folder) from a collection, with their chunks.

    Args:
        paths: files or folders, as they were ingested.
        collection: the collection to remove them from.
        database_url: the database (default: settings, sqlite:///./mini_claude.db).
    """
    from mini_claude.cli import UserError
    from mini_claude.rag.store import CollectionError

    try:
        removed = _knowledge(database_url).remove(paths, collection)
    except CollectionError as exc:
        raise UserError(str(exc)) from None
    for source in removed:
        print(f"removed {source}")
    if not removed:
        raise UserError(f"none of {', '.join(paths)} is in collection {collection!r}")


def collections(database_url: str | None = None) -> None:
    """List the collections with their document and chunk counts.

    Args:
        database_url: the database (default: settings, sqlite:///./mini_claude.db).
    """
    from mini_claude.db import session_scope
    from mini_claude.rag import store

    knowledge = _knowledge(database_url)
    with session_scope(knowledge.db) as session:
        for c in store.list_collections(session):
            n_docs = len(store.list_documents(session, c.id))
            print(f"{c.name:24} {n_docs:6} files {store.count_chunks(session, c.id):8} chunks  {c.embedder}")


def eval_rag(
    docs: str = "/usr/share/doc/python3.11/html/_sources",
    corpus: Literal["gold", "all"] = "gold",
    questions: Literal["titles", "paraphrased", "both"] = "both",
    database_url: str = "sqlite:///./rag-eval.db",
    collection: str = "python-docs",
    max_questions: int | None = None,
    dense: Dense = "auto",
    chart: str | None = None,
    json: bool = False,
    rerank: bool = False,
    split: Literal["all", "dev", "test"] = "all",
) -> None:
    """Measure retrieval on the Python docs: hit@1/5/10 and MRR of keyword, dense and hybrid search over two
    question sets with gold spans (120 that copy the docs' titles and sentences, 140 paraphrased by hand),
    ingestion throughput, and search latency (p50/p95).

    Needs Debian's python3.11-doc (apt-get install python3.11-doc). Ingestion is idempotent: a second run on the
    same database only searches.

    Args:
        docs: the reST sources of the Python documentation.
        corpus: gold (the 40 files that hold the answers) or all (every source file, ~20k chunks).
        questions: which question set(s): titles, paraphrased or both.
        database_url: where the evaluation's collection is stored (its own SQLite file by default).
        collection: the collection name.
        max_questions: evaluate only the first N questions of each set (a quick check).
        dense: the dense index: exact, hnsw, pgvector, or auto.
        chart: write a PNG bar chart of the results here.
        json: print the figures as one JSON object.
        rerank: also measure hybrid search re-ranked by the bundled chat model (`rag.rerank`; slow: the model
            reads 20 passages per question).
        split: the paraphrased set's dev or test split only (tune on dev; the titles set has no split).
    """
    from mini_claude.cli import UserError
    from mini_claude.rag import evaluate as ev

    root = Path(docs)
    if not root.is_dir():
        raise UserError(f"{docs} is missing: apt-get install python3.11-doc")
    names = list(ev.QUESTION_SETS) if questions == "both" else [questions]
    try:
        sets = {name: ev.load_questions(ev.QUESTION_SETS[name], docs=root) for name in names}
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if split != "all":
        sets = {name: [q for q in qs if q.split in ("", split)] for name, qs in sets.items()}
    sets = {name: qs[:max_questions] if max_questions else qs for name, qs in sets.items()}
    reranker = _chat_model_reranker() if rerank else None
    knowledge = _knowledge(database_url, dense)
    report = knowledge.ingest(
        ev.corpus_files([q for qs in sets.values() for q in qs], root, corpus), collection,
        progress=not json and sys.stderr.isatty(),
        on_error=lambda source, reason: print(f"skipped {source}: {reason}", file=sys.stderr),
    )  # fmt: skip
    results = {name: ev.evaluate(knowledge, collection, qs, root, reranker=reranker) for name, qs in sets.items()}
    from mini_claude.db import session_scope
    from mini_claude.rag import store

    with session_scope(knowledge.db) as session:
        coll = store.get_collection(session, collection)
        n_chunks = store.count_chunks(session, coll.id) if coll else 0
    splits = {f"{name} {split}": by_mode for name in results
              for split, by_mode in ev.by_split(results[name], sets[name]).items()}  # fmt: skip
    figures = {
        "corpus_chunks": n_chunks, "ingestion": ev.ingestion_figures(report),
        "embed_precision": knowledge.encoder.precision,
        "sets": {name: {"questions": len(sets[name]), "modes": {
            m: {"hit": {str(c): v for c, v in r.hits.items()}, "mrr": r.mrr, "latency_ms": r.latency_ms}
            for m, r in by_mode.items()}} for name, by_mode in results.items()},
        "splits": {name: {"questions": len(next(iter(by_mode.values())).ranks), "modes": {
            m: {"hit": {str(c): v for c, v in r.hits.items()}, "mrr": r.mrr} for m, r in by_mode.items()}}
            for name, by_mode in splits.items()},
    }  # fmt: skip
    if chart:
        ev.chart(results, Path(chart), f"Retrieval on the Python docs ({n_chunks} chunks)")
    if json:
        print(json_lib.dumps(figures, indent=2))
        return
    ing = figures["ingestion"]
    print(f"{n_chunks} chunks; embeddings in {figures['embed_precision']}")
    if ing["chunks"]:
        print(f"ingestion: {ing['files']} files, {ing['chunks']} chunks in {ing['seconds']:.1f}s "
              f"({ing['files_per_s']:.2f} files/s, {ing['chunks_per_s']:.1f} chunks/s)")  # fmt: skip
    for name, by_mode in {**results, **splits}.items():
        print(f"\n{name}: {len(next(iter(by_mode.values())).ranks)} questions")
        print(f"{'mode':13} {'hit@1':>6} {'hit@5':>6} {'hit@10':>6} {'MRR':>6} {'p50 ms':>8} {'p95 ms':>8}")
        for mode, r in by_mode.items():
            p50, p95 = (f"{r.latency_ms[p]:8.1f}" if r.latency_ms else f"{'-':>8}" for p in ("p50", "p95"))
            print(f"{mode:13} {r.hits.get(1, 0):6.3f} {r.hits.get(5, 0):6.3f} {r.hits.get(10, 0):6.3f} {r.mrr:6.3f} "
                  f"{p50} {p95}")  # fmt: skip
