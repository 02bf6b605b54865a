"""`/v1/models` and `/models`: model cards (vLLM's `parent`/`root` for adapters) and model details."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "mini-claude"
    # For a LoRA adapter (vLLM's fields): the base model it runs on, and the dir it was loaded from.
    parent: str | None = None
    root: str | None = None


class ModelDeleted(BaseModel):
    """OpenAI's answer to deleting a (fine-tuned) model."""

    id: str
    object: Literal["model"] = "model"
    deleted: bool = True


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class AdapterDetail(BaseModel):
    rank: int
    alpha: float
    targets: list[str]
    parameters: int  # the adapter's own, included in the model's `parameters`
    base_model: str | None  # what the adapter says it was trained on


class ModelDetail(BaseModel):
    id: str
    context_window: int
    parameters: int
    source: str
    loaded: bool = True
    parent: str | None = None  # adapters: the base model's id
    adapter: AdapterDetail | None = None


class ModelDetails(BaseModel):
    models: list[ModelDetail]
