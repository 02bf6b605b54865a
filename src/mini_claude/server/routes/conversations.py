"""`/v1/conversations`: the stored conversations behind server-side memory (list, retrieve, delete)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Query

from mini_claude.server.conversations import MAX_OFFSET
from mini_claude.server.protocol import ConversationDeleted, ConversationDetail, ConversationList
from mini_claude.server.routes.common import ServiceDep, api_router

router = api_router()


@router.get("/v1/conversations", response_model=ConversationList)
def list_conversations(
    service: ServiceDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> ConversationList:
    return service.conversations.page(limit, offset)


@router.get("/v1/conversations/{conversation_id}", response_model=ConversationDetail)
def get_conversation(conversation_id: str, service: ServiceDep) -> ConversationDetail:
    return service.conversations.detail(conversation_id)


@router.delete("/v1/conversations/{conversation_id}", response_model=ConversationDeleted)
def delete_conversation(conversation_id: str, service: ServiceDep) -> ConversationDeleted:
    return service.conversations.remove(conversation_id)
