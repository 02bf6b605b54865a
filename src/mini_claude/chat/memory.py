"""Conversation memory: OpenAI-shaped messages, trimmed to fit the model, saved as JSON.

A model has a fixed context window, so a long chat must forget. We forget whole turns, oldest first (a turn
is a user message and the reply to it), until the conversation fits both `max_turns` and a token budget.
The system prompt is never forgotten: it defines the assistant. Trimming is reported (`dropped_turns`),
never silent, and the full history stays in memory, so a saved conversation keeps everything.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROLES = ("system", "user", "assistant")
Message = dict[str, str]


class ConversationFileError(ValueError):
    """A conversation file or message that cannot be used."""


class ConversationMemory:
    def __init__(
        self,
        system_prompt: str | None = None,
        max_turns: int = 20,
        max_tokens: int | None = None,
        count_tokens: Callable[[list[Message]], int] | None = None,
    ) -> None:
        """
        Args:
            system_prompt: kept at the start of every context, whatever is trimmed.
            max_turns: most recent user turns (with their replies) to keep in the context.
            max_tokens: token budget of the rendered context; needs `count_tokens`.
            count_tokens: counts the tokens of a message list as the model will see them (chat template
                included), e.g. `lambda m: len(engine.encode_chat(m))`.
        """
        if max_turns < 1:
            raise ValueError("max_turns must be at least 1")
        self.system_prompt = system_prompt
        self.max_turns = max_turns
        self.max_tokens = max_tokens
        self.count_tokens = count_tokens
        self.history: list[Message] = []
        self.dropped_turns = 0  # how many turns the last `context()` left out

    def add(self, role: str, content: str) -> None:
        if role not in ROLES:
            raise ConversationFileError(f"unknown role {role!r} (expected one of {', '.join(ROLES)})")
        if role == "system":
            self.system_prompt = content
            return
        self.history.append({"role": role, "content": content})

    def add_user(self, content: str) -> None:
        self.add("user", content)

    def add_assistant(self, content: str) -> None:
        self.add("assistant", content)

    def reset(self) -> None:
        """Forget the conversation; the system prompt stays."""
        self.history.clear()
        self.dropped_turns = 0

    def _turns(self) -> list[list[Message]]:
        turns: list[list[Message]] = []
        for m in self.history:
            if m["role"] == "user" or not turns:
                turns.append([])
            turns[-1].append(m)
        return turns

    def context(self) -> list[Message]:
        """The messages to send: system prompt + the most recent turns that fit both limits.

        The newest turn is always kept; if it alone exceeds the token budget, the caller gets it anyway and the
        engine reports the overflow rather than this class dropping the user's message.
        """
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        turns = self._turns()
        keep = min(len(turns), self.max_turns)
        while keep > 1 and self.max_tokens is not None and self.count_tokens is not None:
            candidate = system + [m for t in turns[len(turns) - keep :] for m in t]
            if self.count_tokens(candidate) <= self.max_tokens:
                break
            keep -= 1
        self.dropped_turns = len(turns) - keep
        return system + [m for t in turns[len(turns) - keep :] for m in t]

    # ------------------------------------------------------------------------------------------- files
    def to_dict(self) -> dict[str, Any]:
        return {
            "system_prompt": self.system_prompt,
            "max_turns": self.max_turns,
            "max_tokens": self.max_tokens,
            "messages": list(self.history),
        }

    def save(self, path: str | Path) -> Path:
        path = Path(path).expanduser()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False))
        except OSError as exc:
            raise ConversationFileError(f"cannot write {path}: {exc.strerror or exc}") from None
        return path

    @classmethod
    def from_dict(
        cls, data: dict[str, Any], count_tokens: Callable[[list[Message]], int] | None = None
    ) -> ConversationMemory:
        if not isinstance(data, dict) or not isinstance(data.get("messages", []), list):
            raise ConversationFileError('a conversation is a JSON object with a "messages" list')
        max_turns, max_tokens = data.get("max_turns", 20), data.get("max_tokens")
        if not isinstance(max_turns, int) or isinstance(max_turns, bool) or max_turns < 1:
            raise ConversationFileError(f'"max_turns" must be a positive integer, not {max_turns!r}')
        if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool)):
            raise ConversationFileError(f'"max_tokens" must be an integer or null, not {max_tokens!r}')
        system = data.get("system_prompt")
        if system is not None and not isinstance(system, str):
            raise ConversationFileError('"system_prompt" must be a string or null')
        memory = cls(system, max_turns, max_tokens, count_tokens)
        for i, m in enumerate(data.get("messages", [])):
            if not isinstance(m, dict) or not isinstance(m.get("content"), str) or "role" not in m:
                raise ConversationFileError(f'message {i} needs a "role" and a string "content"')
            memory.add(m["role"], m["content"])
        return memory

    @classmethod
    def load(cls, path: str | Path, count_tokens: Callable[[list[Message]], int] | None = None) -> ConversationMemory:
        path = Path(path).expanduser()
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConversationFileError(f"no such file: {path}") from None
        except OSError as exc:
            raise ConversationFileError(f"cannot read {path}: {exc.strerror or exc}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConversationFileError(f"{path} is not a JSON conversation ({exc})") from None
        return cls.from_dict(data, count_tokens)
