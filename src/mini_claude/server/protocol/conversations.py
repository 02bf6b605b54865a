"""`/v1/conversations`: stored conversations and their messages (an extension of OpenAI's API)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel


class ConversationMessage(BaseModel):
    role: str
    content: str
    created_at: str


class ConversationInfo(BaseModel):
    id: str
    object: Literal["conversation"] = "conversation"
    title: str
    model: str | None
    system_prompt: str | None = None
    created_at: str
    updated_at: str


class ConversationDetail(ConversationInfo):
    messages: list[ConversationMessage]


class ConversationList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ConversationInfo]
    has_more: bool


class ConversationDeleted(BaseModel):
    id: str
    object: Literal["conversation.deleted"] = "conversation.deleted"
    deleted: bool = True
