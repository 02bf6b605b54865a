"""Dense search in PostgreSQL's pgvector HNSW index, on a real PostgreSQL that has the extension (the one bundled
by the `pgserver` wheel, started here), and the fallback on one that has not (Debian's, tests/helpers)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url

from helpers import POSTGRES_URL, migrated_schema, require_postgres
from mini_claude.db import init_db, make_engine, session_scope
from mini_claude.encoder import Encoder
from mini_claude.rag import pgvector, store
from mini_claude.rag.knowledge import Knowledge

pytestmark = pytest.mark.one_thread
QUESTIONS = {  # question -> the file that answers it (in tests/rag/conftest.py's corpus)
    "How long should the loaf be baked, and how hot?": "bread.md",
    "Which planet is the biggest?": "planets.rst",
    "What does a reflector use to gather light?": "notes.html",
    "How many hearts does an octopus have?": "facts.jsonl",
}


def _unavailable(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI=true: the pgvector tests must run)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def pgvector_server() -> Iterator[str]:
    """A throwaway PostgreSQL with pgvector (the `pgserver` wheel), its URL; the extension made once in `public`.

    A tiny HNSW build is tried first: a pgvector compiled for instructions this CPU lacks dies there with SIGILL
    (seen on an AVX2-only machine), which is a reason to skip, stated, not a failure of our code."""
    try:
        import pgserver
    except ImportError:
        _unavailable("pgserver is not installed (pip install -e '.[dev]')")
    with tempfile.TemporaryDirectory(prefix="mc-pgvector-") as data:
        server = pgserver.get_server(data, cleanup_mode="stop")
        try:
            url = make_url(server.get_uri()).set(drivername="postgresql+psycopg")
            admin = create_engine(url, isolation_level="AUTOCOMMIT")
            try:
                with admin.connect() as connection:
                    connection.execute(text("CREATE EXTENSION IF NOT EXISTS vector SCHEMA public"))
                    connection.execute(text("CREATE TEMP TABLE probe (v vector(3))"))
                    connection.execute(text("INSERT INTO probe VALUES ('[1,0,0]'), ('[0,1,0]')"))
                    connection.execute(text("CREATE INDEX ON probe USING hnsw (v vector_cosine_ops)"))
            except Exception as exc:  # the backend killed by SIGILL surfaces as a dropped connection
                _unavailable(f"the bundled pgvector cannot build an HNSW index on this CPU: {exc}")
            finally:
                admin.dispose()
            yield url.render_as_string(hide_password=False)
        finally:
            server.cleanup()


@pytest.fixture
def pg_db(pgvector_server: str) -> Iterator[Engine]:
    """A migrated, empty schema of its own on the pgvector server (`public` after it, for the vector type)."""
    with migrated_schema(pgvector_server, "mc_pgv", search_path_after="public") as engine:
        yield engine


def dense_ids(knowledge: Knowledge, question: str, k: int = 3) -> list[int]:
    return [h.chunk_id for h in knowledge.search(question, "docs", k, "dense")]


def test_dense_search_runs_in_pgvector_and_agrees_with_exact_search(
    pg_db: Engine, minilm: Encoder, corpus: Path
) -> None:
    knowledge = Knowledge(pg_db, minilm)  # dense "auto": pgvector, since this database has it
    knowledge.ingest([corpus], "docs")
    exact = Knowledge(pg_db, minilm, dense="exact")
    for question, filename in QUESTIONS.items():
        hits = knowledge.search(question, "docs", 3, "dense")
        assert hits[0].filename == filename, question
        assert [h.chunk_id for h in hits] == dense_ids(exact, question)
        reference = exact.search(question, "docs", 3, "dense")
        assert [h.score for h in hits] == pytest.approx([h.score for h in reference], abs=1e-5)
    assert knowledge._pgvector is True and not knowledge._indexes  # no in-process index was built
    assert "dense" in knowledge.search("Which planet is the biggest?", "docs", 3, "hybrid")[0].ranks


def test_each_collection_has_an_hnsw_cosine_index_that_the_planner_uses(
    pg_db: Engine, minilm: Encoder, corpus: Path
) -> None:
    knowledge = Knowledge(pg_db, minilm)
    knowledge.ingest([corpus], "docs")
    knowledge.search("Which planet is the biggest?", "docs", 3, "dense")
    with session_scope(pg_db) as session:
        coll = store.get_collection(session, "docs")
        assert coll is not None
        name = pgvector.index_name(coll.id)
        definition = session.execute(text("SELECT indexdef FROM pg_indexes WHERE indexname = :n"), {"n": name}).scalar()
        assert definition is not None and "USING hnsw" in definition and "vector_cosine_ops" in definition
        assert f"vector({coll.dim})" in definition and coll.id in definition  # partial: this collection only
        missing = session.execute(text("SELECT count(*) FROM rag_chunks WHERE embedding_vec IS NULL")).scalar()
        assert missing == 0
        # A 5-row table would be scanned, or read by the collection's b-tree and sorted (pgvector 0.6's cost
        # estimate), otherwise; the question is whether the HNSW index can serve this query at all.
        session.execute(text("SET LOCAL enable_seqscan = off"))
        session.execute(text("SET LOCAL enable_sort = off"))
        query = {"q": "[" + ",".join(["0.05"] * coll.dim) + "]", "k": 3}
        plan = "\n".join(
            r[0] for r in session.execute(text("EXPLAIN " + pgvector.search_sql(coll.id, coll.dim)), query)
        )
        assert f"Index Scan using {name}" in plan, plan


def test_changes_reach_pgvector_and_a_deleted_collection_takes_its_index(
    pg_db: Engine, minilm: Encoder, corpus: Path
) -> None:
    knowledge = Knowledge(pg_db, minilm)
    knowledge.ingest([corpus], "docs")
    assert knowledge.search("Which planet is the biggest?", "docs", 1, "dense")[0].filename == "planets.rst"
    knowledge.remove([corpus / "space" / "planets.rst"], "docs")
    hits = knowledge.search("Which planet is the biggest?", "docs", 5, "dense")
    assert hits and all(h.filename != "planets.rst" for h in hits)
    (corpus / "space" / "moons.md").write_text("# Moons\n\nGanymede, a moon of Jupiter, is the largest moon of all.\n")
    knowledge.ingest([corpus], "docs")  # the new chunk gets its vector at the next search
    assert knowledge.search("What is the biggest moon?", "docs", 1, "dense")[0].filename == "moons.md"
    with session_scope(pg_db) as session:
        coll = store.get_collection(session, "docs")
        assert coll is not None
        name = pgvector.index_name(coll.id)
        assert store.delete_collection(session, coll.id)
    with session_scope(pg_db) as session:
        assert session.execute(text("SELECT 1 FROM pg_indexes WHERE indexname = :n"), {"n": name}).first() is None


def test_without_the_extension_the_in_process_index_is_used(minilm: Encoder, corpus: Path, tmp_path: Path) -> None:
    """Debian's PostgreSQL (no pgvector package) and SQLite: the same search, from the in-process index."""
    require_postgres()
    engine = create_engine(POSTGRES_URL)
    try:
        with session_scope(engine) as session:
            if session.execute(text("SELECT 1 FROM pg_available_extensions WHERE name = 'vector'")).first():
                pytest.skip("this PostgreSQL has pgvector: the fallback is tested on SQLite only")
            assert pgvector.available(session) is False
    finally:
        engine.dispose()
    sqlite = make_engine(f"sqlite:///{tmp_path / 'fallback.sqlite'}")
    init_db(sqlite)
    knowledge = Knowledge(sqlite, minilm)
    knowledge.ingest([corpus], "docs")
    assert knowledge.search("Which planet is the biggest?", "docs", 1, "dense")[0].filename == "planets.rst"
    assert knowledge._pgvector is False and knowledge._indexes  # the exact in-process index served it
    with pytest.raises(ValueError, match="pgvector"):
        Knowledge(sqlite, minilm, dense="pgvector").search("planets", "docs", 1, "dense")
    sqlite.dispose()
