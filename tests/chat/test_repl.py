"""The terminal chat loop (`chat/repl.py`), driven with scripted `input()` lines and a tiny real engine.

Replies are checked against `Engine.complete` on the conversation the REPL should have sent, so the tests
prove the loop passes the right context and records exactly what was shown.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from mini_claude.chat.repl import HELP, ChatREPL
from mini_claude.config import PRESETS
from mini_claude.engine import Engine, TextChunk
from mini_claude.generate import SamplingParams
from mini_claude.model import Transformer
from mini_claude.tokenizer import Tokenizer

pytestmark = pytest.mark.one_thread  # tiny models: a second thread only adds barrier waits

PARAMS = SamplingParams(temperature=0.0, max_new_tokens=8)
SYSTEM = "You are a test."


@pytest.fixture(scope="module")
def engine(smollm2_tokenizer: Tokenizer) -> Engine:
    """A tiny random model behind SmolLM2's real tokenizer and chat template."""
    tokenizer = smollm2_tokenizer
    model = Transformer(PRESETS["tiny-llama"].replace(vocab_size=tokenizer.vocab_size))
    model.init_weights(std=1.0, generator=torch.Generator().manual_seed(0))
    return Engine(model.eval(), tokenizer, "tiny")


class Script:
    """Stands in for `input()`: returns the lines in order; exceptions in the list are raised; then EOF."""

    def __init__(self, lines: list[Any]) -> None:
        self.lines = list(lines)
        self.prompts: list[str] = []

    def __call__(self, prompt: str = "") -> str:
        self.prompts.append(prompt)
        if not self.lines:
            raise EOFError
        item = self.lines.pop(0)
        if isinstance(item, BaseException) or (isinstance(item, type) and issubclass(item, BaseException)):
            raise item
        return item


def run(
    engine: Engine, lines: list[Any], monkeypatch: pytest.MonkeyPatch, system: str | None = SYSTEM, **kwargs: Any
) -> tuple[ChatREPL, str, Script]:
    out = io.StringIO()
    repl = ChatREPL(engine, kwargs.pop("params", PARAMS), system, out=out, **kwargs)
    script = Script(lines)
    monkeypatch.setattr("builtins.input", script)
    repl.run()
    return repl, out.getvalue(), script


def expected_reply(engine: Engine, messages: list[dict[str, str]], params: SamplingParams = PARAMS) -> str:
    return engine.complete(engine.encode_chat(messages), params).text


def record_contexts(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> list[list[dict[str, str]]]:
    """Wrap `engine.chat` to remember every conversation the REPL sends."""
    seen: list[list[dict[str, str]]] = []
    real = engine.chat

    def chat(messages, params=PARAMS, stop=(), adapter=None):
        seen.append([dict(m) for m in messages])
        return real(messages, params, stop, adapter)

    monkeypatch.setattr(engine, "chat", chat)
    return seen


# -------------------------------------------------------------------------------------------- replies


def test_replies_stream_and_are_remembered(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = record_contexts(engine, monkeypatch)
    repl, out, _ = run(engine, ["Hello", "How are you?"], monkeypatch)
    sys_msg = {"role": "system", "content": SYSTEM}
    first = expected_reply(engine, [sys_msg, {"role": "user", "content": "Hello"}])
    history = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": first}]
    second = expected_reply(engine, [sys_msg, *history, {"role": "user", "content": "How are you?"}])
    assert repl.memory.history == [
        *history,
        {"role": "user", "content": "How are you?"},
        {"role": "assistant", "content": second},
    ]
    assert seen == [[sys_msg, history[0]], [sys_msg, *history, {"role": "user", "content": "How are you?"}]]
    assert out.startswith("Chatting with tiny.")
    assert first in out and second in out
    assert out.count("[reply cut at the token limit]") == 2  # max_new_tokens=8 always runs out here


def test_help_unknown_empty_and_system_commands(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = record_contexts(engine, monkeypatch)
    lines = ["/help", "/frobnicate now", "", "   ", "/system", "/system Speak like a pirate.", "Hi"]
    repl, out, _ = run(engine, lines, monkeypatch)
    assert HELP in out
    assert "(Unknown command /frobnicate. Type /help for commands.)" in out
    assert out.count("(Type a message, or /help for commands.)") == 2
    assert f"(System prompt: {SYSTEM!r}." in out
    assert "(System prompt set.)" in out
    assert repl.memory.system_prompt == "Speak like a pirate."
    assert seen == [[{"role": "system", "content": "Speak like a pirate."}, {"role": "user", "content": "Hi"}]]


def test_reset_forgets_the_conversation_but_keeps_the_system_prompt(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = record_contexts(engine, monkeypatch)
    repl, out, _ = run(engine, ["one", "/reset", "two"], monkeypatch)
    assert "(Conversation cleared.)" in out
    assert seen[1] == [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "two"}]
    assert [m["content"] for m in repl.memory.history if m["role"] == "user"] == ["two"]


@pytest.mark.parametrize("leave", ["/exit", "/quit"])
def test_exit_stops_reading_input(engine: Engine, monkeypatch: pytest.MonkeyPatch, leave: str) -> None:
    repl, _, script = run(engine, ["/help", leave, "never read"], monkeypatch)
    assert script.lines == ["never read"]
    assert repl.memory.history == []


def test_end_of_input_leaves_and_ctrl_c_at_the_prompt_does_not(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    _, out, script = run(engine, [KeyboardInterrupt, "/help"], monkeypatch)
    assert "(Use /exit or Ctrl-D to leave.)" in out
    assert HELP in out  # the loop went on after Ctrl-C
    assert len(script.prompts) == 3  # Ctrl-C, /help, then EOF ended it
    assert all(p.endswith(">>> ") for p in script.prompts)


def test_save_and_load(engine: Engine, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "chat.json"
    repl, out, _ = run(
        engine, ["Remember me", f"/save {path}", "/reset", "/save", "/load", f"/load {path}"], monkeypatch
    )
    data = json.loads(path.read_text())
    assert data["system_prompt"] == SYSTEM
    assert [m["role"] for m in data["messages"]] == ["user", "assistant"]
    assert data["messages"][0]["content"] == "Remember me"
    assert f"(Saved 2 messages to {path}.)" in out
    assert "(Usage: /save FILE)" in out and "(Usage: /load FILE)" in out
    assert f"(Loaded 2 messages from {path}.)" in out
    assert repl.memory.history == data["messages"]
    assert repl.memory.max_tokens == engine.context_window - PARAMS.max_new_tokens  # the budget survives a load


def test_load_continues_a_saved_conversation(engine: Engine, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    saved = [{"role": "user", "content": "earlier"}, {"role": "assistant", "content": "reply"}]
    (tmp_path / "c.json").write_text(json.dumps({"system_prompt": "Loaded system.", "messages": saved}))
    seen = record_contexts(engine, monkeypatch)
    run(engine, [f"/load {tmp_path / 'c.json'}", "next"], monkeypatch)
    assert seen == [[{"role": "system", "content": "Loaded system."}, *saved, {"role": "user", "content": "next"}]]


def test_loading_a_bad_file_is_reported_and_the_chat_goes_on(
    engine: Engine, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "bad.json").write_text("{oops")
    repl, out, _ = run(
        engine, [f"/load {tmp_path / 'missing.json'}", f"/load {tmp_path / 'bad.json'}", "hi"], monkeypatch
    )
    assert "(Could not load: no such file:" in out
    assert "(Could not load:" in out and "is not a JSON conversation" in out
    assert repl.memory.history[0] == {"role": "user", "content": "hi"}


@pytest.mark.parametrize(
    ("command", "message"), [("/save", "(Could not save: cannot write"), ("/load", "(Could not load: cannot read")]
)
def test_file_errors_never_end_the_chat(
    engine: Engine, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, command: str, message: str
) -> None:
    _, out, _ = run(engine, [f"{command} {tmp_path}", "/help"], monkeypatch)  # a directory, not a file
    assert message in out
    assert HELP in out


# ----------------------------------------------------------------------------------- interrupts, limits


def test_ctrl_c_during_a_reply_keeps_the_partial_reply(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    params = SamplingParams(temperature=0.0, max_new_tokens=20)
    real = engine.chat
    shown: list[str] = []

    def interrupted_chat(messages, params=params, stop=(), adapter=None):
        def gen() -> Iterator[TextChunk]:
            for i, chunk in enumerate(real(messages, params, stop, adapter)):
                if i == 2:
                    raise KeyboardInterrupt  # as if Ctrl-C arrived while the third token was computed
                shown.append(chunk.text)
                yield chunk

        return gen()

    monkeypatch.setattr(engine, "chat", interrupted_chat)
    repl, out, _ = run(engine, ["Tell me a story", "/help"], monkeypatch, params=params)
    partial = "".join(shown)
    full = expected_reply(
        engine, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Tell me a story"}], params
    )
    assert len(shown) == 2 and partial and full.startswith(partial) and partial != full
    assert " [stopped]" in out
    assert out.index(partial) < out.index("[stopped]")
    assert repl.memory.history == [
        {"role": "user", "content": "Tell me a story"},
        {"role": "assistant", "content": partial},
    ]
    assert HELP in out.split("[stopped]", 1)[1]  # the REPL went on


def test_a_message_too_long_for_the_model_is_refused_and_forgotten(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    huge = "many words here " * 200  # far beyond the tiny model's 256-token window
    repl, out, _ = run(engine, ["short", huge, "after"], monkeypatch)
    assert "(That message is too long for this model:" in out
    assert [m["content"] for m in repl.memory.history if m["role"] == "user"] == ["short", "after"]


def test_old_turns_are_left_out_when_the_context_is_full(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = record_contexts(engine, monkeypatch)
    message = " ".join(["please remember this sentence"] * 12)  # ~60 tokens a turn against a 248-token budget
    repl, out, _ = run(engine, [f"{i}: {message}" for i in range(6)], monkeypatch)
    budget = engine.context_window - PARAMS.max_new_tokens
    assert all(len(engine.encode_chat(ctx)) <= budget for ctx in seen)
    assert seen[-1][0] == {"role": "system", "content": SYSTEM}
    assert seen[-1][-1]["content"] == f"5: {message}"
    assert "earlier turn(s) no longer fit the context and were left out." in out
    assert len(repl.memory.history) == 12  # nothing is deleted from the conversation itself


def test_replies_come_from_the_chosen_adapter(engine: Engine, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`mini-claude chat --adapter DIR`: every reply is generated with the adapter, and the banner says so."""
    import copy

    from mini_claude.lora import LoRAConfig, apply_lora, save_adapter

    tuned = Engine(copy.deepcopy(engine.model), engine.tokenizer, "tiny")  # the fixture stays untouched
    lora_model = apply_lora(copy.deepcopy(engine.model), LoRAConfig(r=4, alpha=8, init_lora_weights=False))
    tuned.load_adapter(save_adapter(lora_model, tmp_path / "tuned"))
    _, out, _ = run(tuned, ["Hello"], monkeypatch, adapter="tuned")
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hello"}]
    with_adapter = tuned.complete(tuned.encode_chat(messages), PARAMS, adapter="tuned").text
    assert with_adapter != expected_reply(tuned, messages)
    assert out.startswith("Chatting with tiny + adapter tuned.") and with_adapter in out
