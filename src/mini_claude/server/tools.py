"""Tool calling (`tools`, `tool_choice`, `parallel_tool_calls`) and structured outputs (`response_format`) as
grammars for the engine, and tool calls read back out of the generated text.

Design choices:
- One wire format for calls, Hermes' (used by Qwen2.5, SmolLM3, Hermes and most tool-trained small models):
  `<tool_call>\\n{"name": "NAME", "arguments": {...}}\\n</tool_call>`, several separated by a newline. A model
  whose chat template knows tools gets the tools through its template (`tools=` in the Jinja context); for one
  that does not (the bundled SmolLM2-135M), the tools and this format are described in the system prompt
  (`TOOL_PROMPT`), tool results come back as user turns wrapped in `<tool_response>`, and earlier calls are
  written in the same format. `docs/structured_outputs.md` documents it.
- The grammar does the rest, so even a 135M model emits calls that parse: `required` and a named function
  allow only calls; `auto` allows either a call or a text reply that does not start with `<` (the model
  decides with its first token, and once it starts a call the name must be one of the tools and the
  arguments must validate against that function's `parameters`). `none` leaves tools out of the prompt.
- Streaming: `ToolCallParser` re-reads the text so far on every chunk (replies are short) and reports what is
  new: a call's id and name once the name is complete, then argument fragments, as OpenAI streams them.
- The built-in knowledge tool (`search_knowledge`, which the server runs itself before answering) uses this
  module's plan, grammar and parser; its round is `server/grounding.py`'s `RagKnowledge.tool_round`.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from mini_claude.grammar import JSON_OPTIONS, Grammar

CALL_HEAD = '<tool_call>\n{"name": "'
CALL_MID = '", "arguments": '
CALL_TAIL = "}\n</tool_call>"
CALL_SEP = "\n"

TOOL_PROMPT = """You can call functions to help answer. To call one, reply with only:
<tool_call>
{{"name": "<function name>", "arguments": <arguments as a JSON object>}}
</tool_call>
Otherwise, answer the user directly. Function results come back in <tool_response> tags.
The functions:
{functions}"""


@dataclass
class ToolPlan:
    """What a request's tools mean for this generation: the functions the model may call, and how."""

    functions: list[dict[str, Any]]  # OpenAI's `function` objects: name, description, parameters
    choice: str  # "auto", "required", or a function's name
    parallel: bool = True
    ids: list[str] = field(default_factory=list)  # call ids, given out as calls appear (stable while streaming)

    @property
    def allowed(self) -> list[dict[str, Any]]:
        if self.choice in ("auto", "required"):
            return self.functions
        return [f for f in self.functions if f["name"] == self.choice]

    def grammar(self) -> Grammar:
        """Calls in the Hermes format with schema-checked arguments; with `auto`, a text reply instead."""
        rules, names = [], []
        for i, f in enumerate(self.allowed):
            params = dict(f.get("parameters") or {"type": "object", "properties": {}})
            params["x-guidance"] = JSON_OPTIONS
            head = json.dumps(CALL_HEAD + f["name"] + CALL_MID)
            rules.append(f"call_{i}: {head} args_{i} {json.dumps(CALL_TAIL)}")
            rules.append(f"args_{i}: %json {json.dumps(params)}")
            names.append(f"call_{i}")
        calls = "call | call " + json.dumps(CALL_SEP) + " calls" if self.parallel else "call"
        start = "calls | TEXT" if self.choice == "auto" else "calls"
        lines = [f"start: {start}", f"calls: {calls}", f"call: {' | '.join(names)}", *rules]
        if self.choice == "auto":
            lines.append(r"TEXT: /[^<](.|\n)*/")
        return Grammar.lark("\n".join(lines))

    def call_id(self, index: int) -> str:
        while len(self.ids) <= index:
            self.ids.append(f"call_{uuid.uuid4().hex[:24]}")
        return self.ids[index]


def system_prompt(functions: Sequence[dict[str, Any]]) -> str:
    """The documented tool prompt for templates that know no tools."""
    lines = [json.dumps({"type": "function", "function": f}, ensure_ascii=False) for f in functions]
    return TOOL_PROMPT.format(functions="\n".join(lines))


def format_call(name: str, arguments: str | dict[str, Any]) -> str:
    """One call in the prompt format (earlier calls of the conversation are written back this way)."""
    args = json.loads(arguments) if isinstance(arguments, str) else arguments
    return CALL_HEAD + name + CALL_MID + json.dumps(args, ensure_ascii=False) + CALL_TAIL


def plain_turn(message: dict[str, Any]) -> dict[str, str]:
    """A message as a plain role/content turn: calls written out, tool results as wrapped user turns."""
    role, content = message["role"], message.get("content") or ""
    if role == "tool":
        return {"role": "user", "content": f"<tool_response>\n{content}\n</tool_response>"}
    calls = message.get("tool_calls") or []
    if calls:
        written = CALL_SEP.join(format_call(c["function"]["name"], c["function"]["arguments"]) for c in calls)
        content = f"{content}\n{written}" if content else written
    return {"role": role, "content": content}


@dataclass
class ParsedCall:
    name: str | None  # None until the whole name has been generated
    arguments: str  # as much of the arguments JSON as there is so far
    complete: bool


def parse(text: str) -> tuple[str | None, list[ParsedCall]]:
    """Split generated text into (content, calls). Text that does not start a call is all content; calls
    still being generated come back incomplete (their name may be None, their arguments partial)."""
    if not text.startswith(CALL_HEAD[: len(text)]) or not text:  # not (the beginning of) a call
        return text, []
    calls: list[ParsedCall] = []
    pos, decoder = 0, json.JSONDecoder()
    while pos < len(text):
        if calls:
            if not text.startswith(CALL_SEP, pos):
                break
            pos += len(CALL_SEP)
        if not text.startswith(CALL_HEAD, pos):
            break  # a head still being generated (or what a model without a grammar made up)
        start = pos + len(CALL_HEAD)
        mid = text.find(CALL_MID, start)
        if mid < 0:
            calls.append(ParsedCall(None, "", False))
            break
        name, args_at = text[start:mid], mid + len(CALL_MID)
        try:
            _, end = decoder.raw_decode(text, args_at)
        except json.JSONDecodeError:  # arguments still being generated: all of the rest is arguments
            calls.append(ParsedCall(name, text[args_at:], False))
            break
        complete = text.startswith(CALL_TAIL, end)
        calls.append(ParsedCall(name, text[args_at:end], complete))
        if not complete:
            break
        pos = end + len(CALL_TAIL)
    return None, calls


def tool_calls(plan: ToolPlan, text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """The reply's content and its complete calls in OpenAI's shape."""
    content, calls = parse(text)
    out = [
        {"id": plan.call_id(i), "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
        for i, c in enumerate(calls)
        if c.complete
    ]
    return content, out


class ToolCallParser:
    """Streaming: feed text chunks, get OpenAI delta fields (`content`, or `tool_calls` entries) for what is new."""

    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self.text = ""
        self.sent_content = 0
        self.sent: list[int] = []  # per call: how many argument characters were sent (-1: not announced yet)

    def feed(self, chunk: str) -> list[dict[str, Any]]:
        self.text += chunk
        content, calls = parse(self.text)
        deltas: list[dict[str, Any]] = []
        if content is not None:
            # A prefix of CALL_HEAD is held back: it may still turn into a call.
            if content[self.sent_content :]:
                deltas.append({"content": content[self.sent_content :]})
                self.sent_content = len(content)
            return deltas
        for i, call in enumerate(calls):
            if call.name is None:
                break
            entry: dict[str, Any] = {"index": i}
            if i >= len(self.sent):
                self.sent.append(0)
                entry |= {"id": self.plan.call_id(i), "type": "function", "function": {"name": call.name,
                                                                                      "arguments": ""}}  # fmt: skip
            fragment = call.arguments[self.sent[i] :]
            if fragment:
                entry.setdefault("function", {})["arguments"] = fragment
                self.sent[i] = len(call.arguments)
            if len(entry) > 1:
                deltas.append({"tool_calls": [entry]})
        return deltas

    @property
    def called(self) -> bool:
        return any(c.complete for c in parse(self.text)[1])
