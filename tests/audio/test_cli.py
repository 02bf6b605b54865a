"""`mini-claude speak`, `voices` and `transcribe`: the same pipeline from the command line."""

from __future__ import annotations

from pathlib import Path

import pytest

from mini_claude.__main__ import main
from mini_claude.audio import decode


@pytest.fixture(autouse=True)
def cache_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MINI_CLAUDE_AUDIO_CACHE_DIR", str(tmp_path / "audio-cache"))


@pytest.mark.slow
def test_speak_then_transcribe(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "hello.mp3"
    assert main(["speak", "Good morning, everyone.", "--voice", "hibari:heart", "-o", str(out)]) == 0
    assert 1.0 < decode(out.read_bytes()).size / 16_000 < 4
    assert "wrote" in capsys.readouterr().err
    assert main(["transcribe", str(out)]) == 0
    assert capsys.readouterr().out.strip().lower().rstrip(".") == "good morning, everyone"
    assert main(["transcribe", str(out), "--format", "srt"]) == 0
    assert capsys.readouterr().out.startswith("1\n00:00:00,000 --> ")
    assert any((tmp_path / "audio-cache").iterdir())


def test_voices_lists_the_default_voice_first(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["voices"]) == 0
    captured = capsys.readouterr()
    assert captured.out.split()[0] == "hibari:heart" and "# hibari: available" in captured.err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["speak", "Hi.", "-o", "out.xyz"], "cannot tell the audio format"),
        (["speak", "Hi.", "--voice", "nobody", "-o", "out.wav"], "The voice 'nobody' does not exist"),
        (["speak", "  ", "-o", "out.wav"], "nothing to say"),
        (["transcribe", "missing.wav"], "no such file"),
        (["transcribe", "README"], "not audio"),
    ],
)
def test_mistakes_are_one_line_errors(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "README").write_text("plain text, not a recording\n" * 20)
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("mini-claude: error: ") and message in err and err.count("\n") == 1
