"""Settings (`settings.py`): `MINI_CLAUDE_*` environment variables and a `.env` file, and that the CLI obeys them.

Every test runs in an empty temporary working directory with no `MINI_CLAUDE_*` variables set, so neither
the developer's environment nor a `.env` in the repository can leak in.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from helpers import save_tiny_model_dir
from mini_claude.__main__ import main
from mini_claude.catalog import bundled_model_path, resolve_model
from mini_claude.cli import load_engine
from mini_claude.quantize import Int4Linear, Int8Linear
from mini_claude.settings import Settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for key in list(os.environ):
        if key.startswith("MINI_CLAUDE_"):
            monkeypatch.delenv(key)
    workdir = tmp_path / "work"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    return workdir


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model dir in our own format, with a byte-level tokenizer (every byte a token, ChatML specials)."""
    return save_tiny_model_dir(tmp_path_factory.mktemp("models") / "tiny-env")


def test_defaults() -> None:
    s = Settings()
    assert (s.model, s.model_paths, s.dtype, s.quantize, s.threads) == (None, [], "auto", "auto", None)
    assert (s.max_tokens, s.system_prompt, s.memory_max_turns) == (512, None, 20)


def test_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MINI_CLAUDE_MODEL", "/models/x.gguf")
    monkeypatch.setenv("MINI_CLAUDE_QUANTIZE", "int8")
    monkeypatch.setenv("MINI_CLAUDE_MAX_TOKENS", "64")
    monkeypatch.setenv("MINI_CLAUDE_MODEL_PATHS", '["/a", "/b"]')
    monkeypatch.setenv("MINI_CLAUDE_SYSTEM_PROMPT", "Be kind.")
    s = Settings()
    assert (s.model, s.quantize, s.max_tokens, s.model_paths, s.system_prompt) == (
        "/models/x.gguf", "int8", 64, ["/a", "/b"], "Be kind.",
    )  # fmt: skip


@pytest.mark.parametrize(
    ("key", "value"),
    [("MINI_CLAUDE_QUANTIZE", "int3"), ("MINI_CLAUDE_DTYPE", "fp8"), ("MINI_CLAUDE_MAX_TOKENS", "0")],
)
def test_invalid_environment_values_are_rejected(monkeypatch: pytest.MonkeyPatch, key: str, value: str) -> None:
    monkeypatch.setenv(key, value)
    with pytest.raises(ValidationError):
        Settings()


def test_dotenv_in_the_working_dir(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (clean_env / ".env").write_text("MINI_CLAUDE_MODEL=/from/dotenv\nMINI_CLAUDE_QUANTIZE=none\nUNRELATED=1\n")
    s = Settings()
    assert (s.model, s.quantize) == ("/from/dotenv", "none")
    monkeypatch.setenv("MINI_CLAUDE_MODEL", "/from/env")  # the environment wins over the file
    assert Settings().model == "/from/env"


def test_model_setting_chooses_what_loads(tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_model(Settings().model) == bundled_model_path()  # nothing set: the bundled model
    monkeypatch.setenv("MINI_CLAUDE_MODEL", str(tiny_dir))
    monkeypatch.setenv("MINI_CLAUDE_QUANTIZE", "int8")
    engine = load_engine(None, Settings(), quiet=True)
    assert engine.source == str(tiny_dir) and engine.name == "tiny-env"
    assert isinstance(engine.model.layers[0].self_attn.q_proj, Int8Linear)
    # A flag beats the setting.
    engine = load_engine(None, Settings(), quantize="int4", quiet=True)
    assert isinstance(engine.model.layers[0].self_attn.q_proj, Int4Linear)


def test_cli_honours_dotenv(tiny_dir: Path, clean_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (clean_env / ".env").write_text(f"MINI_CLAUDE_MODEL={tiny_dir}\nMINI_CLAUDE_QUANTIZE=none\n")
    assert main(["generate", "hi", "--json", "--max-tokens", "3"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["model"] == "tiny-env" and result["completion_tokens"] == 3


def test_cli_honours_missing_model_setting(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("MINI_CLAUDE_MODEL", "/nonexistent")
    assert main(["generate", "hi"]) == 1
    err = capsys.readouterr().err
    assert err.splitlines() == [
        "mini-claude: error: model not found: /nonexistent (a .gguf file, a model dir, or smollm2-135m-instruct)"
    ]


def test_models_lists_the_configured_default_and_paths(
    tiny_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MINI_CLAUDE_MODEL", str(tiny_dir))
    monkeypatch.setenv("MINI_CLAUDE_MODEL_PATHS", json.dumps([str(tiny_dir), "/does/not/exist"]))
    assert main(["models", "--json"]) == 0
    entries = json.loads(capsys.readouterr().out)
    mine = [e for e in entries if e["path"] == str(tiny_dir)]
    assert len(mine) == 1 and mine[0]["source"] == "default" and mine[0]["kind"] == "dir"
    assert all(e["path"] != "/does/not/exist" for e in entries)
