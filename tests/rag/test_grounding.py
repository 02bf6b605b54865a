"""Grounding as units: the search query, numbering sources into the prompt, fitting them to a token budget
counted by SmolLM2's real chat template, and [n] marks read back into citations (also from a stream cut at
every possible place)."""

from __future__ import annotations

import random

import pytest

from mini_claude.rag.grounding import (
    NO_SOURCES,
    MarkFilter,
    Source,
    ground,
    marks,
    search_query,
    strip_unknown,
    tool_result,
)
from mini_claude.rag.retrieve import Hit

DOC = "Knead the dough for ten minutes. Let it rise for an hour. Bake it at 220 degrees for thirty minutes."


def hit(chunk_id: int, text: str, score: float = 0.03, **kw: object) -> Hit:
    start = DOC.find(text) if text in DOC else 0
    fields = {"source": f"file-{chunk_id}", "filename": f"f{chunk_id}.md", "start_char": start,
              "end_char": start + len(text), **kw}  # fmt: skip
    return Hit(chunk_id, score, text, **fields)  # type: ignore[arg-type]


def test_the_query_is_the_latest_user_turn_then_the_ones_before() -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "How do I bake bread?"},
        {"role": "assistant", "content": "Knead, proof, bake."},
        {"role": "user", "content": "Which temperature?"},
        {"role": "user", "content": "And how long?"},
    ]
    assert search_query(messages) == "And how long?\nWhich temperature?\nHow do I bake bread?"
    assert search_query(messages, context_turns=0) == "And how long?"
    assert search_query([{"role": "system", "content": "x"}]) == ""


def test_sources_are_numbered_into_the_system_message() -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "How long to knead?"}]
    found = [("kitchen", hit(7, "Knead the dough for ten minutes.", heading="Bread", page=2)),
             ("kitchen", hit(9, "Let it rise for an hour."))]  # fmt: skip
    g = ground(messages, found, citations="required", query="How long to knead?", collections=["kitchen"])
    system = g.messages[0]["content"]
    assert g.messages[1:] == messages[1:] and system.startswith("Be brief.\n\n")
    assert "[1] (f7.md, page 2, Bread)\nKnead the dough for ten minutes." in system
    assert "[2] (f9.md)\nLet it rise for an hour." in system
    assert "square brackets" in system and [s.n for s in g.sources] == [1, 2] and not g.left_out
    report = g.report()
    assert report["collections"] == ["kitchen"] and report["query"] == "How long to knead?"
    assert [(s["n"], s["chunk_id"], s["file_id"]) for s in report["sources"]] == [(1, 7, "file-7"), (2, 9, "file-9")]
    no_system = ground([messages[1]], found[:1])
    assert no_system.messages[0]["role"] == "system" and no_system.messages[1] == messages[1]


def test_nothing_found_says_so_in_the_prompt_and_the_report() -> None:
    g = ground([{"role": "user", "content": "Where is Mars?"}], [], refusal="I cannot tell from the documents.")
    assert g.messages[0]["content"] == f"{NO_SOURCES} Reply: I cannot tell from the documents."
    assert g.sources == [] and g.report()["note"] == "no chunk matched the query"


def test_sources_that_do_not_fit_the_budget_are_left_out_and_reported(smollm2_tokenizer) -> None:
    """Counted with SmolLM2's own chat template: a long second chunk does not fit, the shorter third still does."""

    def count(m: list[dict[str, str]]) -> int:
        return len(smollm2_tokenizer.apply_chat_template(m))

    messages = [{"role": "user", "content": "How long does the dough rise?"}]
    long_text = "The dough rises slowly. " * 60
    found = [("k", hit(1, "Let it rise for an hour.")), ("k", hit(2, long_text)),
             ("k", hit(3, "Bake it at 220 degrees."))]  # fmt: skip
    everything = count(ground(messages, found).messages)
    budget = everything - 40  # room for all but the long chunk
    g = ground(messages, found, count=count, budget=budget)
    assert [(s.n, s.hit.chunk_id) for s in g.sources] == [(1, 1), (2, 3)]
    assert [(s.n, s.hit.chunk_id) for s in g.left_out] == [(None, 2)] and g.left_out[0].tokens > 40
    assert count(g.messages) <= budget and "The dough rises slowly" not in g.messages[0]["content"]
    assert g.report()["left_out"][0]["chunk_id"] == 2 and "did not fit the context budget" in g.report()["note"]
    assert sum(s.tokens for s in g.sources) == count(g.messages) - count(ground(messages, []).messages)
    tight = ground(messages, found, count=count, budget=count(messages) + 5)
    assert tight.sources == [] and len(tight.left_out) == 3 and NO_SOURCES in tight.messages[0]["content"]


def test_marks_become_citations_and_unknown_numbers_are_dropped() -> None:
    found = [("k", hit(1, "Knead the dough for ten minutes.", page=3, heading="Bread")),
             ("k", hit(2, "Let it rise for an hour."))]  # fmt: skip
    g = ground([{"role": "user", "content": "?"}], found)
    answer = "Rise an hour [2]. Knead ten minutes [1, 2]. Bake forever [7]. Bake [3, 1]."
    assert marks(answer) == [2, 1, 7, 3]
    shown = g.clean(answer)
    assert shown == "Rise an hour [2]. Knead ten minutes [1, 2]. Bake forever. Bake [1]."
    cites = g.cite(shown, choice=1)
    assert [c["n"] for c in cites] == [2, 1]
    first = cites[1]
    assert first == {"n": 1, "choice": 1, "collection": "k", "file_id": "file-1", "filename": "f1.md", "chunk_id": 1,
                     "start_char": 0, "end_char": 32, "page": 3, "heading": "Bread",
                     "quote": "Knead the dough for ten minutes.", "score": 0.03}  # fmt: skip
    assert DOC[first["start_char"] : first["end_char"]] == first["quote"]
    assert g.cite("no marks at all") == []
    off = ground([{"role": "user", "content": "?"}], found, citations="off")
    assert off.cite("Knead [1].") == [] and "square brackets" not in off.messages[0]["content"]


def test_a_long_chunk_is_quoted_by_its_start_cut_at_a_space() -> None:
    text = "word " * 200
    g = ground([{"role": "user", "content": "?"}], [("k", hit(1, text))])
    quote = g.cite("[1]")[0]["quote"]
    assert text.startswith(quote) and 250 < len(quote) <= 300 and quote.endswith("word")


@pytest.mark.parametrize("seed", range(20))
def test_the_stream_filter_equals_the_whole_text_filter_and_never_shows_an_unknown_mark(seed: int) -> None:
    rng = random.Random(seed)
    text = "Knead [1]. Rise [2, 9] then [9] bake [12][1] at [220 degrees] [ 1] and [1, 2]. End [9"
    known = {1, 2}
    cuts = sorted(rng.sample(range(1, len(text)), rng.randint(1, 20)))
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    f, out = MarkFilter(known), ""
    for piece in pieces:
        out += f.feed(piece)
        assert "[9]" not in out and "[12]" not in out and "9]" not in out.replace("[220 degrees]", "")
    out += f.flush()
    assert out == strip_unknown(text, known)
    assert out == "Knead [1]. Rise [2] then bake [1] at [220 degrees] [ 1] and [1, 2]. End [9"


def test_the_tool_result_numbers_its_sources() -> None:
    sources = [Source(1, "k", hit(1, "Let it rise for an hour.")), Source(None, "k", hit(2, "left out"))]
    result = tool_result(sources)
    assert "[1] (f1.md)\nLet it rise for an hour." in result and "left out" not in result
    assert tool_result([]) == NO_SOURCES
