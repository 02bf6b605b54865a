"""Markdown made speakable, and text cut into sentences for streaming."""

from __future__ import annotations

from mini_claude.audio.text import sentences, speakable


def test_speakable_keeps_the_words_and_drops_the_markup() -> None:
    reply = (
        "# Title\n\n**Bold** and *italic* and `code`, see [the docs](https://example.com/x) or https://x.y/z.\n"
        "- first item\n2. second item\n> quoted\n\n| a | b |\n|---|---|\n```python\nprint(1)\n```\n<b>html</b> ~~gone~~"
    )
    assert speakable(reply).splitlines() == [
        "Title", "Bold and italic and code, see the docs or.", "first item", "second item", "quoted", "a b",
        "print(1)", "html gone",
    ]  # fmt: skip
    assert speakable("2 * 3 * 4 = 24, snake_case_name") == "2 * 3 * 4 = 24, snake_case_name"


def test_sentences_split_at_ends_and_lines_but_not_after_abbreviations() -> None:
    text = 'Dr. Smith said "hello." Then he left! Did J. K. Rowling write it? Yes…\nNew line e.g. this one'
    assert sentences(text) == [
        'Dr. Smith said "hello."', "Then he left!", "Did J. K. Rowling write it?", "Yes…", "New line e.g. this one",
    ]  # fmt: skip
    assert sentences("   \n ... \n") == []


def test_long_sentences_are_cut_at_clauses_then_words() -> None:
    clause = "one two three four five six seven eight nine ten"
    long = ", ".join([clause] * 12) + "."
    pieces = sentences(long, max_chars=120)
    assert all(len(p) <= 120 for p in pieces) and len(pieces) > 1
    assert " ".join(pieces).replace(",", "") == long.replace(",", "")
    word_soup = " ".join(["word"] * 100)
    assert all(len(p) <= 50 for p in sentences(word_soup, max_chars=50))
    assert " ".join(sentences(word_soup, max_chars=50)) == word_soup
