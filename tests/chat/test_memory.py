"""Conversation memory (`chat/memory.py`): trimming by turns and by tokens, and the JSON file format.

The expected contexts are computed here from the definition (the longest run of newest whole turns that fits
both limits, behind the system prompt), not read back from the class.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from mini_claude.chat.memory import ConversationFileError, ConversationMemory, Message

SYSTEM = "You are a terse assistant."


def words(messages: list[Message]) -> int:
    """A stand-in token counter: whitespace-separated words, plus 2 per message for the template's markers."""
    return sum(len(m["content"].split()) + 2 for m in messages)


def conversation(n_turns: int, **kwargs) -> tuple[ConversationMemory, list[list[Message]]]:
    memory = ConversationMemory(**kwargs)
    turns = []
    for i in range(n_turns):
        user = {"role": "user", "content": f"question {i} " + "word " * i}
        reply = {"role": "assistant", "content": f"answer {i}"}
        memory.add_user(user["content"])
        memory.add_assistant(reply["content"])
        turns.append([user, reply])
    return memory, turns


def test_context_is_system_then_history() -> None:
    memory, turns = conversation(3, system_prompt=SYSTEM)
    assert memory.context() == [{"role": "system", "content": SYSTEM}, *[m for t in turns for m in t]]
    assert memory.dropped_turns == 0
    assert conversation(2)[0].context()[0]["role"] == "user"  # no system prompt, no system message


@pytest.mark.parametrize("max_turns", [1, 2, 4, 6, 10])
def test_max_turns_keeps_the_newest_turns_and_the_system_prompt(max_turns: int) -> None:
    memory, turns = conversation(6, system_prompt=SYSTEM, max_turns=max_turns)
    kept = turns[max(0, len(turns) - max_turns) :]
    assert memory.context() == [{"role": "system", "content": SYSTEM}, *[m for t in kept for m in t]]
    assert memory.dropped_turns == len(turns) - len(kept)
    assert len(memory.history) == 12  # trimming never deletes history


@pytest.mark.parametrize("budget", [10, 36, 48, 49, 75, 90, 1000])
def test_token_budget_keeps_the_longest_suffix_of_turns_that_fits(budget: int) -> None:
    memory, turns = conversation(8, system_prompt=SYSTEM, max_tokens=budget, count_tokens=words)
    system = [{"role": "system", "content": SYSTEM}]
    expected = 1  # the newest turn is always kept
    for k in range(len(turns), 0, -1):
        if words(system + [m for t in turns[-k:] for m in t]) <= budget:
            expected = k
            break
    context = memory.context()
    assert context == system + [m for t in turns[-expected:] for m in t]
    assert memory.dropped_turns == len(turns) - expected
    assert context[0] == system[0]


def test_newest_turn_is_kept_even_when_it_alone_is_over_budget() -> None:
    memory = ConversationMemory(SYSTEM, max_tokens=5, count_tokens=words)
    memory.add_user("short")
    memory.add_assistant("ok")
    memory.add_user("a very long message " * 10)
    context = memory.context()
    assert context == [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "a very long message " * 10}]
    assert memory.dropped_turns == 1


def test_both_limits_apply_together() -> None:
    memory, turns = conversation(6, max_turns=3, max_tokens=10_000, count_tokens=words)
    assert memory.context() == [m for t in turns[-3:] for m in t]
    memory.max_tokens = words(turns[-1])  # only the newest turn fits
    assert memory.context() == turns[-1]


def test_turns_start_at_user_messages() -> None:
    memory = ConversationMemory(max_turns=1)
    memory.add_assistant("Hello! How can I help?")  # an opening from the assistant is a turn of its own
    memory.add_user("first")
    memory.add_assistant("one")
    memory.add_user("second")  # a pending question with no reply yet is the newest turn
    assert memory.context() == [{"role": "user", "content": "second"}]
    memory.max_turns = 2
    assert memory.context() == [m for m in memory.history[1:]]
    assert memory.dropped_turns == 1


def test_system_role_sets_the_prompt_and_reset_keeps_it() -> None:
    memory = ConversationMemory()
    memory.add("system", SYSTEM)
    memory.add("user", "hi")
    assert memory.system_prompt == SYSTEM and memory.history == [{"role": "user", "content": "hi"}]
    memory.reset()
    assert memory.history == [] and memory.dropped_turns == 0
    assert memory.context() == [{"role": "system", "content": SYSTEM}]
    with pytest.raises(ConversationFileError, match="unknown role 'tool'"):
        memory.add("tool", "x")
    with pytest.raises(ValueError, match="max_turns"):
        ConversationMemory(max_turns=0)


# ------------------------------------------------------------------------------------------------ files


def test_save_load_round_trip(tmp_path: Path) -> None:
    memory, _ = conversation(4, system_prompt="Réponds en français 🇫🇷", max_turns=2, max_tokens=500)
    memory.add_user("und jetzt? 世界")
    path = memory.save(tmp_path / "sub" / "chat.json")  # parent dirs are created
    raw = path.read_text()
    assert "世界" in raw and "🇫🇷" in raw  # stored as readable UTF-8, not \\u escapes
    data = json.loads(raw)
    assert data["messages"] == memory.history and data["system_prompt"] == memory.system_prompt
    loaded = ConversationMemory.load(path, count_tokens=words)
    assert loaded.to_dict() == memory.to_dict()
    assert loaded.count_tokens is words
    assert loaded.context() == memory.context()


def test_saved_file_keeps_turns_the_context_dropped(tmp_path: Path) -> None:
    memory, _ = conversation(5, max_turns=1)
    memory.context()
    assert memory.dropped_turns == 4
    loaded = ConversationMemory.load(memory.save(tmp_path / "c.json"))
    assert len(loaded.history) == 10


def test_load_accepts_a_bare_messages_file(tmp_path: Path) -> None:
    """A file with only "messages" (e.g. written by another tool); a system message there sets the prompt."""
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hi"}]
    (tmp_path / "m.json").write_text(json.dumps({"messages": messages}))
    loaded = ConversationMemory.load(tmp_path / "m.json")
    assert loaded.system_prompt == SYSTEM and loaded.history == messages[1:] and loaded.max_turns == 20


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"{not json", "is not a JSON conversation"),
        (b"\xff\xfe\x00garbage", "is not a JSON conversation"),
        (b"[1, 2, 3]", 'a conversation is a JSON object with a "messages" list'),
        (b'{"messages": "hello"}', 'a conversation is a JSON object with a "messages" list'),
        (b'{"messages": [{"role": "user", "content": "ok"}, {"content": "no role"}]}', 'message 1 needs a "role"'),
        (b'{"messages": [{"role": "user", "content": 5}]}', 'message 0 needs a "role" and a string "content"'),
        (b'{"messages": ["just text"]}', "message 0 needs"),
        (b'{"messages": [{"role": "wizard", "content": "x"}]}', "unknown role 'wizard'"),
    ],
)
def test_bad_files_raise_conversation_file_error(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    with pytest.raises(ConversationFileError, match=re.escape(message)):
        ConversationMemory.load(path)


def test_missing_file_raises_conversation_file_error(tmp_path: Path) -> None:
    with pytest.raises(ConversationFileError, match="no such file"):
        ConversationMemory.load(tmp_path / "nope.json")


def test_a_directory_raises_conversation_file_error(tmp_path: Path) -> None:
    with pytest.raises(ConversationFileError, match="cannot read"):
        ConversationMemory.load(tmp_path)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"max_turns": 0}, '"max_turns" must be a positive integer'),
        ({"max_turns": "ten"}, '"max_turns" must be a positive integer'),
        ({"max_turns": True}, '"max_turns" must be a positive integer'),
        ({"max_tokens": 1.5}, '"max_tokens" must be an integer or null'),
        ({"system_prompt": 5}, '"system_prompt" must be a string or null'),
    ],
)
def test_bad_settings_in_a_file_raise_conversation_file_error(tmp_path: Path, fields: dict, message: str) -> None:
    (tmp_path / "c.json").write_text(json.dumps({"messages": [], **fields}))
    with pytest.raises(ConversationFileError, match=re.escape(message)):
        ConversationMemory.load(tmp_path / "c.json")


def test_saving_to_an_unwritable_path_raises_conversation_file_error(tmp_path: Path) -> None:
    memory, _ = conversation(1)
    with pytest.raises(ConversationFileError, match="cannot write"):
        memory.save(tmp_path)  # a directory
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConversationFileError, match="cannot write"):
        memory.save(tmp_path / "file" / "below.json")  # a parent that is a file
