"""`/v1/fine-tunes`: the request (OpenAI's names where OpenAI has them, else `mini-claude finetune`'s flags)
and the job as clients poll it."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from mini_claude.server.protocol.common import _Request
from mini_claude.text import Text


class FineTuneHyperparameters(BaseModel):
    """What to train; every field is a `mini-claude finetune` flag of the same meaning (defaults: its own)."""

    model_config = ConfigDict(extra="forbid")  # a misspelt hyperparameter must not be ignored silently

    n_epochs: float | None = Field(None, gt=0, le=100, description="Passes over the data (finetune --epochs).")
    max_steps: int | None = Field(None, ge=1, le=1_000_000, description="Optimizer steps; overrides n_epochs.")
    batch_size: int | None = Field(None, ge=1, le=1024)
    grad_accum: int | None = Field(None, ge=1, le=1024)
    learning_rate: float | None = Field(None, gt=0, le=1)
    warmup_steps: int | None = Field(None, ge=0)
    rank: int | None = Field(None, ge=1, le=1024, description="LoRA rank r.")
    alpha: float | None = Field(None, gt=0, description="LoRA alpha (updates are scaled by alpha / rank).")
    dropout: float | None = Field(None, ge=0, lt=1)
    targets: list[Text] | None = Field(None, min_length=1, description="Module names to adapt, or ['all-linear'].")
    max_length: int | None = Field(None, ge=8, le=1_000_000)
    val_fraction: float | None = Field(None, ge=0, lt=1)
    eval_every: int | None = Field(None, ge=0)
    save_every: int | None = Field(None, ge=0)
    seed: int | None = Field(None, ge=0, lt=2**32)
    augment: Literal["none", "rules", "paraphrase"] | None = Field(
        None, description="Add rewritten copies of training records (never of held-out ones): rules or paraphrase."
    )
    augment_copies: int | None = Field(None, ge=1, le=10, description="Rewritten copies per training record.")

    def to_finetune_args(self) -> dict[str, Any]:
        args = {RENAMED.get(k, k): v for k, v in self.model_dump(exclude_none=True).items()}
        if args.get("targets") == ["all-linear"]:
            args["targets"] = "all-linear"
        return args

    @classmethod
    def from_finetune_args(cls, args: dict[str, Any]) -> dict[str, Any]:
        """The API's names for a job's stored `finetune` arguments (what the client sent)."""
        back = {v: k for k, v in RENAMED.items()}
        out = {back.get(k, k): v for k, v in args.items()}
        if out.get("targets") == "all-linear":
            out["targets"] = ["all-linear"]
        return out


RENAMED = {"n_epochs": "epochs", "max_steps": "steps", "learning_rate": "lr"}  # API name -> `finetune` flag


class FineTuneRequest(_Request):
    model_config = ConfigDict(extra="ignore", json_schema_extra={"examples": [
        {"training_data": [{"instruction": "Say hello.", "output": "Hello!"}], "suffix": "greeter",
         "hyperparameters": {"max_steps": 20, "rank": 8}},
        {"training_file": "/data/support_chats.jsonl", "hyperparameters": {"n_epochs": 2}},
    ]})  # fmt: skip

    model: Text | None = Field(None, description="The base model to adapt (the served base model's id).")
    training_file: Text | list[Text] | None = Field(
        None, description="JSON / JSON-lines file(s) on the server (chat or Alpaca records), or a bundled set: "
        "chatterbot, shakespeare.",
    )  # fmt: skip
    training_data: list[dict[str, Any]] | None = Field(
        None, min_length=1, max_length=100_000, description="The records themselves (chat or Alpaca objects)."
    )
    suffix: str | None = Field(
        None, pattern=r"^[A-Za-z0-9._-]{1,40}$", description="Goes into the fine-tuned model's name."
    )
    hyperparameters: FineTuneHyperparameters = Field(default_factory=FineTuneHyperparameters)

    @model_validator(mode="after")
    def _one_source(self) -> FineTuneRequest:
        if (self.training_file is None) == (self.training_data is None):
            raise ValueError("give exactly one of 'training_file' and 'training_data'")
        return self

    @property
    def files(self) -> list[str]:
        if self.training_file is None:
            return []
        return [self.training_file] if isinstance(self.training_file, str) else list(self.training_file)


class FineTuneError(BaseModel):
    message: str


class FineTuneJob(BaseModel):
    id: str
    object: Literal["fine_tune"] = "fine_tune"
    model: str
    status: Literal["validating_files", "queued", "running", "succeeded", "failed", "cancelled"]
    progress: float = Field(description="Fraction of the training steps done, 0 to 1.")
    fine_tuned_model: str | None = Field(description="The model id to use once the job has succeeded.")
    training_files: list[str] | None
    hyperparameters: dict[str, Any]
    result: dict[str, Any] | None = Field(
        description="While running: step, total_steps, loss. When done: held-out perplexity before and after, "
        "losses, times and the adapter's directory."
    )
    error: FineTuneError | None
    created_at: int
    updated_at: int


class FineTuneJobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuneJob]
    has_more: bool
