"""The retrieval commands as a user runs them: ingest, search, remove-file, collections, eval-rag."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mini_claude.__main__ import main

pytestmark = pytest.mark.one_thread


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_ingest_search_remove(capsys: pytest.CaptureFixture[str], corpus: Path, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    (corpus / "notes.docx").write_bytes(b"PK not a zip")
    code, out, err = run(capsys, "ingest", str(corpus / "cooking"), str(corpus / "space"), str(corpus / "notes.docx"),
                         "--collection", "kb", "--database-url", url)  # fmt: skip
    assert code == 0
    assert out.startswith("kb: added 4, updated 0, deleted 0, skipped 0, failed 1;")
    assert err.count("\n") == 1 and "notes.docx: cannot read docx" in err  # one line for the unreadable file

    code, out, _ = run(capsys, "ingest", str(corpus / "cooking"), "--collection", "kb", "--database-url", url, "--json")
    assert json.loads(out)["skipped"] == 2

    code, out, _ = run(capsys, "search", "largest planet gas giant", "--collection", "kb", "--database-url", url,
                       "--json", "--k", "2")  # fmt: skip
    hits = json.loads(out)
    assert code == 0 and hits[0]["filename"] == "planets.rst" and hits[0]["heading"].startswith("Planets")
    assert {"chunk_id", "start_char", "end_char", "page", "score", "ranks", "source"} <= set(hits[0])

    code, out, _ = run(capsys, "search", "largest planet gas giant", "--collection", "kb", "--database-url", url,
                       "--json", "--k", "2", "--rerank")  # fmt: skip
    reranked = json.loads(out)  # the bundled chat model read the first stage's hits with the question
    assert code == 0 and len(reranked) == 2 and all(h["ranks"]["rerank"] >= 1 for h in reranked)
    assert reranked[0]["filename"] == "planets.rst"

    code, out, _ = run(capsys, "search", "bread", "--collection", "kb", "--database-url", url)
    assert out.startswith(f"[1] {(corpus / 'cooking' / 'bread.md').resolve()}") and "Baking bread" in out

    code, out, _ = run(capsys, "remove-file", str(corpus / "space"), "--collection", "kb", "--database-url", url)
    assert code == 0 and out.count("removed ") == 2
    code, out, _ = run(capsys, "collections", "--database-url", url)
    assert out.split()[:5] == ["kb", "2", "files", "3", "chunks"] or out.split()[:3] == ["kb", "2", "files"]

    for flags in ([], ["--rerank"]):  # with --rerank before the model loads
        code, _, err = run(capsys, "search", "x", "--collection", "nope", "--database-url", url, *flags)
        assert code == 1 and err.count("\n") == 1
        assert err.startswith("mini-claude: error: no collection named 'nope'") and "mini-claude ingest" in err


def test_eval_rag_on_a_few_questions(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from mini_claude.rag.evaluate import PARAPHRASED, PYTHON_DOCS, load_questions

    if not PYTHON_DOCS.is_dir():
        pytest.skip("python3.11-doc is not installed (.ci/run installs it)")
    questions = load_questions()
    assert len(questions) >= 100 and len({q.file for q in questions}) >= 30
    paraphrased = load_questions(PARAPHRASED)  # every gold span still holds its anchor in these docs
    assert len(paraphrased) >= 100 and {q.split for q in paraphrased} == {"dev", "test"}
    assert {q.file for q in paraphrased} <= {q.file for q in questions}  # one corpus serves both sets
    code, out, _ = run(capsys, "eval-rag", "--max-questions", "3", "--database-url", f"sqlite:///{tmp_path / 'e.db'}",
                       "--json", "--chart", str(tmp_path / "chart.png"))  # fmt: skip
    figures = json.loads(out)
    assert code == 0 and figures["corpus_chunks"] > 10 and set(figures["sets"]) == {"titles", "paraphrased"}
    for results in figures["sets"].values():
        assert results["questions"] == 3 and set(results["modes"]) == {"hybrid", "keyword", "dense"}
        for mode in results["modes"].values():
            assert 0 <= mode["hit"]["1"] <= mode["hit"]["5"] <= mode["hit"]["10"] <= 1
        assert results["modes"]["hybrid"]["hit"]["10"] >= 2 / 3
    assert (tmp_path / "chart.png").read_bytes()[:4] == b"\x89PNG"
    code, out, _ = run(capsys, "eval-rag", "--questions", "paraphrased", "--max-questions", "12", "--database-url",
                       f"sqlite:///{tmp_path / 'e.db'}", "--json")  # fmt: skip
    figures = json.loads(out)
    whole, splits = figures["sets"]["paraphrased"], figures["splits"]
    assert set(splits) == {"paraphrased dev", "paraphrased test"}
    assert sum(s["questions"] for s in splits.values()) == whole["questions"] == 12
    for mode, result in whole["modes"].items():  # the splits' figures are the whole set's, question by question
        for key in ("1", "5", "10"):
            parts = sum(s["modes"][mode]["hit"][key] * s["questions"] for s in splits.values())
            assert parts == pytest.approx(result["hit"][key] * 12)
