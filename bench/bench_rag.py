"""Retrieval benchmark: the embedder against sentence-transformers, our HNSW against usearch and exact search,
ingestion throughput, and search latency at 1k / 10k / 100k chunks.

- **embedding**: chunks/s of `Encoder.embed` and of `SentenceTransformer.encode` on the same chunks (real
  Python-docs chunks of ~200 word pieces), same batch size, in float32 and in bf16 (autocast for both), and how
  far each is from sentence-transformers' float32 vectors.
- **ANN**: for each size, build time, query latency p50/p95 and recall@10 against exact search, for our HNSW
  (M 16, ef_construction 128, ef_search 64 and 128) and usearch (the same M and expansions), and the exact
  index's latency. Vectors are real chunk embeddings when `--vectors FILE.npy` is given, else synthetic ones
  shaped like them (unit vectors around clusters in a 24-d subspace of 384-d, plus noise).
- **ingestion**: files/s and chunks/s of `Knowledge.ingest` over a fresh SQLite database (reading, chunking,
  embedding, writing, keyword index), with `--ingest-files` files of the Python docs, float32 and "auto".
- **search latency**: p50/p95 of `Knowledge.search` (keyword, dense, hybrid; query embedding included) on a
  SQLite collection filled with N chunks (texts of real chunks, vectors as above), dense "auto" (exact below
  50k chunks, HNSW above).

Run on a quiet machine (the figures are wall clock), e.g.

    .venv/bin/python bench/bench_rag.py --sizes 1000,10000,100000 --out bench/rag.json --chart docs/rag_bench.png

and smoke-test it with `--sizes 500 --embed-chunks 16 --ingest-files 2 --queries 10`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mini_claude.db import init_db, make_engine, session_scope
from mini_claude.encoder import Encoder, model_dir, native_bf16, resolve_precision
from mini_claude.rag import store
from mini_claude.rag.chunking import chunk_document
from mini_claude.rag.evaluate import PYTHON_DOCS, load_questions
from mini_claude.rag.index import ExactIndex, HNSWIndex
from mini_claude.rag.knowledge import Knowledge
from mini_claude.rag.readers import read


def pcts(ms: list[float]) -> dict[str, float]:
    q = statistics.quantiles(ms, n=20, method="inclusive") if len(ms) > 1 else ms * 19
    return {"p50": round(statistics.median(ms), 3), "p95": round(q[18], 3)}


def docs_chunks(encoder: Encoder, limit: int) -> list[str]:
    texts: list[str] = []
    for path in sorted((PYTHON_DOCS / "library").glob("*.rst.txt")):
        texts += [c.embed_text for c in chunk_document(read(path), encoder.tokenizer) if c.n_tokens >= 150]
        if len(texts) >= limit:
            break
    return texts[:limit]


def bench_embedding(encoder: Encoder, n: int, batch: int, rounds: int = 2) -> dict[str, object]:
    """chunks/s of ours and of sentence-transformers on the same chunks and batches, in float32 and in bf16
    (ours: `precision="bf16"`; theirs: the same `torch.autocast`), each the best of `rounds` runs taken in turn
    so a load that comes and goes touches all of them alike; and how far each is from sentence-transformers'
    float32 vectors (max abs difference, worst cosine)."""
    texts = docs_chunks(encoder, n)
    ours = {p: Encoder(encoder.model, encoder.tokenizer, encoder.name, precision=p) for p in ("fp32", "bf16")}
    runs: dict[str, object] = {f"ours_{p}": (lambda t, e=e: e.embed(t, batch)) for p, e in ours.items()}
    try:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(str(model_dir()), device="cpu")

        def st_encode(t: list[str], bf16: bool) -> torch.Tensor:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                return st.encode(t, batch_size=batch, convert_to_tensor=True).float()

        runs["sentence_transformers_fp32"] = lambda t: st_encode(t, False)
        runs["sentence_transformers_bf16"] = lambda t: st_encode(t, True)
    except ImportError:
        pass
    result: dict[str, object] = {"chunks": len(texts), "batch_size": batch, "native_bf16": native_bf16(),
                                 "auto_precision": resolve_precision("auto")}  # fmt: skip
    best: dict[str, float] = {}
    vectors: dict[str, torch.Tensor] = {}
    for run in runs.values():
        run(texts[:batch])  # warm up
    for _ in range(rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            vectors[name] = run(texts)  # type: ignore[operator]
            best[name] = max(best.get(name, 0.0), len(texts) / (time.perf_counter() - start))
    result["chunks_per_s"] = {name: round(v, 2) for name, v in best.items()}
    reference = vectors.get("sentence_transformers_fp32")
    if reference is not None:
        result["vs_sentence_transformers_fp32"] = {
            name: {"max_abs_diff": float((v - reference).abs().max()),
                   "min_cosine": float((v * reference).sum(-1).min())}
            for name, v in vectors.items() if name != "sentence_transformers_fp32"
        }  # fmt: skip
    return result


def synthetic_vectors(n: int, dim: int = 384, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    basis = rng.normal(size=(24, dim))
    centres = rng.normal(size=(max(n // 200, 20), 24))
    x = (centres[rng.integers(0, len(centres), n)] + 0.6 * rng.normal(size=(n, 24))) @ basis
    x += 0.15 * np.linalg.norm(basis, axis=0).mean() * rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def bench_ann(vectors: np.ndarray, n_queries: int, pg_url: str | None = None) -> dict[str, object]:
    n, dim = vectors.shape
    rng = np.random.default_rng(1)
    queries = vectors[rng.integers(0, n, n_queries)] + 0.05 * rng.normal(size=(n_queries, dim)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    exact = ExactIndex(dim)
    exact.add(np.arange(n), vectors)
    truth, ms = [], []
    for q in queries:
        t = time.perf_counter()
        truth.append(set(exact.search(q, 10)[0].tolist()))
        ms.append((time.perf_counter() - t) * 1e3)
    out: dict[str, object] = {"n": n, "exact": {"latency_ms": pcts(ms)}}

    def measure(search) -> dict[str, object]:  # type: ignore[no-untyped-def]
        ms, hits = [], 0
        for q, want in zip(queries, truth, strict=True):
            t = time.perf_counter()
            labels = search(q)
            ms.append((time.perf_counter() - t) * 1e3)
            hits += len(set(np.asarray(labels).tolist()) & want)
        return {"latency_ms": pcts(ms), "recall_at_10": hits / (10 * len(queries))}

    hnsw = HNSWIndex(dim, M=16, ef_construction=128)
    hnsw.add(np.arange(min(n, 100)), vectors[:100])  # compile the numba kernels outside the timing
    hnsw = HNSWIndex(dim, M=16, ef_construction=128)
    t = time.perf_counter()
    hnsw.add(np.arange(n), vectors)
    ours: dict[str, object] = {"build_s": time.perf_counter() - t}
    for ef in (64, 128):
        ours[f"ef{ef}"] = measure(lambda q, ef=ef: hnsw.search(q, 10, ef)[0])
    out["hnsw"] = ours
    try:
        from usearch.index import Index
    except ImportError:
        return out
    u = Index(ndim=dim, metric="cos", connectivity=16, expansion_add=128, expansion_search=64)
    t = time.perf_counter()
    u.add(np.arange(n), vectors)
    theirs: dict[str, object] = {"build_s": time.perf_counter() - t, "threads": "usearch default"}
    for ef in (64, 128):
        u.expansion_search = ef
        theirs[f"ef{ef}"] = measure(lambda q: u.search(q, 10).keys)
    out["usearch"] = theirs
    if pg_url is not None:
        out["pgvector"] = bench_pgvector(pg_url, vectors, queries, measure)
    return out


def bench_pgvector(url: str, vectors: np.ndarray, queries: np.ndarray, measure) -> dict[str, object]:  # type: ignore[no-untyped-def]
    """pgvector's HNSW on the same vectors (M 16, ef_construction 128, cosine): rows loaded with COPY, the index
    built after (pgvector's bulk build, `maintenance_work_mem` 1 GB so the graph is built in memory), queries
    over one connection as `Knowledge.search` sends them (`ORDER BY v <=> q LIMIT 10`)."""
    import psycopg

    dim = vectors.shape[1]
    literal = [("[" + ",".join(f"{x:.9g}" for x in row) + "]") for row in vectors.tolist()]
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS bench_vectors")
        conn.execute(f"CREATE TABLE bench_vectors (id bigint PRIMARY KEY, v vector({dim}))")
        with conn.cursor().copy("COPY bench_vectors (id, v) FROM STDIN") as copy:
            for i, v in enumerate(literal):
                copy.write_row((i, v))
        conn.execute("SET maintenance_work_mem = '1GB'")
        t = time.perf_counter()
        conn.execute(
            "CREATE INDEX ON bench_vectors USING hnsw (v vector_cosine_ops) WITH (m = 16, ef_construction = 128)"
        )
        workers = conn.execute("SHOW max_parallel_maintenance_workers").fetchone()
        result: dict[str, object] = {"build_s": time.perf_counter() - t, "parallel_workers": workers}
        for ef in (64, 128):
            conn.execute(f"SET hnsw.ef_search = {ef}")

            def search(q: np.ndarray) -> list[int]:
                q_text = "[" + ",".join(f"{x:.9g}" for x in q.tolist()) + "]"
                rows = conn.execute("SELECT id FROM bench_vectors ORDER BY v <=> %s::vector LIMIT 10", (q_text,))
                return [r[0] for r in rows]

            result[f"ef{ef}"] = measure(search)
        conn.execute("DROP TABLE bench_vectors")
    return result


def bench_ingestion(encoder: Encoder, n_files: int) -> dict[str, object]:
    """`Knowledge.ingest` of the first n library files into a fresh SQLite database, with the float32 encoder
    (the path before bf16) and with the one "auto" chooses on this CPU. The process's CPU seconds and the load
    average are kept beside the wall clock: on a shared machine chunks per CPU second is the steadier figure."""
    files = sorted((PYTHON_DOCS / "library").glob("*.rst.txt"))[:n_files]
    out: dict[str, object] = {"files": len(files)}
    for precision in dict.fromkeys(("fp32", resolve_precision("auto"))):
        run = Encoder(encoder.model, encoder.tokenizer, encoder.name, precision=precision)  # type: ignore[arg-type]
        with tempfile.TemporaryDirectory() as tmp:
            db = make_engine(f"sqlite:///{tmp}/ingest.db")
            init_db(db)
            cpu = time.process_time()
            report = Knowledge(db, run).ingest(files, "bench")
            cpu = time.process_time() - cpu
            db.dispose()
        seconds = report.seconds
        out[precision] = {"chunks": report.chunks, "seconds": round(seconds, 2), "cpu_seconds": round(cpu, 2),
                          "files_per_s": len(files) / seconds, "chunks_per_s": report.chunks / seconds,
                          "load_average": os.getloadavg()[0]}  # fmt: skip
    return out


def bench_search(encoder: Encoder, n: int, texts: list[str], vectors: np.ndarray, n_queries: int) -> dict[str, object]:
    """Search latency on a collection of n chunks (texts of real chunks cycled, vectors given)."""
    from mini_claude.rag.chunking import Chunk

    questions = [q.question for q in load_questions()]
    with tempfile.TemporaryDirectory() as tmp:
        db = make_engine(f"sqlite:///{tmp}/search.db")
        init_db(db)
        with session_scope(db) as session:
            coll = store.ensure_collection(session, "bench", encoder.name, encoder.dim)
            per_doc = 500
            for d in range(0, n, per_doc):
                chunks = [Chunk(texts[i % len(texts)], 0, 1, "", 200, seq=i - d) for i in range(d, min(n, d + per_doc))]
                store.put_document(
                    session, coll.id, f"doc{d}", f"doc{d}.md", "x", 0, chunks, vectors[d : d + len(chunks)]
                )
        knowledge = Knowledge(db, encoder, index_dir=Path(tmp) / "index")
        out: dict[str, object] = {"n": n}
        t = time.perf_counter()
        knowledge.search("warm up", "bench", 10, "dense")  # loads (and, above 50k, builds) the dense index
        out["dense_index_load_s"] = time.perf_counter() - t
        for mode in ("keyword", "dense", "hybrid"):
            ms = []
            for q in questions[:n_queries]:
                t = time.perf_counter()
                knowledge.search(q, "bench", 10, mode)
                ms.append((time.perf_counter() - t) * 1e3)
            out[mode] = pcts(ms)
        db.dispose()
    return out


def chart(results: dict[str, object], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    ann = results.get("ann", [])
    sizes = [r["n"] for r in ann]  # type: ignore[index]
    for name, key in (("HNSW (ours) ef64", ("hnsw", "ef64")), ("HNSW (ours) ef128", ("hnsw", "ef128")),
                      ("usearch ef64", ("usearch", "ef64")), ("usearch ef128", ("usearch", "ef128")),
                      ("pgvector ef64", ("pgvector", "ef64")), ("pgvector ef128", ("pgvector", "ef128"))):  # fmt: skip
        rec = [r.get(key[0], {}).get(key[1], {}).get("recall_at_10") for r in ann]  # type: ignore[union-attr]
        if all(v is not None for v in rec) and rec:
            a.plot(sizes, rec, marker="o", label=name)
    a.set_xscale("log")
    a.set_title("recall@10 vs exact", fontsize=10)
    a.legend(fontsize=7)
    search = results.get("search", [])
    for mode in ("keyword", "dense", "hybrid"):
        b.plot([r["n"] for r in search], [r[mode]["p95"] for r in search], marker="o", label=f"{mode} p95")  # type: ignore[index]
    b.set_xscale("log")
    b.set_ylabel("ms")
    b.set_title("search latency (query embedding included)", fontsize=10)
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--embed-chunks", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--ingest-files", type=int, default=10)
    parser.add_argument("--vectors", help="a .npy of real (n, 384) unit embeddings to use instead of synthetic ones")
    parser.add_argument(
        "--pgvector", action="store_true", help="also pgvector's HNSW, on the pgserver wheel's PostgreSQL"
    )
    parser.add_argument("--parts", default="embedding,ingestion,search", help="which parts to run (comma-separated)")
    parser.add_argument("--out")
    parser.add_argument("--chart")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    encoder = Encoder.load()  # search uses what "auto" picks; the embedding bench runs both precisions
    results: dict[str, object] = {"torch_threads": torch.get_num_threads(), "cpus": os.cpu_count()}
    parts = set(args.parts.split(","))
    if "embedding" in parts:
        results["embedding"] = bench_embedding(encoder, args.embed_chunks, args.batch_size)
        print(json.dumps(results["embedding"]), flush=True)
    if "ingestion" in parts:
        results["ingestion"] = bench_ingestion(encoder, args.ingest_files)
        print(json.dumps(results["ingestion"]), flush=True)
    if "search" not in parts:
        sizes = []
    real = np.load(args.vectors) if args.vectors else None
    texts = docs_chunks(encoder, 500)
    results["ann"], results["search"] = [], []
    pg_url, pg_server = None, None
    if args.pgvector:
        import pgserver

        pg_dir = tempfile.mkdtemp(prefix="bench-pgvector-")
        pg_server = pgserver.get_server(pg_dir, cleanup_mode="delete")
        pg_url = pg_server.get_uri()
        pg_server.psql("CREATE EXTENSION IF NOT EXISTS vector;")
    for n in sizes:
        vectors = real[:n] if real is not None and len(real) >= n else synthetic_vectors(n)
        results["ann"].append(bench_ann(vectors, args.queries, pg_url))  # type: ignore[union-attr]
        print(json.dumps(results["ann"][-1]), flush=True)  # type: ignore[index]
        results["search"].append(bench_search(encoder, n, texts, vectors, min(args.queries, 120)))  # type: ignore[union-attr]
        print(json.dumps(results["search"][-1]), flush=True)  # type: ignore[index]
    if pg_server is not None:
        pg_server.cleanup()
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    if args.chart:
        chart(results, Path(args.chart))


if __name__ == "__main__":
    main()
