"""Readers: every format to the text a person sees, with headings as Markdown and PDF page starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mini_claude.rag.readers import UnreadableFileError, html_to_markdown, iter_files, read


def tiny_pdf(pages: list[str]) -> bytes:
    """A minimal valid PDF (Helvetica text, one line per page), written by hand so no PDF writer is needed."""
    n = len(pages)
    objects = [
        "<< /Type /Catalog /Pages 2 0 R >>",
        f"<< /Type /Pages /Kids [{' '.join(f'{4 + 2 * i} 0 R' for i in range(n))}] /Count {n} >>",
        "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    for i, text in enumerate(pages):
        stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET"
        objects.append(
            "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 3 0 R >> >> "
            f"/Contents {5 + 2 * i} 0 R >>"
        )
        objects.append(f"<< /Length {len(stream)} >>\nstream\n{stream}\nendstream")
    out, offsets = b"%PDF-1.4\n", []
    for i, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += f"{i} 0 obj\n{body}\nendobj\n".encode()
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{o:010d} 00000 n \n".encode() for o in offsets)
    return out + f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()


def test_pdf_pages_are_kept(tmp_path: Path) -> None:
    path = tmp_path / "a.pdf"
    path.write_bytes(tiny_pdf(["First page about whales.", "Second page about owls."]))
    doc = read(path)
    assert doc.text == "First page about whales.\n\nSecond page about owls."
    assert doc.page_starts == [0, len("First page about whales.") + 2]
    assert doc.page_at(doc.text.index("owls")) == 2 and doc.page_at(0) == 1


def test_docx_headings_become_markdown(tmp_path: Path) -> None:
    import docx

    document = docx.Document()
    document.add_heading("Install", level=1)
    document.add_paragraph("Run the installer.")
    document.add_heading("Options", level=2)
    table = document.add_table(rows=1, cols=2)
    table.rows[0].cells[0].text, table.rows[0].cells[1].text = "--quiet", "no output"
    document.save(tmp_path / "a.docx")
    doc = read(tmp_path / "a.docx")
    assert doc.markup == "markdown"
    assert doc.text == "# Install\n\nRun the installer.\n\n## Options\n\n--quiet | no output"


def test_html_drops_scripts_and_keeps_headings() -> None:
    html = "<html><head><script>x=1</script></head><body><h2>Title</h2><p>Some <b>bold</b> text.</p>" \
           "<ul><li>one</li><li>two</li></ul></body></html>"  # fmt: skip
    assert html_to_markdown(html) == "## Title\n\nSome bold text.\n\none\n\ntwo"


def test_text_formats(tmp_path: Path) -> None:
    (tmp_path / "a.rst.txt").write_text("Title\n=====\n\nBody.\n")
    (tmp_path / "b.json").write_text(json.dumps({"name": "Ada", "tags": ["math", "code"]}))
    (tmp_path / "c.jsonl").write_text('{"q": "one"}\n\n{"q": "two"}\n')
    assert read(tmp_path / "a.rst.txt").markup == "rst"
    assert read(tmp_path / "b.json").text == "name: Ada\ntags: math\ntags: code"
    assert read(tmp_path / "c.jsonl").text == "q: one\n\nq: two"


@pytest.mark.parametrize(
    ("name", "data", "reason"),
    [
        ("bad.pdf", b"%PDF-1.4 garbage", "cannot read pdf"),
        ("bin.txt", b"\xff\xfe\x00\x81", "not UTF-8"),
        ("empty.md", b"  \n", "no text"),
        ("bad.json", b"{", "invalid JSON"),
        ("x.xyz", b"hello", "unsupported file type .xyz"),
    ],
)
def test_unreadable_files_raise_one_line(tmp_path: Path, name: str, data: bytes, reason: str) -> None:
    (tmp_path / name).write_bytes(data)
    with pytest.raises(UnreadableFileError, match=reason) as info:
        read(tmp_path / name)
    assert "\n" not in str(info.value)


def test_folders_recurse_and_skip_hidden(tmp_path: Path) -> None:
    for name in ("a.md", "sub/b.txt", "sub/deeper/c.html", ".git/config", "sub/.hidden.md"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    found = [p.relative_to(tmp_path).as_posix() for p in iter_files([tmp_path])]
    assert found == ["a.md", "sub/b.txt", "sub/deeper/c.html"]
    with pytest.raises(FileNotFoundError):
        list(iter_files([tmp_path / "missing"]))
