"""Grounded chat's extensions to the chat wire format: `citations` and the `knowledge` report.

Both are absent from a response that used no knowledge (`exclude_if`), so plain chat keeps OpenAI's exact
shape; the `openai` client exposes them through `model_extra`. In a stream they ride on the final chunk only.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class Citation(BaseModel):
    """One source an answer cites with [n]: where it is, precisely enough to open the document there."""

    n: int = Field(description="The number the answer writes, [n].")
    choice: int = Field(0, description="Which choice cites it.")
    collection: str = Field(description="The collection (or vector store id) as the request named it.")
    file_id: str = Field(description="The document's source: an uploaded file's id, or an ingested file's path.")
    filename: str
    chunk_id: int
    start_char: int = Field(description="The chunk's span in the document's text.")
    end_char: int
    page: int | None = None
    heading: str = ""
    quote: str = Field(description="The start of the chunk's text (up to ~300 characters, exact).")
    score: float


class SourceRef(BaseModel):
    """A chunk that was searched: given to the model as [n], or left out (`n` null) for lack of room."""

    n: int | None
    collection: str
    file_id: str
    filename: str
    chunk_id: int
    page: int | None = None
    heading: str = ""
    score: float
    tokens: int = Field(description="Prompt tokens it took (or would have taken).")


class KnowledgeReport(BaseModel):
    """What retrieval did for this answer: the query, the sources given, and those left out (never silently)."""

    collections: list[str]
    mode: str = Field(description="retrieve (sources in the prompt), full_context, or tool (the model searched).")
    query: str
    sources: list[SourceRef]
    left_out: list[SourceRef] = Field(description="Chunks that did not fit the context budget.")
    note: str | None = None


def _absent(value: Any) -> bool:
    return value is None


def citations_field() -> Any:
    return Field(None, exclude_if=_absent, description="Sources the answer cites (extension; grounded chat).")


def knowledge_field() -> Any:
    return Field(None, exclude_if=_absent, description="What retrieval did (extension; grounded chat).")
