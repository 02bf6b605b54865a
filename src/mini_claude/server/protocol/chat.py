"""Chat and text completions in OpenAI's wire format; requests turn themselves into the engine's `SamplingParams`.

Design choices:
- Requests are validated here and nowhere else: a value out of OpenAI's documented range (temperature in
  [0, 2], top_p in (0, 1], at most 4 stop strings, ...) fails validation, which the app reports as a 400 in
  OpenAI's error shape. Numbers that would make the sampler overflow are kept out by the same ranges, so no
  request can crash a decode step that other requests share.
- Unknown fields are ignored, as vLLM does, so clients that send newer OpenAI fields keep working. Known
  OpenAI features that this server does not implement (tools, logprobs, penalties other than
  `repetition_penalty`, ...) are *refused* when set to a non-default value rather than silently ignored:
  a caller that asks for them would otherwise get something other than what it asked for.
- Extensions ride in the same body (the `openai` client sends them through `extra_body`): `top_k`,
  `repetition_penalty`, `ignore_eos` (vLLM's name) and `conversation_id` for server-side memory.
- Booleans are strict (`"stream": "yes"` is an error, not true). Every string is checked to be valid
  Unicode: JSON may carry lone surrogates (`"\\ud800"`), which neither the tokenizer nor the database can
  encode.
- Responses are models too, so the OpenAPI schema documents them; streaming chunks use the same models.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, model_validator

from mini_claude.generate import SamplingParams
from mini_claude.server.protocol.common import INT64, Text, _Request

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


class ChatMessage(_Request):
    """One message. `developer` is OpenAI's newer name for `system`; content may be a list of text parts."""

    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart]
    name: Text | None = None

    @property
    def norm_role(self) -> str:
        return "system" if self.role == "developer" else self.role

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)

    def to_template(self) -> dict[str, str]:
        return {"role": self.norm_role, "content": self.text}


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
        )


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
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    functions: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def unsupported_in_use(self) -> list[str]:
        used = {
            "logprobs": bool(self.logprobs),
            "top_logprobs": bool(self.top_logprobs),
            "tools": bool(self.tools),
            "functions": bool(self.functions),
            "tool_choice": self.tool_choice not in (None, "none", "auto"),
            "response_format": self.response_format is not None and self.response_format.get("type") != "text",
        }
        return super().unsupported_in_use() + [name for name, value in used.items() if value]


TokenIds = list[Annotated[int, Field(ge=0, lt=INT64)]]


class CompletionRequest(SamplingRequest):
    model_config = ConfigDict(extra="ignore", json_schema_extra={"examples": [
        {"prompt": "Once upon a time", "max_tokens": 8, "temperature": 0},
        {"prompt": ["The sky is", "Water is"], "max_tokens": 8, "stream": True, "stop": ["."]},
    ]})  # fmt: skip
    prompt: Text | list[Text] | TokenIds | list[TokenIds] = Field(
        ..., description="Text, a list of texts, token ids, or a list of token-id lists."
    )
    max_tokens: int | None = Field(16, ge=1, description="Most tokens to generate (OpenAI's default: 16).")
    echo: StrictBool | None = None
    best_of: int | None = None
    suffix: Text | None = None
    logprobs: int | None = None

    @model_validator(mode="after")
    def _check_prompt(self) -> CompletionRequest:
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt: must not be an empty list")
        return self

    def unsupported_in_use(self) -> list[str]:
        used = {"echo": bool(self.echo), "best_of": (self.best_of or 1) > 1, "suffix": bool(self.suffix),
                "logprobs": self.logprobs is not None}  # fmt: skip
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


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None
    conversation_id: str | None = Field(None, description="Where this exchange is stored (extension).")


class ChatChunkChoice(BaseModel):
    index: int
    delta: dict[str, str] = Field(default_factory=dict)  # {"role": ...} first, then {"content": ...}, then {}
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None  # only on the last chunk, and only with stream_options.include_usage
    conversation_id: str | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: None = None


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
