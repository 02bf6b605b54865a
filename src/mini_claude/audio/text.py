"""What a voice reads: chat text made speakable, then cut into sentences for streaming.

Design choices:
- Replies are Markdown. Read aloud as is, `**bold**` and `[a link](https://...)` become noise, so `speakable`
  keeps the words and drops the markup (as speaches does before its engines): emphasis and heading marks,
  link targets, inline-code backticks, HTML tags, bullets and table rules. Fenced code is kept as text: a
  reply that is mostly code should still say something.
- `sentences` cuts at sentence ends and line breaks, so the first sentence can be synthesized and sent while
  the rest waits; a period after a common abbreviation or an initial does not end a sentence. A sentence
  longer than `max_chars` is cut at clause punctuation, then at spaces, so no single piece delays the
  first audio byte by much (and no engine gets more text than it handles well in one pass).
"""

from __future__ import annotations

import re

MAX_SENTENCE_CHARS = 280

_FENCE = re.compile(r"^\s*(```|~~~).*$", re.MULTILINE)
_IMAGE = re.compile(r"!\[([^\]]*)\]\([^)]*\)")
_LINK = re.compile(r"\[([^\]]+)\]\([^)]*\)")
_URL = re.compile(r"https?://[^\s<>()\[\]]*[^\s<>()\[\].,;:!?'\"]")
_TAG = re.compile(r"</?[A-Za-z][^>]*>")
_HEADING = re.compile(r"^\s{0,3}#{1,6}\s+", re.MULTILINE)
_QUOTE = re.compile(r"^\s*>\s?", re.MULTILINE)
_BULLET = re.compile(r"^\s*(?:[-*+]|\d+[.)])\s+", re.MULTILINE)
_RULE = re.compile(r"^\s*(?:[-*_=|:]\s*){3,}$", re.MULTILINE)
_EMPHASIS = re.compile(r"(\*{1,3}|_{2,3}|~~)(?=\S)(.+?)(?<=\S)\1")
_CODE = re.compile(r"`+([^`]*)`+")
_SPACES = re.compile(r"[ \t]+")
_LOOSE_PUNCTUATION = re.compile(r"\s+([.,;:!?])")

# A period after these does not end a sentence ("Dr. Smith", "e.g. this").
_ABBREVIATIONS = {
    "mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "vs", "etc", "e.g", "i.e", "no", "fig", "approx", "inc",
    "ltd", "co", "mt", "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept", "oct", "nov", "dec",
}  # fmt: skip
_SENTENCE_END = re.compile(r"(?<=[.!?…])([\"')\]”’]*)\s+")
_CLAUSE = re.compile(r"(?<=[,;:—–])\s+")


def speakable(text: str) -> str:
    """`text` without Markdown and HTML markup: the words a listener should hear, lines kept."""
    text = _FENCE.sub("", text)
    text = _IMAGE.sub(r"\1", text)
    text = _LINK.sub(r"\1", text)
    text = _URL.sub("", text)
    text = _TAG.sub("", text)
    text = _RULE.sub("", text)
    text = _HEADING.sub("", text)
    text = _QUOTE.sub("", text)
    text = _BULLET.sub("", text)
    for _ in range(2):  # nested emphasis: ***bold italic***, **bold _and_ italic**
        text = _EMPHASIS.sub(r"\2", text)
    text = _CODE.sub(r"\1", text)
    text = text.replace("|", " ")
    lines = (_LOOSE_PUNCTUATION.sub(r"\1", _SPACES.sub(" ", line)).strip() for line in text.splitlines())
    return "\n".join(line for line in lines if line)


def _ends_sentence(text: str, end: int) -> bool:
    """Whether the punctuation just before `end` closes a sentence (not "Dr." nor an initial like "J.")."""
    stripped = text[:end].rstrip("\"')]”’ \t")
    if not stripped.endswith("."):
        return True
    word = stripped[:-1].rsplit(None, 1)[-1].lstrip("(\"'“‘").lower() if stripped[:-1].strip() else ""
    return not (word in _ABBREVIATIONS or (len(word) == 1 and word.isalpha()))


def _cut(piece: str, max_chars: int) -> list[str]:
    """A piece longer than `max_chars`, cut at clause punctuation where it can be, else between words."""
    if len(piece) <= max_chars:
        return [piece]
    out: list[str] = []
    for part in _CLAUSE.split(piece):
        if out and len(out[-1]) + 1 + len(part) <= max_chars:
            out[-1] = f"{out[-1]} {part}"
            continue
        while len(part) > max_chars:
            cut = part.rfind(" ", 0, max_chars)
            cut = cut if cut > 0 else max_chars
            out.append(part[:cut].strip())
            part = part[cut:].strip()
        if part:
            out.append(part)
    return out


def sentences(text: str, max_chars: int = MAX_SENTENCE_CHARS) -> list[str]:
    """The sentences of `text` in order (line breaks end them too), none longer than `max_chars`."""
    out: list[str] = []
    for line in text.splitlines():
        start = 0
        for match in _SENTENCE_END.finditer(line):
            if _ends_sentence(line, match.end()):
                out.extend(_cut(line[start : match.end(1)].strip(), max_chars))
                start = match.end()
        out.extend(_cut(line[start:].strip(), max_chars))
    return [s for s in out if any(ch.isalnum() for ch in s)]
