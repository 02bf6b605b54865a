r"""Text to chunks that fit the embedder: counted in its own word pieces, cut where the text breaks.

Design choices (what the anchors' users asked for; see shared/reference/rag-agents.md §1):
- Counted in the embedder's word pieces, never characters: a chunk holds at most `max_tokens` pieces
  *including* [CLS] and [SEP] and the heading line put in front of it for embedding, so no tail is silently cut
  at the encoder's 256-piece window.
- Structure first: the text is split at its headings (Markdown `#` lines; reST titles, whose levels come from
  the order their underline styles first appear, as docutils decides), each section knowing its heading path
  ("Built-in Functions > abs"). A section too small to stand alone (< `min_tokens`) is merged into its
  neighbour while the two fit one chunk, so a heading with a one-line intro does not become a useless chunk.
- Inside a section, a chunk ends at the best break in the second half of its window: a paragraph (blank
  line) if there is one, else a line, else a sentence, else a word. It never ends inside a word, so the
  chunk's text tokenizes to exactly the pieces counted.
- Up to `overlap` pieces of the previous chunk begin the next one (0 for none), starting at the best break
  among them (a sentence rather than mid-sentence), so text cut at a boundary is whole in one of the two.
- What the encoder sees (`embed_text`) is the heading path, then the text, with reST's markup taken out
  (`:func:\`random.shuffle\`` -> `random.shuffle`, `.. function:: shuffle(x)` -> `shuffle(x)`, title
  underlines, literal quotes): "contextual chunk headers", and words a sentence embedder was trained on rather
  than markup it was not (on the Python docs' dev questions: dense hit@5 0.71 -> 0.82). `EMBED_RECIPE` names
  this recipe; stored documents record it, and re-ingestion re-embeds those made with another.
- Every chunk keeps its character span in the document's text (`text == doc.text[start:end]`), its page (from
  the reader's page starts) and its heading path: what a citation shows.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from mini_claude.rag.readers import Document

HEADING_SEP = " > "
MAX_HEADING_TOKENS = 32  # a longer heading path is not put in front of its chunks
_MD_HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t#]*$")
_MD_FENCE = re.compile(r"^\s*(```|~~~)")
_RST_ADORNMENT = re.compile(r"^([=\-~^\"'`#*+:._<>])\1{2,}\s*$")
EMBED_RECIPE = 2  # 1: heading path + raw text; 2: the same without reST markup (`embed_text`)
_RST_ROLE = re.compile(r":(?:[\w-]+:)*[\w-]+:`[~!]?([^`<]*?)(?:\s*<[^>]*>)?`")  # :role:`title <target>` -> title
_RST_DIRECTIVE = re.compile(r"^(\s*)\.\. [\w:-]+::[ \t]*", re.M)  # ".. function:: f(x)" -> "f(x)"
_RST_UNDERLINE = re.compile(r"^[ \t]*([=\-~^\"'`#*+])\1{2,}[ \t]*$", re.M)


@dataclass(frozen=True)
class ChunkingConfig:
    max_tokens: int = 256  # the embedder's window (all-MiniLM-L6-v2: 256), [CLS], [SEP] and heading included
    overlap: int = 32  # word pieces repeated from the end of one chunk at the start of the next
    min_tokens: int = 48  # sections smaller than this are merged with a neighbour

    def __post_init__(self) -> None:
        if self.max_tokens < 16:
            raise ValueError(f"max_tokens must be >= 16, got {self.max_tokens}")
        if not 0 <= self.overlap <= self.max_tokens // 2:
            raise ValueError(f"overlap must be in 0..max_tokens/2 ({self.max_tokens // 2}), got {self.overlap}")


@dataclass
class Chunk:
    text: str
    start: int  # character span in the document's text: text == doc.text[start:end]
    end: int
    heading: str  # heading path, "A > B > C" ("" before the first heading)
    n_tokens: int  # word pieces of `embed_text`, [CLS] and [SEP] included
    page: int | None = None
    seq: int = 0
    # What the encoder sees: the heading path, then the text (it gives a mid-section chunk its topic).
    embed_text: str = ""


def embed_text(heading: str, text: str, markup: str) -> str:
    """What the encoder sees of a chunk: its heading path (if any) on the first line, then its text; for reST,
    both without roles, directive markers, title underlines and literal quotes (never longer than the raw text,
    so it fits the window counted on it)."""
    joined = f"{heading}\n{text}" if heading else text
    if markup != "rst":
        return joined
    joined = _RST_DIRECTIVE.sub(r"\1", _RST_ROLE.sub(r"\1", joined))
    return _RST_UNDERLINE.sub("", joined).replace("``", "").replace("**", "")


@dataclass
class _Section:
    start: int  # character span
    end: int
    path: list[str]


def sections(doc: Document) -> list[_Section]:
    """The document cut at its headings; each section runs from its heading line to the next heading."""
    lines = doc.text.split("\n")
    offsets = np.cumsum([0] + [len(line) + 1 for line in lines]).tolist()
    found: list[tuple[int, int, str]] = []  # (char offset, level, title)
    if doc.markup == "markdown":
        fenced = False
        for i, line in enumerate(lines):
            if _MD_FENCE.match(line):
                fenced = not fenced
            elif not fenced and (m := _MD_HEADING.match(line)):
                found.append((offsets[i], len(m.group(1)), m.group(2).strip()))
    elif doc.markup == "rst":
        styles: list[tuple[str, bool]] = []  # (character, has an overline), in order of first use
        i = 0
        while i < len(lines) - 1:
            title, under = lines[i], lines[i + 1]
            m = _RST_ADORNMENT.match(under)
            if m and title.strip() and not title[0].isspace() and len(under.rstrip()) >= len(title.rstrip()):
                if _RST_ADORNMENT.match(title):
                    i += 1
                    continue  # an overline: the title is the next line
                over = i > 0 and lines[i - 1].strip() == under.strip()
                style = (m.group(1), over)
                if style not in styles:
                    styles.append(style)
                found.append((offsets[i - 1] if over else offsets[i], styles.index(style) + 1, title.strip()))
                i += 2
                continue
            i += 1
    result: list[_Section] = []
    stack: list[tuple[int, str]] = []
    first = found[0][0] if found else len(doc.text)
    if doc.text[:first].strip():
        result.append(_Section(0, first, []))
    for n, (offset, level, title) in enumerate(found):
        while stack and stack[-1][0] >= level:
            stack.pop()
        stack.append((level, title))
        end = found[n + 1][0] if n + 1 < len(found) else len(doc.text)
        result.append(_Section(offset, end, [t for _, t in stack]))
    return result


def _break_scores(text: str, offsets: list[tuple[int, int]], tokens: list[str]) -> np.ndarray:
    """How good a place each token is for a chunk to *start*: 4 paragraph, 3 line, 2 sentence, 1 word, 0 never
    (inside a word: a `##` continuation piece)."""
    scores = np.zeros(len(tokens), dtype=np.int8)
    for i, token in enumerate(tokens):
        if token.startswith("##"):
            continue
        gap = text[offsets[i - 1][1] : offsets[i][0]] if i else "\n\n"
        if "\n" in gap and gap.count("\n") >= 2:
            scores[i] = 4
        elif "\n" in gap:
            scores[i] = 3
        elif gap and tokens[i - 1] in (".", "!", "?", ":", ";"):
            scores[i] = 2
        elif gap or not tokens[i - 1].isalnum() or not token.isalnum():
            scores[i] = 1
    return scores


def chunk_document(doc: Document, tokenizer: Any, config: ChunkingConfig = ChunkingConfig()) -> list[Chunk]:
    """Cut a document into chunks of at most `config.max_tokens` word pieces (see the module docstring).

    Args:
        doc: What a reader returned.
        tokenizer: The embedder's `tokenizers.Tokenizer` (offsets are what make spans exact).
        config: Window, overlap and the smallest section kept on its own.
    """
    was = tokenizer.truncation
    tokenizer.no_truncation()
    try:
        encoding = tokenizer.encode(doc.text, add_special_tokens=False)
        heading_counts: dict[str, int] = {}

        def heading_tokens(path: list[str]) -> int:
            """Pieces the heading line adds in front of a chunk: 0 without one, or when it is too long to add."""
            key = HEADING_SEP.join(path)
            if key not in heading_counts:
                n = len(tokenizer.encode(key, add_special_tokens=False).ids) if key else 0
                heading_counts[key] = n if n <= MAX_HEADING_TOKENS else 0
            return heading_counts[key]
    finally:
        if was:
            tokenizer.enable_truncation(was["max_length"])
    offsets, tokens = encoding.offsets, encoding.tokens
    if not tokens:
        return []
    starts = np.array([o[0] for o in offsets])
    scores = _break_scores(doc.text, offsets, tokens)
    # Token ranges of the sections, then tiny ones merged into a neighbour.
    groups: list[tuple[int, int, list[str]]] = []
    for section in sections(doc):
        a, b = (int(x) for x in np.searchsorted(starts, [section.start, section.end]))
        if b > a:
            groups.append((a, b, section.path))
    merged: list[tuple[int, int, list[str]]] = []
    for a, b, path in groups:
        budget = config.max_tokens - 2 - max(heading_tokens(path), heading_tokens(merged[-1][2]) if merged else 0)
        if merged and (merged[-1][1] - merged[-1][0] < config.min_tokens or b - a < config.min_tokens):
            pa, pb, ppath = merged[-1]
            if b - pa <= budget:
                merged[-1] = (pa, b, ppath if pb - pa >= b - a else path)
                continue
        merged.append((a, b, path))
    chunks: list[Chunk] = []
    for a, b, path in merged:
        heading = HEADING_SEP.join(path)
        budget = config.max_tokens - 2 - heading_tokens(path)
        s = a
        while s < b:
            if b - s <= budget:
                end = b
            else:
                window = scores[s + budget // 2 + 1 : s + budget + 1]  # where the next chunk could start
                best = int(window.max()) if len(window) else 0
                end = s + budget // 2 + 1 + int(np.flatnonzero(window == best)[-1]) if best > 0 else s + budget
                while end > s + 1 and scores[end] == 0:  # a window of one long word: still end between pieces
                    end -= 1
            start_char, end_char = offsets[s][0], offsets[end - 1][1]
            text = doc.text[start_char:end_char]
            prefixed = heading_tokens(path) > 0
            embedded = embed_text(heading if prefixed else "", text, doc.markup)
            n_tokens = end - s + 2 + heading_tokens(path)
            if embedded != (f"{heading}\n{text}" if prefixed else text):  # markup taken out: counted again
                n_tokens = len(tokenizer.encode(embedded, add_special_tokens=False).ids) + 2
            chunks.append(Chunk(text, start_char, end_char, heading, n_tokens, doc.page_at(start_char),
                                embed_text=embedded))  # fmt: skip
            if end >= b:
                break
            # The overlap starts at the best break among the last `overlap` pieces (the earliest of equals).
            lo = max(end - config.overlap, s + 1)
            window = scores[lo:end]
            s = lo + int(np.argmax(window)) if len(window) and window.max() > 0 else end
    for i, chunk in enumerate(chunks):
        chunk.seq = i
    return chunks
