"""Keyword search (`rag.keyword`): stop words, rare words first with every word rescoring the candidates, the
collection filter after FTS5's own top-k, and the plans that use the full-text indexes."""

from __future__ import annotations

import numpy as np
import pytest
from sqlalchemy import Engine, text

from mini_claude.db import session_scope
from mini_claude.rag import keyword, store
from mini_claude.rag.chunking import Chunk


def put(engine: Engine, collection: str, texts: list[str], source: str = "doc") -> str:
    """A collection holding `texts` as one document's chunks (vectors are zeros: only keywords are searched)."""
    with session_scope(engine) as session:
        coll = store.ensure_collection(session, collection, "none", 4)
        chunks = [Chunk(t, 0, len(t), "", 8, seq=i) for i, t in enumerate(texts)]
        store.put_document(session, coll.id, source, source, "x", 0, chunks, np.zeros((len(texts), 4)))
        return coll.id


def ids_of(engine: Engine, collection_id: str, query: str, k: int = 10) -> list[int]:
    with session_scope(engine) as session:
        return [i for i, _ in keyword.search(session, collection_id, query, k)]


def _chunks(engine: Engine, ids: list[int]) -> dict[int, store.ChunkRecord]:
    with session_scope(engine) as session:
        return store.get_chunks(session, ids)


def test_stop_words_are_dropped_but_a_query_of_only_stop_words_still_searches(db: Engine) -> None:
    assert keyword.query_words("What is the default value of a list?") == ["default", "value", "list"]
    assert keyword.query_words("Where is it, and what is it?") == ["where", "is", "it", "and", "what"]
    cid = put(db, "c", ["Where is it? Nobody knows where.", "A list holds values in order."])
    texts = [r.text for r in _chunks(db, ids_of(db, cid, "Where is it?")).values()]
    if db.dialect.name == "sqlite":  # PostgreSQL's english configuration drops these words itself
        assert texts == ["Where is it? Nobody knows where."]
    assert ids_of(db, cid, "the of and") == []


def test_rare_words_find_candidates_and_every_word_rescores_them(db: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """Words over MAX_DF are left out of the match but still count in the scores, and join the match when the
    rare ones find too few candidates: the ranking is the whole query's (on SQLite, the very scores of bm25())."""
    monkeypatch.setattr(keyword, "MIN_DF_CAP", 0)
    rng = np.random.default_rng(0)
    vocab = [f"w{i}" for i in range(40)]
    texts = [" ".join(["common"] * int(rng.integers(1, 6)) + list(rng.choice(vocab, 12))) for _ in range(200)]
    texts += ["os_path joins common parts", "the os module and its path joins common"]
    cid = put(db, "c", texts)
    query = "common w3 w7 os_path"
    with session_scope(db) as session:
        got = keyword.search(session, cid, query, 10)
        assert len(got) == 10
        if db.dialect.name != "sqlite":
            return  # ts_rank_cd over the candidates: checked by the plan test; the scores are PostgreSQL's
        match = " OR ".join(f'"{w}"' for w in keyword.query_words(query))
        sql = (
            "SELECT rowid, -bm25(rag_chunks_fts, 2.0, 1.0) AS s FROM rag_chunks_fts "
            "WHERE rag_chunks_fts MATCH :m ORDER BY s DESC, rowid LIMIT 10"
        )
        full = session.execute(text(sql), {"m": match}).all()
    assert [i for i, _ in got] == [i for i, _ in full]
    np.testing.assert_allclose([s for _, s in got], [s for _, s in full], rtol=1e-12)


def test_the_collection_filter_goes_deeper_when_other_collections_crowd_it_out(db: Engine) -> None:
    put(db, "big", ["zebra zebra zebra stripes"] * 60, source="big")
    small = put(db, "small", ["one zebra seen far away, among many other animals of the plain"], source="small")
    assert len(ids_of(db, small, "zebra stripes", k=3)) == 1


def test_the_keyword_query_uses_the_full_text_index(db: Engine) -> None:
    cid = put(db, "c", [f"chunk {i} about horses" for i in range(300)] + ["and one about zebras"])
    with session_scope(db) as session:
        if db.dialect.name != "sqlite":
            session.execute(text("ANALYZE rag_chunks"))
        if db.dialect.name == "sqlite":
            params = {"match": '"zebras"', "deep": 40, "cid": cid, "k": 10}
            plan = " ".join(
                r[-1] for r in session.execute(text("EXPLAIN QUERY PLAN " + keyword._FTS5_TOP.text), params)
            )
            # FTS5 answers MATCH and ORDER BY rank itself (idxStr "rM"); the chunk is read by its primary key
            assert "VIRTUAL TABLE INDEX" in plan and ":rM" in plan, plan
            assert "USING INTEGER PRIMARY KEY" in plan, plan
        else:
            params = {"match": "zebras", "words": "zebras", "cid": cid, "depth": 40, "k": 10}
            plan = " ".join(r[0] for r in session.execute(text("EXPLAIN " + keyword._PG_TOP.text), params))
            assert "ix_rag_chunks_tsv" in plan, plan
