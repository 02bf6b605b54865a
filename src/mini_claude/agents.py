"""Agent profiles: a named persona that a request selects with `model: NAME`.

An agent = a model (the base model, an adapter, or `UPSTREAM/MODEL`) + an optional LoRA adapter + a system
prompt + few-shot messages + sampling defaults + knowledge collections and retrieval settings + a voice.
This module is the schema, the YAML form and the merge rule; the server stores agents in the database
(`server/agents.py`) and the CLI reads and writes them (`mini-claude agent ...`). No web or database import.

Design choices (see ../shared/reference/rag-agents.md, section 7):
- YAML keys follow Ollama's Modelfile where the two overlap, and accept its spellings: `from` for `model`,
  `parameters` for `params`, `num_predict` for `max_tokens`, `repeat_penalty` for `repetition_penalty`,
  `message` for `messages`. Modelfile features we cannot honour are refused by name (`template`:
  the model's own chat template is always used; `num_ctx`: the context is the model's), never ignored.
- Unknown keys are errors that name the key, so a typo never silently drops a setting. Values use the API's
  own ranges (temperature 0-2, top_p in (0, 1], at most 4 stop strings), so an agent can never make a request
  that the API would refuse.
- Merge rule, field by field: a value the request sets wins over the agent's, which wins over the server's
  default (`merge`). The one exception is the system prompt, which is the agent's identity: a request's
  system message is *added after* the agent's (Open WebUI's and AnythingLLM's behaviour) rather than
  replacing it. Few-shot messages go between the system prompt and the conversation.
- Names are what `model` carries, so they cannot contain "/" (that is `UPSTREAM/MODEL`) and must not
  shadow a served model (the server checks that when one is created).
- Knowledge: `knowledge` names document collections (by name, or a vector store's id) and `retrieval` how to
  search them. Only their shape is checked here; whether they exist is for the server's retrieval hook
  (`server/grounding.py`) to say when a request uses them, since collections come and go.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mini_claude.text import Text

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
INT64 = 2**63
MAX_STOP_STRINGS = 4
MAX_FEW_SHOTS = 32
MAX_COLLECTIONS = 16
# Modelfile keys without a counterpart here: refused with the reason rather than as "unknown".
UNSUPPORTED = {
    "template": "the model's own chat template is always used",
    "num_ctx": "the context window is the model's own",
    "license": "not part of an agent here",
    "requires": "not part of an agent here",
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # Modelfile spellings accepted for our fields; renamed before validation, so errors name our field.
    RENAMES: ClassVar[dict[str, str]] = {}

    @model_validator(mode="before")
    @classmethod
    def _modelfile_keys(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        for key in value:
            if str(key).lower() in UNSUPPORTED:
                raise ValueError(f"{key}: not supported ({UNSUPPORTED[str(key).lower()]})")
        renamed = {cls.RENAMES.get(k, k): v for k, v in value.items()}
        if len(renamed) < len(value):
            raise ValueError(f"{', '.join(k for k in value if k in cls.RENAMES)}: given twice (under two names)")
        return renamed


class AgentParams(_Strict):
    """Sampling defaults (Modelfile `PARAMETER`); each is used when a request leaves it out."""

    RENAMES: ClassVar[dict[str, str]] = {"num_predict": "max_tokens", "repeat_penalty": "repetition_penalty"}
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=1)
    repetition_penalty: float | None = Field(None, ge=0.01, le=10.0)
    seed: int | None = Field(None, ge=-INT64, lt=INT64)
    stop: list[Text] | None = Field(None, max_length=MAX_STOP_STRINGS)
    max_tokens: int | None = Field(None, ge=1)

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


class FewShot(_Strict):
    """One example message (Modelfile `MESSAGE role content`)."""

    role: Literal["system", "user", "assistant"]
    content: Text


class Retrieval(_Strict):
    """How the agent's knowledge is searched and cited (used by the retrieval hook, `server/grounding.py`).

    `retrieve` puts the best chunks for the latest turn into the prompt; `full_context` every chunk of the
    collections, in document order, as many as fit; `tool` lets the model call `search_knowledge` itself
    (`tool_choice` "required" makes it search before every answer); `off` leaves the prompt alone.
    """

    mode: Literal["retrieve", "full_context", "tool", "off"] = "retrieve"
    top_k: int = Field(4, ge=1, le=64, description="Chunks put into the prompt.")
    search: Literal["hybrid", "dense", "keyword"] = "hybrid"
    rrf_k: int = Field(60, ge=1, description="Reciprocal rank fusion's k.")
    rerank: bool = Field(
        False, description="Re-order the best 20 hits by how likely the chat model finds the question after each "
        "(rag/rerank.py): better sources, at the cost of the model reading all 20."
    )  # fmt: skip
    score_threshold: float | None = Field(None, ge=0.0)
    citations: Literal["required", "optional", "off"] = "optional"
    refusal: Text | None = Field(None, description="The answer when nothing relevant is found.")
    tool_choice: Literal["auto", "required"] = Field(
        "auto", description="mode tool: the model decides whether to search (auto), or must search first."
    )


class Voice(_Strict):
    """The voice `/v1/audio/speech` and the web UI's play button use for this agent."""

    voice: Text = Field(min_length=1, description="A voice id from GET /v1/audio/voices, e.g. hibari:heart.")
    speed: float | None = Field(None, ge=0.25, le=4.0)


class AgentSpec(_Strict):
    """An agent's whole definition (what the API, the database and `agents/NAME.yaml` hold)."""

    RENAMES: ClassVar[dict[str, str]] = {"from": "model", "parameters": "params", "parameter": "params",
                                         "message": "messages"}  # fmt: skip
    name: Text = Field(pattern=NAME_PATTERN, description="What requests put in `model`.")
    description: Text | None = None
    model: Text | None = Field(
        None, min_length=1, description="The base model (default), an adapter's id, or UPSTREAM/MODEL (`from`)."
    )
    adapter: Text | None = Field(None, min_length=1, description="A LoRA adapter the server serves, by name.")
    system: Text | None = Field(None, description="The system prompt.")
    messages: list[FewShot] = Field(default_factory=list, max_length=MAX_FEW_SHOTS)
    params: AgentParams = Field(default_factory=AgentParams)
    knowledge: list[Text] = Field(
        default_factory=list, max_length=MAX_COLLECTIONS, description="Collections (vector store ids) to answer from."
    )
    retrieval: Retrieval = Field(default_factory=Retrieval)
    voice: Voice | None = None

    @field_validator("voice", mode="before")
    @classmethod
    def _voice_id(cls, value: Any) -> Any:
        return {"voice": value} if isinstance(value, str) else value

    @field_validator("knowledge")
    @classmethod
    def _collections(cls, value: list[str]) -> list[str]:
        import re

        for name in value:
            if not re.match(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$", name):
                raise ValueError(f"{name!r} is not a collection id (letters, digits, '.', '_', ':', '-')")
        if len(set(value)) != len(value):
            raise ValueError("each collection may be named once")
        return value

    @model_validator(mode="after")
    def _check(self) -> AgentSpec:
        if self.adapter is not None and self.upstream:
            raise ValueError("adapter: an upstream model cannot take a local LoRA adapter")
        return self

    @property
    def upstream(self) -> bool:
        """Whether `model` is UPSTREAM/MODEL (`mini-claude chat --agent` also takes a model file's path)."""
        m = self.model
        return m is not None and "/" in m and not m.startswith(("/", ".", "~")) and not Path(m).exists()

    def sampling(self) -> dict[str, Any]:
        """The sampling defaults the agent sets, by the API's field names (what `merge` fills in)."""
        return self.params.model_dump(exclude_none=True)

    def prompt_prefix(self, request_system: str | None = None, fallback: str | None = None) -> list[dict[str, str]]:
        """The messages that open every prompt: the system prompt (the agent's, then the request's), few-shots.

        `fallback` (the server's default system prompt) is used only when neither the agent nor the request
        has one.
        """
        systems = [s for s in (self.system, request_system) if s] or ([fallback] if fallback else [])
        head = [{"role": "system", "content": "\n\n".join(systems)}] if systems else []
        return head + [m.model_dump() for m in self.messages]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(exclude_defaults=True, mode="json"), sort_keys=False, allow_unicode=True)


def merge(request: dict[str, Any], agent: dict[str, Any], server: dict[str, Any]) -> dict[str, Any]:
    """Field by field: the request's value where it sets one, else the agent's, else the server's default.

    `request` holds only the fields the request set (None counts as set only if it was sent explicitly;
    pass `model_fields_set` to tell).
    """
    return {**server, **agent, **request}


class AgentError(ValueError):
    """An invalid agent definition: the message names the field, on one line; `field` is its path."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


def _first_field(exc: ValidationError) -> str | None:
    for error in exc.errors():
        loc = ".".join(str(p) for p in error["loc"])
        message = str(error["msg"]).removeprefix("Value error, ")
        return loc or (message.split(": ", 1)[0] if ": " in message else None)
    return None


def describe(exc: ValidationError, name: str | None = None) -> str:
    """pydantic's errors as one line naming each field: `params.temperature: Input should be ...`."""
    parts = []
    for error in exc.errors():
        loc = ".".join(str(p) for p in error["loc"])
        message = str(error["msg"]).removeprefix("Value error, ")
        if not loc and ": " in message:
            loc, message = message.split(": ", 1)
        parts.append(f"{loc}: {message}" if loc else message)
    where = f"agent '{name}': " if name else "agent: "
    return where + "; ".join(parts)


def parse_agent(data: Any, name: str | None = None) -> AgentSpec:
    """Validate a definition (a mapping from YAML or JSON); `name` fills in a missing `name`.

    Raises:
        AgentError: one line naming the bad field.
    """
    if not isinstance(data, dict):
        raise AgentError(f"agent '{name}': the definition must be a mapping of keys to values")
    data = {str(k).lower(): v for k, v in data.items()}  # Modelfile keywords are upper case: FROM, SYSTEM
    if name is not None:
        data.setdefault("name", name)
    try:
        return AgentSpec.model_validate(data)
    except ValidationError as exc:
        raise AgentError(describe(exc, data.get("name") or name), _first_field(exc)) from None


def load_agent_file(path: str | Path) -> AgentSpec:
    """An agent from `agents/NAME.yaml` (or .json); its name is the file's stem unless it says otherwise."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise AgentError(f"cannot read {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise AgentError(f"{path} is not valid YAML: {' '.join(str(exc).split())}") from None
    return parse_agent(data, path.stem)


def agent_files(directory: str | Path) -> list[Path]:
    """The definitions in a directory (`*.yaml`, `*.yml`, `*.json`), by name."""
    root = Path(directory)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.suffix.lower() in (".yaml", ".yml", ".json") and p.is_file())
