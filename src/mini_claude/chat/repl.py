"""The terminal chat loop behind `mini-claude chat`.

It streams the engine's text as it arrives, keeps a `ConversationMemory`, and handles slash commands. With
`--knowledge`, each turn is grounded (`rag.grounding`: numbered sources in the prompt, unknown [n] marks cut
from the stream) and the sources are printed under the reply.
Ctrl-C during a reply stops that reply (what was shown is kept in the conversation); at the prompt it only
reminds how to leave, so an impatient keypress never loses the conversation.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, TextIO

from mini_claude.chat.memory import ConversationFileError, ConversationMemory
from mini_claude.engine import Engine
from mini_claude.generate import ContextOverflowError, SamplingParams

if TYPE_CHECKING:
    from mini_claude.rag.grounding import Grounding

HELP = """Commands:
  /reset         forget the conversation (the system prompt stays)
  /system TEXT   set the system prompt
  /save FILE     save the conversation as JSON
  /load FILE     load a conversation saved with /save
  /help          this help
  /exit          leave (Ctrl-D works too)
Ctrl-C stops a reply while it is being written."""


class ChatREPL:
    def __init__(
        self,
        engine: Engine,
        params: SamplingParams,
        system_prompt: str | None = None,
        max_turns: int = 20,
        out: TextIO | None = None,
        adapter: str | None = None,
        examples: list[dict[str, str]] | None = None,
        name: str | None = None,
        stop: list[str] | None = None,
        grounder: Callable[..., Grounding] | None = None,
    ) -> None:
        self.engine = engine
        # grounded chat (`--knowledge`): (messages, count, budget) -> the messages with numbered sources
        self.grounder = grounder
        self.params = params
        self.adapter = adapter  # a LoRA adapter loaded on the engine, or None for the base model
        self.examples = list(examples or [])  # an agent's few-shot messages: after the system prompt, never trimmed
        self.name = name  # the agent's, when chatting with one
        self.stop = list(stop or [])
        self.out = out if out is not None else sys.stdout  # looked up now: a default would bind at import
        budget = engine.context_window - params.max_new_tokens
        self.memory = ConversationMemory(system_prompt, max_turns, budget, self._count_tokens)

    def _count_tokens(self, messages: list[dict[str, str]]) -> int:
        return len(self.engine.encode_chat(self._framed(messages)))

    def _framed(self, messages: list[dict[str, str]]) -> list[dict[str, str]]:
        """The context with the few-shot examples after its system prompt."""
        if not self.examples:
            return messages
        head = 1 if messages and messages[0]["role"] == "system" else 0
        return messages[:head] + self.examples + messages[head:]

    def say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def run(self) -> None:
        who = f"{self.engine.name} + adapter {self.adapter}" if self.adapter else self.engine.name
        who = f"agent {self.name} ({who})" if self.name else who
        self.say(f"Chatting with {who}. Type /help for commands, /exit to leave.")
        while True:
            try:
                line = input("\n>>> ")
            except EOFError:
                self.say("")
                return
            except KeyboardInterrupt:
                self.say("\n(Use /exit or Ctrl-D to leave.)")
                continue
            text = line.strip()
            if not text:
                self.say("(Type a message, or /help for commands.)")
            elif text.startswith("/"):
                if not self.command(text):
                    return
            else:
                self.reply(text)

    def command(self, text: str) -> bool:
        """Run a slash command; returns False when the user wants to leave."""
        name, _, arg = text.partition(" ")
        arg = arg.strip()
        if name in ("/exit", "/quit"):
            return False
        if name == "/help":
            self.say(HELP)
        elif name == "/reset":
            self.memory.reset()
            self.say("(Conversation cleared.)")
        elif name == "/system":
            if not arg:
                self.say(f"(System prompt: {self.memory.system_prompt!r}. Use /system TEXT to change it.)")
            else:
                self.memory.system_prompt = arg
                self.say("(System prompt set.)")
        elif name in ("/save", "/load"):
            if not arg:
                self.say(f"(Usage: {name} FILE)")
            elif name == "/save":
                try:
                    self.say(f"(Saved {len(self.memory.history)} messages to {self.memory.save(arg)}.)")
                except ConversationFileError as exc:
                    self.say(f"(Could not save: {exc})")
            else:
                try:
                    loaded = ConversationMemory.load(arg, self._count_tokens)
                except ConversationFileError as exc:
                    self.say(f"(Could not load: {exc})")
                else:
                    loaded.max_tokens = self.memory.max_tokens
                    self.memory = loaded
                    self.say(f"(Loaded {len(loaded.history)} messages from {arg}.)")
        else:
            self.say(f"(Unknown command {name}. Type /help for commands.)")
        return True

    def reply(self, text: str) -> None:
        self.memory.add_user(text)
        context = self._framed(self.memory.context())
        if self.memory.dropped_turns:
            self.say(f"({self.memory.dropped_turns} earlier turn(s) no longer fit the context and were left out.)")
        pieces: list[str] = []
        grounding, marks = None, None
        if self.grounder is not None:
            from mini_claude.rag.grounding import MarkFilter

            budget = self.engine.context_window - self.params.max_new_tokens
            grounding = self.grounder(context, lambda m: len(self.engine.encode_chat(m)), budget)
            context, marks = grounding.messages, MarkFilter(grounding.numbers)
        stream = self.engine.chat(context, self.params, self.stop, adapter=self.adapter)
        try:
            for chunk in stream:
                text = chunk.text if marks is None else marks.feed(chunk.text)
                if marks is not None and chunk.completion is not None:
                    text += marks.flush()
                pieces.append(text)
                self.out.write(text)
                self.out.flush()
                if chunk.completion is not None and chunk.completion.finish_reason == "length":
                    self.out.write(" [reply cut at the token limit]")
        except KeyboardInterrupt:
            stream.close()
            self.out.write(" [stopped]")
        except ContextOverflowError as exc:
            self.memory.history.pop()  # the message never reached the model: leave the conversation as it was
            self.say(f"(That message is too long for this model: {exc}.)")
            return
        self.out.write("\n")
        if grounding is not None:
            from mini_claude.rag.grounding import sources_text

            self.out.write(sources_text(grounding, "".join(pieces)) + "\n")
        self.out.flush()
        self.memory.add_assistant("".join(pieces))
