"""Chat and text completions in OpenAI's wire format; requests turn themselves into the engine's `SamplingParams`.

Design choices:
- Requests are validated here and nowhere else: a value out of OpenAI's documented range (temperature in
  [0, 2], top_p in (0, 1], at most 4 stop strings, ...) fails validation, which the app reports as a 400 in
  OpenAI's error shape. Numbers that would make the sampler overflow are kept out by the same ranges, so no
  request can crash a decode step that other requests share.
- Unknown fields are ignored, as vLLM does, so clients that send newer OpenAI fields keep working. Known
  OpenAI features that this server does not implement (penalties other than `repetition_penalty`,
  `logit_bias`, the legacy `functions`, `best_of`, `suffix`) are *refused* when set to a non-default value
  rather than silently ignored: a caller that asks for them would otherwise get something other than what it
  asked for. Tools, `response_format` and log-probabilities are implemented (see `server/tools.py`); whether
  a schema is supported is decided where the tokenizer is (a 400 naming the feature).
- Extensions ride in the same body (the `openai` client sends them through `extra_body`): `top_k`,
  `repetition_penalty`, `ignore_eos` (vLLM's name), `conversation_id` for server-side memory, and
  `knowledge` (+ `retrieval`) for grounded chat, whose answers carry `citations` (`protocol/knowledge.py`).
- Booleans are strict (`"stream": "yes"` is an error, not true). Every string is checked to be valid
  Unicode: JSON may carry lone surrogates (`"\\ud800"`), which neither the tokenizer nor the database can
  encode.
- Responses are models too, so the OpenAPI schema documents them; streaming chunks use the same models.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, model_validator

from mini_claude.agents import MAX_COLLECTIONS, Retrieval
from mini_claude.generate import MAX_TOP_LOGPROBS, SamplingParams
from mini_claude.server.protocol.common import INT64, _Request
from mini_claude.server.protocol.knowledge import Citation, KnowledgeReport, citations_field, knowledge_field
from mini_claude.text import Text

MAX_STOP_STRINGS = 4  # OpenAI's limit
MAX_CHOICES = 16
# Below this a temperature only divides logits by a number so small that float32 overflows (inf - inf = nan
# in the softmax); the limit of sampling as temperature -> 0 is greedy decoding, which is what we do instead.
GREEDY_BELOW = 1e-5
# The sampler compares top_p with float32 numbers, where anything below ~1e-45 is 0 and every token would be
# dropped (a crash for the whole batch). Any top_p under the most likely token's probability (>= 1 / vocab)
# keeps just that token, so raising tiny values to this floor changes nothing else.
SMALLEST_TOP_P = 1e-6


class TextPart(_Request):
    type: Literal["text"]
    text: Text


FunctionName = Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]  # OpenAI's rule for function names


class FunctionCall(_Request):
    name: Text
    arguments: Text  # a JSON text, as OpenAI sends it


class ToolCall(_Request):
    id: Text
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Request):
    """One message. `developer` is OpenAI's newer name for `system`; content may be a list of text parts. An
    assistant message may carry `tool_calls` (and no content); a `tool` message answers one by its id."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None
    name: Text | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: Text | None = None

    @model_validator(mode="after")
    def _check_content(self) -> ChatMessage:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content: required (only an assistant message with tool_calls may leave it out)")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("tool_call_id: required in a tool message")
        return self

    @property
    def norm_role(self) -> str:
        return "system" if self.role == "developer" else self.role

    @property
    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)

    def to_template(self) -> dict[str, Any]:
        """The message as chat templates read it (tool-call arguments as objects, as Hugging Face's do)."""
        out: dict[str, Any] = {"role": self.norm_role, "content": self.text}
        if self.tool_calls:
            out["tool_calls"] = [
                {"id": c.id, "type": "function",
                 "function": {"name": c.function.name, "arguments": _json_or_text(c.function.arguments)}}
                for c in self.tool_calls
            ]  # fmt: skip
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


class FunctionDefinition(_Request):
    name: FunctionName
    description: Text | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None


class Tool(_Request):
    type: Literal["function"]
    function: FunctionDefinition


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: dict[str, Text]

    @model_validator(mode="after")
    def _check_name(self) -> NamedToolChoice:
        if "name" not in self.function:
            raise ValueError("tool_choice: a named choice needs function.name")
        return self


class JsonSchemaFormat(_Request):
    name: Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
    description: Text | None = None
    schema_: dict[str, Any] | bool = Field(True, alias="schema")
    strict: StrictBool | None = None


class ResponseFormat(_Request):
    """`text` (free), `json_object` (any JSON object) or `json_schema` (JSON that validates against it)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _check_schema(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("json_schema: required when type is json_schema")
        return self


class StreamOptions(_Request):
    include_usage: StrictBool = False


class SamplingRequest(_Request):
    """Fields shared by chat and text completions."""

    model: Text | None = Field(None, description="The served model's id (see /v1/models); default: that model.")
    max_tokens: int | None = Field(None, ge=1, description="Most tokens to generate.")
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="0 is greedy; default 1.")
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: Text | list[Text] | None = Field(None, description=f"Up to {MAX_STOP_STRINGS} strings that end the text.")
    seed: int | None = Field(None, ge=-INT64, lt=INT64, description="Makes sampling repeatable.")
    n: int = Field(1, ge=1, le=MAX_CHOICES, description="Choices to generate, each its own sequence.")
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: Text | None = None
    # extensions
    top_k: int | None = Field(None, ge=1, description="Sample only among the k most likely tokens.")
    repetition_penalty: float | None = Field(None, ge=0.01, le=10.0, description="> 1 discourages repeats.")
    ignore_eos: StrictBool = Field(False, description="Never stop at end-of-sequence (benchmarks).")
    # accepted for compatibility; refused unless left at their "off" value
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None

    @model_validator(mode="after")
    def _check(self) -> SamplingRequest:
        if isinstance(self.stop, list) and len(self.stop) > MAX_STOP_STRINGS:
            raise ValueError(f"stop: at most {MAX_STOP_STRINGS} stop strings are allowed")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed when stream is true")
        for name in self.unsupported_in_use():
            hint = " (use repetition_penalty)" if name.endswith("_penalty") else ""
            raise ValueError(f"{name}: not supported by this server{hint}")
        return self

    def unsupported_in_use(self) -> list[str]:
        """OpenAI fields this server does not implement that the request sets to something other than "off"."""
        used = {"presence_penalty": self.presence_penalty, "frequency_penalty": self.frequency_penalty}
        return [name for name, value in used.items() if value] + (["logit_bias"] if self.logit_bias else [])

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def to_sampling_params(
        self, max_new_tokens: int, choice: int = 0, defaults: dict[str, Any] | None = None
    ) -> SamplingParams:
        """The engine's parameters for one choice; choice `i` of a seeded request uses seed + i.

        Args:
            max_new_tokens: the token budget, already checked against the context window by the caller.
            choice: which of the `n` choices (each needs its own seed, or all n would be identical).
            defaults: values for fields the request left out (the API uses OpenAI's, the chat UI gentler ones).
        """
        # OpenAI's defaults, unless the caller has others; then whatever the request sets.
        d = {"temperature": 1.0, "top_p": 1.0, "top_k": None, "repetition_penalty": 1.0, **(defaults or {})}
        d.update({k: v for k in d if (v := getattr(self, k)) is not None})
        return SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=0.0 if d["temperature"] < GREEDY_BELOW else d["temperature"],
            top_k=d["top_k"],
            top_p=max(d["top_p"], SMALLEST_TOP_P),
            repetition_penalty=d["repetition_penalty"],
            seed=None if self.seed is None else self.seed + choice,
            ignore_eos=self.ignore_eos,
            logprobs=self.top_logprob_count() is not None,
            top_logprobs=self.top_logprob_count() or 0,
        )

    def top_logprob_count(self) -> int | None:
        """None: no log-probabilities; else how many alternatives per token."""
        return None


class ChatCompletionRequest(SamplingRequest):
    model_config = ConfigDict(extra="ignore", json_schema_extra={"examples": [
        {"messages": [{"role": "system", "content": "You are concise."}, {"role": "user", "content": "Hi!"}],
         "max_tokens": 8, "temperature": 0},
        {"messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 8, "stream": True,
         "stream_options": {"include_usage": True}, "n": 2, "seed": 1},
    ]})  # fmt: skip
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="OpenAI's newer name for max_tokens.")
    conversation_id: Text | None = Field(
        None, description="Continue a stored conversation: `messages` are the new turns; the server has the rest."
    )
    store: StrictBool | None = Field(None, description="false: do not store this exchange (default: store it).")
    logprobs: StrictBool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[Tool] | None = None
    functions: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: StrictBool | None = None
    response_format: ResponseFormat | None = None
    knowledge: list[Text] | None = Field(
        None, max_length=MAX_COLLECTIONS,
        description="Grounded chat: collections (names or vector store ids) to answer from, with citations.",
    )  # fmt: skip
    retrieval: Retrieval | None = Field(None, description="How to search `knowledge` (default: the agent's).")

    @model_validator(mode="after")
    def _check_tools(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs: only allowed when logprobs is true")
        names = [t.function.name for t in self.tools or []]
        if self.tool_choice is not None and self.tool_choice != "none" and not names:
            raise ValueError("tool_choice: only allowed when tools are given")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function["name"] not in names:
            raise ValueError(f"tool_choice: no tool named {self.tool_choice.function['name']!r} was given")
        if len(set(names)) != len(names):
            raise ValueError("tools: function names must be unique")
        if names and self.response_format is not None and self.response_format.type != "text":
            raise ValueError("response_format: cannot be combined with tools on this server")
        return self

    @property
    def tool_mode(self) -> str | None:
        """None (no tools in play), "auto", "required", or the one function's name."""
        if not self.tools or self.tool_choice == "none":
            return None
        if isinstance(self.tool_choice, NamedToolChoice):
            return self.tool_choice.function["name"]
        return self.tool_choice or "auto"

    def top_logprob_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def unsupported_in_use(self) -> list[str]:
        return super().unsupported_in_use() + (["functions"] if self.functions else [])


TokenIds = list[Annotated[int, Field(ge=0, lt=INT64)]]


class CompletionRequest(SamplingRequest):
    model_config = ConfigDict(extra="ignore", json_schema_extra={"examples": [
        {"prompt": "Once upon a time", "max_tokens": 8, "temperature": 0},
        {"prompt": ["The sky is", "Water is"], "max_tokens": 8, "stream": True, "stop": ["."]},
    ]})  # fmt: skip
    prompt: Text | list[Text] | TokenIds | list[TokenIds] = Field(
        ..., description="Text, a list of texts, token ids, or a list of token-id lists."
    )
    max_tokens: int | None = Field(
        16, ge=0, description="Most tokens to generate (OpenAI's default: 16); 0 with `echo` scores the prompt."
    )
    echo: StrictBool | None = Field(None, description="Return the prompt before the completion (and its logprobs).")
    best_of: int | None = None
    suffix: Text | None = None
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS, description="Alternatives per token to report.")

    @model_validator(mode="after")
    def _check_prompt(self) -> CompletionRequest:
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt: must not be an empty list")
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens: 0 is only allowed with echo (to score the prompt)")
        if self.max_tokens == 0 and self.stream:
            raise ValueError("max_tokens: 0 is not allowed with stream")
        return self

    def top_logprob_count(self) -> int | None:
        return self.logprobs

    def unsupported_in_use(self) -> list[str]:
        used = {"best_of": (self.best_of or 1) > 1, "suffix": bool(self.suffix)}
        return super().unsupported_in_use() + [name for name, value in used.items() if value]

    @property
    def prompts(self) -> list[str | list[int]]:
        """The prompts as a list: each a text or a list of token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt: int, completion: int) -> Usage:
        return cls(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprobInfo(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    """Chat completions' `logprobs`: one entry per generated token."""

    content: list[TokenLogprobInfo] | None
    refusal: list[TokenLogprobInfo] | None = None


class LegacyLogprobs(BaseModel):
    """Text completions' `logprobs` (OpenAI's legacy shape); with `echo` the prompt's tokens come first and the
    very first has no log-probability (nothing precedes it)."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class OutputToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: dict[str, str]  # name, arguments (a JSON text)


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[OutputToolCall] | None = None
    refusal: str | None = None


FinishReason = Literal["stop", "length", "tool_calls"]


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None
    conversation_id: str | None = Field(None, description="Where this exchange is stored (extension).")
    citations: list[Citation] | None = citations_field()
    knowledge: KnowledgeReport | None = knowledge_field()


class ChatChunkChoice(BaseModel):
    index: int
    # {"role": ...} first, then {"content": ...} or {"tool_calls": [...]} (OpenAI's delta shape), then {}
    delta: dict[str, Any] = Field(default_factory=dict)
    finish_reason: FinishReason | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None  # only on the last chunk, and only with stream_options.include_usage
    conversation_id: str | None = None
    citations: list[Citation] | None = citations_field()  # grounded chat: on the final chunk only
    knowledge: KnowledgeReport | None = knowledge_field()


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: LegacyLogprobs | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None  # always set on full responses; on stream chunks only the usage chunk's


class SocketRequest(_Request):
    """What a WebSocket client sends to get a reply (`{"type": "cancel"}` is handled before this)."""

    type: Literal["message"] = "message"
    message: Text = Field(..., min_length=1)
    conversation_id: Text | None = None
    system_prompt: Text | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    max_tokens: int | None = Field(None, ge=1)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=1)
    repetition_penalty: float | None = Field(None, ge=0.01, le=10.0)
    seed: int | None = Field(None, ge=-INT64, lt=INT64)
    model: Text | None = Field(None, description="The base model's id or an adapter's (see /v1/models).")
