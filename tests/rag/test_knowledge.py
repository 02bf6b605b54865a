"""Ingestion and search end to end on SQLite and PostgreSQL, with the real embedder on a tiny corpus."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import Engine, text

from mini_claude.db import session_scope
from mini_claude.encoder import Encoder
from mini_claude.rag import store
from mini_claude.rag.chunking import EMBED_RECIPE
from mini_claude.rag.index import HNSWIndex
from mini_claude.rag.knowledge import Knowledge

pytestmark = pytest.mark.one_thread
QUESTIONS = {  # question -> the file that answers it
    "How long should the loaf be baked, and how hot?": "bread.md",
    "Which planet is the biggest?": "planets.rst",
    "What does a reflector use to gather light?": "notes.html",
    "How many hearts does an octopus have?": "facts.jsonl",
    "recipe with tomatoes and garlic": "soup.txt",
}


def test_ingest_is_idempotent_and_reports_changes(db: Engine, minilm: Encoder, corpus: Path) -> None:
    (corpus / "broken.pdf").write_bytes(b"%PDF-1.4 not really")
    (corpus / "image.png").write_bytes(b"\x89PNG")
    knowledge = Knowledge(db, minilm)
    errors: list[tuple[str, str]] = []
    report = knowledge.ingest([corpus], "docs", on_error=lambda source, reason: errors.append((source, reason)))
    assert report.counts() == {"added": 5, "updated": 0, "deleted": 0, "skipped": 0, "failed": 2}
    assert sorted(Path(s).name for s, _ in errors) == ["broken.pdf", "image.png"]
    assert all("\n" not in reason for _, reason in errors)

    again = knowledge.ingest([corpus], "docs", on_error=lambda *_: None)
    assert again.counts() == {"added": 0, "updated": 0, "deleted": 0, "skipped": 5, "failed": 2}
    assert again.chunks == 0

    (corpus / "cooking/soup.txt").write_text("Pea soup: boil split peas with ham until thick.\n")
    (corpus / "space/notes.html").unlink()
    (corpus / "new.md").write_text("# Knots\n\nA bowline makes a fixed loop at the end of a rope.\n")
    changed = knowledge.ingest([corpus], "docs", on_error=lambda *_: None)
    assert {k: [Path(s).name for s in getattr(changed, k)] for k in ("added", "updated", "deleted")} == {
        "added": ["new.md"], "updated": ["soup.txt"], "deleted": ["notes.html"],
    }  # fmt: skip
    with session_scope(db) as session:
        coll = store.get_collection(session, "docs")
        assert coll is not None
        docs = store.list_documents(session, coll.id)
        assert sorted(d.filename for d in docs) == ["bread.md", "facts.jsonl", "new.md", "planets.rst", "soup.txt"]
        assert store.count_chunks(session, coll.id) == sum(d.n_chunks for d in docs)
    # the keyword index followed the changes: old words are gone, new ones found
    assert knowledge.search("tomatoes garlic", "docs", 3, "keyword") == []
    assert knowledge.search("split peas", "docs", 3, "keyword")[0].filename == "soup.txt"
    assert knowledge.search("refracting telescope lens", "docs", 3, "keyword") == []


def test_documents_embedded_with_an_older_recipe_are_embedded_again(db: Engine, minilm: Encoder, corpus: Path) -> None:
    knowledge = Knowledge(db, minilm)
    knowledge.ingest([corpus], "docs")
    with session_scope(db) as session:
        coll = store.get_collection(session, "docs")
        assert coll is not None
        docs = store.list_documents(session, coll.id)
        assert {d.meta["embed_recipe"] for d in docs} == {EMBED_RECIPE}
        docs[0].meta = {}  # as stored before recipes were recorded (recipe 1)
        old = docs[0].source
    again = knowledge.ingest([corpus], "docs")
    assert again.updated == [old] and len(again.skipped) == len(docs) - 1
    assert knowledge.ingest([corpus], "docs").counts()["skipped"] == len(docs)


@pytest.mark.parametrize("mode", ["keyword", "dense", "hybrid"])
def test_search_finds_the_answering_file(db: Engine, minilm: Encoder, corpus: Path, mode: str) -> None:
    knowledge = Knowledge(db, minilm)
    knowledge.ingest([corpus], "docs")
    for question, filename in QUESTIONS.items():
        if mode == "keyword" and filename == "planets.rst":
            continue  # "biggest" is not a word of the text: a paraphrase only the dense search matches
        hits = knowledge.search(question, "docs", 3, mode)
        assert hits and hits[0].filename == filename, (question, [h.filename for h in hits])
        top = hits[0]
        if filename.endswith((".md", ".rst", ".txt")):  # text formats: the span is one of the file itself
            assert Path(top.source).read_text()[top.start_char : top.end_char] == top.text
        assert set(top.ranks) <= {"keyword", "dense"} and (mode != "hybrid" or "dense" in top.ranks)
    bread = knowledge.search("Bake the loaf at 220 degrees", "docs", 1, mode)[0]
    assert bread.heading.startswith("Baking bread") and bread.page is None


def test_remove_file_and_collections_are_separate(db: Engine, minilm: Encoder, corpus: Path) -> None:
    knowledge = Knowledge(db, minilm)
    knowledge.ingest([corpus / "cooking"], "food")
    knowledge.ingest([corpus / "space"], "space")
    assert {h.filename for h in knowledge.search("planet", "food", 10, "hybrid")} <= {"bread.md", "soup.txt"}
    removed = knowledge.remove([corpus / "cooking" / "bread.md"], "food")
    assert [Path(s).name for s in removed] == ["bread.md"]
    assert {h.filename for h in knowledge.search("dough bread loaf", "food", 10, "hybrid")} == {"soup.txt"}
    assert knowledge.remove([corpus / "cooking"], "food") and knowledge.search("soup", "food", 5, "dense") == []
    with pytest.raises(store.CollectionError):
        knowledge.search("x", "missing")


def test_hnsw_index_is_persisted_and_updated_incrementally(
    db: Engine, minilm: Encoder, corpus: Path, tmp_path: Path
) -> None:
    knowledge = Knowledge(db, minilm, dense="hnsw", index_dir=tmp_path / "index")
    knowledge.ingest([corpus / "cooking"], "docs")
    assert knowledge.search("knead the dough", "docs", 1, "dense")[0].filename == "bread.md"
    (path,) = (tmp_path / "index").glob("*.hnsw.npz")
    before = HNSWIndex.load(path)
    knowledge.ingest([corpus / "space"], "docs")
    assert knowledge.search("largest gas giant planet", "docs", 1, "dense")[0].filename == "planets.rst"
    after = HNSWIndex.load(path)
    assert after.n > before.n
    np.testing.assert_array_equal(after.labels[: before.n], before.labels[: before.n])  # grown, not rebuilt
    np.testing.assert_array_equal(after.vectors[: before.n], before.vectors[: before.n])
    # a fresh process loads the graph from disk and agrees with the database
    fresh = Knowledge(db, minilm, dense="hnsw", index_dir=tmp_path / "index")
    assert fresh.search("largest gas giant planet", "docs", 1, "dense")[0].filename == "planets.rst"
    knowledge.remove([corpus / "space"], "docs")
    assert {h.filename for h in knowledge.search("planet", "docs", 10, "dense")} <= {"bread.md", "soup.txt"}


def test_keyword_index_is_maintained_by_the_database(db: Engine, minilm: Encoder, corpus: Path) -> None:
    """Rows written by plain SQL are searchable too: the index is the database's (triggers / GIN), not ours."""
    knowledge = Knowledge(db, minilm)
    knowledge.ingest([corpus / "cooking"], "docs")
    with db.begin() as connection:
        connection.execute(text("UPDATE rag_chunks SET text = 'zeppelins float' WHERE seq = 0"))
    hits = knowledge.search("zeppelins", "docs", 5, "keyword")
    assert len(hits) == 2 and {h.text for h in hits} == {"zeppelins float"}
