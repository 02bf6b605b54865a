"""Chunking in the embedder's word pieces: exact spans, never over the window, headings and pages kept."""

from __future__ import annotations

import itertools

import pytest

from mini_claude.encoder import Encoder
from mini_claude.rag.chunking import ChunkingConfig, chunk_document, sections
from mini_claude.rag.readers import Document

pytestmark = pytest.mark.one_thread

MARKDOWN = (
    "Intro line before any heading.\n\n# Guide\n\nShort intro.\n\n## Install\n\n"
    + "\n\n".join(f"Paragraph {i} explains step {i} of installing the package with care and detail." for i in range(40))
    + "\n\n```\n# not a heading inside code\n```\n\n## Use\n\nCall the function.\n"
)
RST = (
    "=====\nTitle\n=====\n\nIntro.\n\nSection A\n---------\n\nText A.\n\n"
    "Sub A1\n~~~~~~\n\nText A1.\n\nSection B\n---------\n\nText B.\n"
)


def test_sections_follow_heading_levels() -> None:
    md = [s.path for s in sections(Document(MARKDOWN, "markdown"))]
    assert md == [[], ["Guide"], ["Guide", "Install"], ["Guide", "Use"]]  # the fenced "# ..." is code
    rst = [s.path for s in sections(Document(RST, "rst"))]
    assert rst == [["Title"], ["Title", "Section A"], ["Title", "Section A", "Sub A1"], ["Title", "Section B"]]


@pytest.mark.parametrize("config", [ChunkingConfig(), ChunkingConfig(max_tokens=64, overlap=0, min_tokens=8),
                                    ChunkingConfig(max_tokens=48, overlap=16)])  # fmt: skip
def test_chunks_fit_the_window_and_spans_are_exact(minilm: Encoder, config: ChunkingConfig) -> None:
    doc = Document(MARKDOWN * 3, "markdown")
    chunks = chunk_document(doc, minilm.tokenizer, config)
    assert len(chunks) > 3
    for chunk in chunks:
        assert chunk.text == doc.text[chunk.start : chunk.end]
        assert minilm.count_tokens(chunk.embed_text) == chunk.n_tokens <= config.max_tokens
    # everything is covered: each chunk starts before the previous one ended (overlap) or right after it
    for a, b in itertools.pairwise(chunks):
        assert b.start <= a.end + 4
        if config.overlap == 0:
            assert b.start >= a.end
    assert [c.seq for c in chunks] == list(range(len(chunks)))


def test_overlap_repeats_the_end_of_the_previous_chunk(minilm: Encoder) -> None:
    doc = Document(" ".join(f"word{i}" for i in range(400)), "plain")  # no paragraph breaks at all
    chunks = chunk_document(doc, minilm.tokenizer, ChunkingConfig(max_tokens=66, overlap=16))
    for a, b in itertools.pairwise(chunks):
        shared = doc.text[b.start : a.end]  # the overlap starts at the first word within its last 16 pieces
        assert 16 - 3 < len(minilm.tokenizer.encode(shared, add_special_tokens=False).ids) <= 16


def test_tiny_sections_merge_and_long_paragraphs_split_at_paragraphs(minilm: Encoder) -> None:
    chunks = chunk_document(Document(MARKDOWN, "markdown"), minilm.tokenizer, ChunkingConfig(128, overlap=0))
    first = chunks[0]
    assert first.text.startswith("Intro line") and "# Guide" in first.text and "Short intro." in first.text
    install = [c for c in chunks if c.heading == "Guide > Install"]
    assert len(install) > 2
    assert all(c.text.startswith(("Paragraph", "## Install", "```")) for c in install)  # cut at paragraph starts
    assert all(c.embed_text.startswith("Guide > Install\n") for c in install)


def test_pages_come_from_the_span(minilm: Encoder) -> None:
    page1, page2 = "Alpha " * 150, "Beta " * 150
    doc = Document(page1 + "\n\n" + page2, "plain", [0, len(page1) + 2])
    chunks = chunk_document(doc, minilm.tokenizer, ChunkingConfig(max_tokens=100, overlap=0))
    assert {c.page for c in chunks if "Alpha" in c.text[:10]} == {1}
    assert {c.page for c in chunks if c.text.startswith("Beta")} == {2}


def test_rst_chunks_are_embedded_with_their_heading_path_and_without_markup(minilm: Encoder) -> None:
    rst = (
        ":mod:`random` --- Random numbers\n================================\n\nIntro.\n\n"
        "Sequences\n---------\n\n.. function:: shuffle(x)\n\n   Shuffle the sequence *x* in place; see "
        ":func:`sample` and :class:`~random.Random`, or ``x[:]`` for a copy.\n"
    )
    chunks = chunk_document(Document(rst, "rst"), minilm.tokenizer)
    last = chunks[-1]
    assert last.heading == ":mod:`random` --- Random numbers > Sequences"  # what a citation shows: as written
    assert last.embed_text.startswith("random --- Random numbers > Sequences\n")  # what the encoder sees
    assert "shuffle(x)" in last.embed_text and ".. function::" not in last.embed_text
    assert "see sample and random.Random, or x[:] for a copy" in last.embed_text
    assert "---------" not in last.embed_text
    assert all(minilm.count_tokens(c.embed_text) == c.n_tokens for c in chunks)
