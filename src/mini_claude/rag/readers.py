"""Files to text: one reader per format, each returning the text a chunk's character span refers to.

Design choices:
- A reader returns a `Document`: the extracted text, its markup (`markdown`, `rst` or `plain`, which tells the
  chunker how headings look) and, for PDFs, the character offset at which each page starts, so a chunk's
  page is looked up from its span instead of being guessed.
- Formats without headings of their own in plain text are written out as Markdown: HTML `<h1>`-`<h6>` and Word
  "Heading N" paragraphs become `#` lines, list items and table rows become lines. Citations then quote the
  text a person sees, and one heading rule serves them all.
- Well-kept libraries do the parsing (pypdf, python-docx, BeautifulSoup over the stdlib parser); only the
  glue is ours. Anything a reader cannot handle raises `UnreadableFileError` with a one-line reason, which
  ingestion reports and skips.
- `.txt` is plain text, except Sphinx's `_sources/*.rst.txt` (reST under a .txt name), which is reST.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

SUFFIXES = (".txt", ".md", ".markdown", ".rst", ".html", ".htm", ".pdf", ".docx", ".json", ".jsonl")


class UnreadableFileError(ValueError):
    """A file that cannot be turned into text (unsupported, damaged, encrypted, not UTF-8, empty)."""


@dataclass
class Document:
    text: str
    markup: str = "plain"  # markdown | rst | plain: how the chunker finds headings
    page_starts: list[int] = field(default_factory=list)  # PDF: character offset where page i + 1 begins

    def page_at(self, offset: int) -> int | None:
        """The 1-based page holding character `offset`, or None for a document without pages."""
        if not self.page_starts:
            return None
        page = 0
        for i, start in enumerate(self.page_starts):
            if start <= offset:
                page = i
            else:
                break
        return page + 1


def supported(path: Path) -> bool:
    return path.suffix.lower() in SUFFIXES


def iter_files(paths: Iterable[str | Path]) -> Iterator[Path]:
    """Every file named, and every file under each folder named (recursively, sorted, hidden ones skipped).

    Unsupported files inside folders are yielded too, so ingestion can report them; a named path that does not
    exist raises FileNotFoundError.
    """
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir():
            for child in sorted(path.rglob("*")):
                rel = child.relative_to(path).parts
                if child.is_file() and not any(part.startswith(".") for part in rel):
                    yield child
        elif path.is_file():
            yield path
        else:
            raise FileNotFoundError(f"no such file or folder: {raw}")


def markup_of(path: Path) -> str:
    """How a file's text marks its structure (`Document.markup`), by its name: HTML and DOCX are read as Markdown."""
    name, suffix = path.name.lower(), path.suffix.lower()
    if name.endswith(".rst.txt") or suffix == ".rst":
        return "rst"
    return "markdown" if suffix in (".md", ".markdown", ".html", ".htm", ".docx") else "plain"


def read(path: Path, data: bytes | None = None) -> Document:
    """The text of a file (its bytes may be passed when already read), by its suffix."""
    data = path.read_bytes() if data is None else data
    suffix = path.suffix.lower()
    try:
        if markup_of(path) == "rst":
            doc = Document(_utf8(data), "rst")
        elif suffix in (".md", ".markdown"):
            doc = Document(_utf8(data), "markdown")
        elif suffix == ".txt":
            doc = Document(_utf8(data), "plain")
        elif suffix in (".html", ".htm"):
            doc = Document(html_to_markdown(_utf8(data, errors="replace")), "markdown")
        elif suffix == ".pdf":
            doc = read_pdf(data)
        elif suffix == ".docx":
            doc = Document(read_docx(data), "markdown")
        elif suffix == ".json":
            doc = Document(json_text(json.loads(_utf8(data))), "plain")
        elif suffix == ".jsonl":
            lines = [json_text(json.loads(line)) for line in _utf8(data).splitlines() if line.strip()]
            doc = Document("\n\n".join(lines), "plain")
        else:
            raise UnreadableFileError(f"unsupported file type {suffix or '(none)'}")
    except UnreadableFileError:
        raise
    except json.JSONDecodeError as exc:
        raise UnreadableFileError(f"invalid JSON: {exc}") from None
    except Exception as exc:  # a damaged PDF or DOCX raises whatever its parser raises
        raise UnreadableFileError(
            f"cannot read {suffix[1:]}: {' '.join(str(exc).split()) or type(exc).__name__}"
        ) from None
    if not doc.text.strip():
        raise UnreadableFileError("no text in it")
    return doc


def _utf8(data: bytes, errors: str = "strict") -> str:
    try:
        return data.decode("utf-8-sig", errors=errors).replace("\r\n", "\n")
    except UnicodeDecodeError as exc:
        raise UnreadableFileError(f"not UTF-8 text (byte {exc.start})") from None


def read_pdf(data: bytes) -> Document:
    """Each page's text (pypdf's layout-free extraction), pages separated by a blank line, page starts kept."""
    import io
    import logging

    from pypdf import PdfReader

    logging.getLogger("pypdf").setLevel(logging.ERROR)  # its warnings about damaged files; we report one line
    reader = PdfReader(io.BytesIO(data))
    if reader.is_encrypted:
        raise UnreadableFileError("the PDF is encrypted")
    parts: list[str] = []
    starts: list[int] = []
    offset = 0
    for page in reader.pages:
        text = (page.extract_text() or "").strip()
        starts.append(offset)
        parts.append(text)
        offset += len(text) + 2  # the "\n\n" joining pages
    return Document("\n\n".join(parts), "plain", starts)


def read_docx(data: bytes) -> str:
    """Paragraphs in order, "Heading N" styles as Markdown headings, tables as one line per row."""
    import io

    import docx
    from docx.table import Table
    from docx.text.paragraph import Paragraph

    document = docx.Document(io.BytesIO(data))
    blocks: list[str] = []
    for block in document.element.body.iterchildren():
        tag = block.tag.rsplit("}", 1)[-1]
        if tag == "p":
            paragraph = Paragraph(block, document)
            text = paragraph.text.strip()
            style = (paragraph.style.name if paragraph.style is not None else "") or ""
            if text and style.startswith("Heading") and style[7:].strip().isdigit():
                blocks.append("#" * min(int(style[7:]), 6) + " " + text)
            elif text and style == "Title":
                blocks.append("# " + text)
            elif text:
                blocks.append(text)
        elif tag == "tbl":
            table = Table(block, document)
            blocks.append("\n".join(" | ".join(c.text.strip() for c in row.cells) for row in table.rows))
    return "\n\n".join(blocks)


def html_to_markdown(html: str) -> str:
    """The visible text of an HTML page: headings as `#` lines, one block element per paragraph."""
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(html, "html.parser")
    for tag in soup(["script", "style", "noscript", "template", "head", "nav", "footer"]):
        tag.decompose()
    blocks: list[str] = []
    block_tags = ["h1", "h2", "h3", "h4", "h5", "h6", "p", "li", "pre", "blockquote", "tr", "dt", "dd", "figcaption"]
    for element in soup.find_all(block_tags):
        if element.find_parent(block_tags) is not None:
            continue  # its text is part of the enclosing block's
        pre = element.name == "pre"  # code keeps its lines
        text = element.get_text().strip("\n") if pre else " ".join(element.get_text(" ").split())
        if not text:
            continue
        if element.name[0] == "h" and element.name[1:].isdigit():
            text = "#" * int(element.name[1:]) + " " + text
        elif element.name == "tr":
            text = " | ".join(" ".join(c.get_text(" ").split()) for c in element.find_all(["td", "th"]))
        blocks.append(text)
    if not blocks:  # a page of bare text or divs only
        return "\n\n".join(" ".join(line.split()) for line in soup.get_text("\n").split("\n\n") if line.strip())
    return "\n\n".join(blocks)


def json_text(value: object, prefix: str = "") -> str:
    """A JSON value as `key.path: value` lines, so both field names and values are searchable."""
    if isinstance(value, dict):
        return "\n".join(json_text(v, f"{prefix}{k}.") for k, v in value.items())
    if isinstance(value, list):
        return "\n".join(json_text(v, prefix) for v in value)
    return f"{prefix[:-1]}: {value}" if prefix else str(value)
