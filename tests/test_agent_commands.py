"""`mini-claude agent create|list|show|delete` on a real SQLite file, and `mini-claude chat --agent NAME`
against the engine's own reply to the prompt the agent should produce."""

from __future__ import annotations

import builtins
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import save_tiny_model_dir
from mini_claude.__main__ import main
from mini_claude.engine import Engine
from mini_claude.generate import SamplingParams

YAML = """\
FROM: {model}
SYSTEM: You answer in one word.
PARAMETER:
  num_predict: 6
  temperature: 0
  repeat_penalty: 1.0
  top_p: 1.0
MESSAGE:
  - role: user
    content: Colour of the sky?
  - role: assistant
    content: Blue.
voice: hibari:heart
"""


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for key in list(os.environ):
        if key.startswith("MINI_CLAUDE_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MINI_CLAUDE_DATABASE_URL", f"sqlite:///{tmp_path / 'agents.db'}")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model_dir(tmp_path_factory.mktemp("models") / "tiny")


def test_create_list_show_delete(tmp_path: Path, tiny_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "sky.yaml"
    path.write_text(YAML.format(model=tiny_dir))
    assert main(["agent", "create", str(path)]) == 0
    assert "created agent sky" in capsys.readouterr().out
    assert main(["agent", "create", str(path)]) == 1
    assert "pass --replace" in capsys.readouterr().err
    assert main(["agent", "list", "--json"]) == 0
    (listed,) = json.loads(capsys.readouterr().out)
    assert listed["name"] == "sky" and listed["params"]["max_tokens"] == 6
    assert listed["voice"] == {"voice": "hibari:heart", "speed": None}

    # `show` prints YAML that `create` reads back to the same agent.
    assert main(["agent", "show", "sky"]) == 0
    again = tmp_path / "again.yaml"
    again.write_text(capsys.readouterr().out)
    assert main(["agent", "create", str(again), "--replace", "--temperature", "0.5"]) == 0  # its `name` wins
    assert "replaced agent sky" in capsys.readouterr().out
    assert main(["agent", "show", "sky", "--format", "json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown == listed | {"params": listed["params"] | {"temperature": 0.5}}

    assert main(["agent", "create", "plain", "--system", "Hi.", "--knowledge", '["docs"]']) == 0
    capsys.readouterr()
    assert main(["agent", "delete", "plain"]) == 0
    assert main(["agent", "delete", "plain"]) == 1
    assert capsys.readouterr().err.strip() == "mini-claude: error: no agent named 'plain'"


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("PARAMETER: {temperature: 9}\n", "agent 'bad': params.temperature: Input should be less than or equal to 2"),
        ("TEMPLATE: '{{ .Prompt }}'\n", "agent 'bad': template: not supported"),
        ("model: tiny\nvoice: {speed: 2}\n", "agent 'bad': voice.voice: Field required"),
        ("messages: [{role: robot, content: hi}]\n", "agent 'bad': messages.0.role"),
        ("FROM: [unclosed\n", "is not valid YAML"),
    ],
)
def test_invalid_definitions_are_one_line_and_a_failure(
    tmp_path: Path, text: str, words: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert main(["agent", "create", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err and "Traceback" not in err


@pytest.fixture
def typed(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    lines: list[str] = []

    def fake_input(prompt: str = "") -> str:
        if not lines:
            raise EOFError
        return lines.pop(0)

    monkeypatch.setattr(builtins, "input", fake_input)
    yield lines


def test_chat_with_an_agent_from_the_agents_dir(
    tmp_path: Path, tiny_dir: Path, typed: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "agents").mkdir()
    (tmp_path / "agents" / "sky.yaml").write_text(YAML.format(model=tiny_dir))
    typed.append("Colour of grass?")
    assert main(["chat", "--agent", "sky", "--quantize", "none", "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    engine = Engine.load(tiny_dir, dtype="float32", quantize="none")
    prompt = [{"role": "system", "content": "You answer in one word."},
              {"role": "user", "content": "Colour of the sky?"}, {"role": "assistant", "content": "Blue."},
              {"role": "user", "content": "Colour of grass?"}]  # fmt: skip
    params = SamplingParams(max_new_tokens=6, temperature=0.0, top_p=1.0, repetition_penalty=1.0)
    reply = engine.complete(engine.encode_chat(prompt), params).text
    assert out.startswith("Chatting with agent sky (tiny).")
    assert reply in out


def test_chat_with_an_unknown_agent_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["chat", "--agent", "nobody"]) == 1
    assert "no agent named 'nobody'" in capsys.readouterr().err
