"""`mini-claude chat --knowledge NAME` as a user runs it: a real process on the bundled model over a collection
made with `mini-claude ingest`; the sources are printed under the reply, and an unknown collection is one line."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mini_claude.__main__ import main


def env(url: str) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MINI_CLAUDE_") or "KERNELS" in k}
    return clean | {"MINI_CLAUDE_DATABASE_URL": url, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}


@pytest.mark.slow
def test_chat_with_knowledge_prints_the_sources_under_the_reply(
    corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path / 'kb.db'}"
    assert main(["ingest", str(corpus / "cooking"), "--collection", "kitchen", "--database-url", url]) == 0
    capsys.readouterr()
    lines = ["How long should the dough rise?", "/exit"]
    result = subprocess.run(
        [sys.executable, "-m", "mini_claude", "chat", "--knowledge", "kitchen", "--max-tokens", "24",
         "--temperature", "0"],
        input="\n".join(lines) + "\n", capture_output=True, text=True, env=env(url), cwd=tmp_path, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "Sources:\n" in out, out
    sources = re.findall(r"^  \[(\d+)\] (\S+), (.*) \(chars (\d+)-(\d+)\)(  cited)?$", out.split("Sources:\n")[1], re.M)
    assert [int(n) for n, *_ in sources] == list(range(1, len(sources) + 1)) and 1 <= len(sources) <= 4
    bread = (corpus / "cooking" / "bread.md").read_text()
    assert sources[0][1] == "bread.md" and "Proofing" in sources[0][2]  # the rising section ranks first
    start, end = int(sources[0][3]), int(sources[0][4])
    assert "rise in a warm place" in bread[start:end]
    reply = out.split(">>> ", 1)[1].split("Sources:")[0]
    cited = {int(n) for n, *rest in sources if rest[-1]}
    assert {int(n) for n in re.findall(r"\[(\d+)\]", reply)} == cited  # marks shown are exactly the cited ones


def test_an_unknown_collection_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setenv("MINI_CLAUDE_DATABASE_URL", f"sqlite:///{tmp_path / 'empty.db'}")
    code = main(["chat", "--knowledge", "nope"])
    _, err = capsys.readouterr()
    assert code == 1 and err.count("\n") == 1 and "no collection named 'nope'" in err
