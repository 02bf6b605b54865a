"""The conversation store behind server-side memory: history in, new turns and replies out, and listings.

Design choices:
- The user's turn is stored before generating (so the conversation id exists for the first SSE chunk and the
  `X-Conversation-Id` header), the reply when it finishes - or, if the client leaves mid-reply, what was
  generated so far with finish reason "cancelled".
- Every message carries an idempotency key derived from the request (or its `Idempotency-Key` header), so a
  store that is retried or reached twice lands once; a request retried with the same header in a conversation
  gets the stored reply back instead of a new generation (`History.replay`).
- NUL characters (which PostgreSQL cannot store, and random models emit) are stored as U+FFFD on every backend.
- The blocking functions here run in worker threads (`ChatService.db_call`); the listing functions are
  called directly by the web UI and the routes.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mini_claude.db import crud, session_scope
from mini_claude.engine import Completion
from mini_claude.server.errors import APIError, invalid
from mini_claude.server.protocol import ConversationDeleted, ConversationDetail, ConversationInfo, ConversationList

if TYPE_CHECKING:
    from mini_claude.server.generation import Job
    from mini_claude.server.service import ChatService

log = logging.getLogger(__name__)

TITLE_CHARS = 60
MAX_OFFSET = 2**31 - 1  # databases store offsets as 32- or 64-bit integers; no listing is that long


@dataclass
class History:
    system_prompt: str | None
    messages: list[dict[str, str]]  # without the messages an earlier attempt of this request stored
    replay: Completion | None = None


def db_text(text: str) -> str:
    # PostgreSQL's text type cannot hold NUL, which a model (or a user) may well produce.
    return text.replace("\x00", "\ufffd")


def is_uuid(value: str) -> bool:
    try:
        return str(uuid.UUID(value)) == value
    except (ValueError, AttributeError, TypeError):
        return False


def _iso(value: Any) -> str:
    return value.isoformat() if value is not None else ""


def _title(turns: Sequence[dict[str, str]]) -> str:
    first = next((t["content"] for t in turns if t["role"] == "user"), "")
    words = " ".join(first.split())
    return (words[: TITLE_CHARS - 1] + "…" if len(words) > TITLE_CHARS else words) or crud.DEFAULT_TITLE


def not_found(conversation_id: str) -> APIError:
    return APIError(404, f"No conversation with id '{conversation_id}'.", param="conversation_id",
                    code="conversation_not_found")  # fmt: skip


def _conversation_dict(c: Any) -> dict[str, Any]:
    return {"id": c.id, "title": c.title, "model": c.model, "system_prompt": c.system_prompt,
            "created_at": _iso(c.created_at), "updated_at": _iso(c.updated_at)}  # fmt: skip


class ConversationStore:
    def __init__(self, service: ChatService) -> None:
        self.service = service

    # ------------------------------------------------------------------- around a generation (worker threads)
    def load_history(self, conversation_id: str, key: str) -> History | None:
        """The conversation so far, as it was before this request (whose earlier attempts may have stored
        messages under `key`); with the finished reply of such an attempt, if there is one, to replay."""
        if not is_uuid(conversation_id):
            return None
        with session_scope(self.service.db) as s:  # type: ignore[arg-type]
            conversation = crud.get_conversation(s, conversation_id)
            if conversation is None:
                return None
            stored = crud.list_messages(s, conversation_id)
            mine = f"{key}:"
            messages = [
                {"role": m.role, "content": m.content} for m in stored if not (m.idempotency_key or "").startswith(mine)
            ]
            reply = next((m for m in stored if m.idempotency_key == f"{key}:reply"), None)
            if reply is None:
                return History(conversation.system_prompt, messages)
            # Only counts survive in the database; `completion_ids` stands in for them so usage is reported.
            replay = Completion(
                reply.content, [0] * (reply.prompt_tokens or 0), [0] * (reply.completion_tokens or 0),
                reply.finish_reason or "stop", reply.ttft_ms or 0.0, 0.0,
            )  # fmt: skip
            return History(conversation.system_prompt, messages, replay)

    def store_turns(
        self, conversation_id: str | None, system: str | None, turns: list[dict[str, str]], key: str,
        user: str | None, model: str,
    ) -> tuple[str, int]:  # fmt: skip
        """Store the request's new messages (creating the conversation if needed) and reserve the reply's place,
        in one transaction: the conversation id and the reply's `seq`.

        The place is taken now because the reply is stored only when it ends: a client that leaves mid-reply
        and at once sends its next message would otherwise find its cut-off reply ordered after that message.
        """
        with session_scope(self.service.db) as s:  # type: ignore[arg-type]
            if conversation_id is None:
                meta = {"user": db_text(user)} if user else {}
                conversation = crud.create_conversation(
                    s,
                    title=db_text(_title(turns)),
                    model=model,
                    meta=meta,
                    system_prompt=None if system is None else db_text(system),
                )
            else:
                conversation = crud.get_conversation(s, conversation_id)
                if conversation is None:  # deleted since we read it
                    raise not_found(conversation_id)
                if system is not None and system != conversation.system_prompt:
                    conversation.system_prompt = db_text(system)
            for i, turn in enumerate(turns):
                crud.add_message(
                    s, conversation.id, turn["role"], db_text(turn["content"]), idempotency_key=f"{key}:{i}"
                )
            return conversation.id, crud.reserve_seq(s, conversation.id)

    def store_reply(self, job: Job, text: str, completion: Completion | None) -> None:
        """Store a finished reply, or the partial reply of a cancelled one; a request's reply lands once.

        A retried request (same idempotency key) may race its abandoned first attempt: the client timed out
        and retried while the first attempt still ran, and the first attempt's partial reply is stored when
        the server notices the disconnect - before or after the retry's full reply. Either way only the full
        reply stays. Each attempt stores its reply at the place its own `store_turns` reserved. `add_message`
        first locks the conversation row, so the two stores run one after the other and each sees what the
        other committed.
        """
        reply_key, partial_key = f"{job.key}:reply", f"{job.key}:partial"
        with session_scope(self.service.db) as s:  # type: ignore[arg-type]
            try:
                crud.add_message(
                    s, job.conversation_id, "assistant", db_text(text),  # type: ignore[arg-type]
                    idempotency_key=reply_key if completion else partial_key,
                    model=job.model, prompt_tokens=job.prompt_tokens,
                    completion_tokens=completion.completion_tokens if completion else None,
                    ttft_ms=completion.ttft_ms if completion else None,
                    finish_reason=completion.finish_reason if completion else "cancelled", seq=job.reply_seq,
                )  # fmt: skip
            except crud.NotFoundError:  # the conversation was deleted while we generated: nothing to add to
                log.info("conversation %s was deleted before its reply was stored", job.conversation_id)
                return
            conversation_id: str = job.conversation_id  # type: ignore[assignment]
            if completion is not None:
                crud.delete_message_by_key(s, conversation_id, partial_key)
            elif crud.get_message_by_key(s, conversation_id, reply_key) is not None:
                crud.delete_message_by_key(s, conversation_id, partial_key)  # a retry finished first

    # --------------------------------------------------------------------------------------- listings
    def list(self, limit: int = 50, offset: int = 0) -> list[dict[str, Any]]:
        """Most recently active first: id, title, model, system_prompt, created_at, updated_at (ISO 8601)."""
        _, _, db = self.service.ready()
        if not (1 <= limit <= crud.MAX_PAGE_SIZE and 0 <= offset <= MAX_OFFSET):
            raise invalid(f"limit must be in 1..{crud.MAX_PAGE_SIZE} and offset in 0..{MAX_OFFSET}", "limit")
        with self.service.db_errors(), session_scope(db) as s:
            return [_conversation_dict(c) for c in crud.list_conversations(s, limit=limit, offset=offset)]

    def get(self, conversation_id: str) -> dict[str, Any] | None:
        """A conversation with its `messages` (role, content, created_at), or None."""
        _, _, db = self.service.ready()
        if not is_uuid(conversation_id):
            return None
        with self.service.db_errors(), session_scope(db) as s:
            conversation = crud.get_conversation(s, conversation_id)
            if conversation is None:
                return None
            messages = [
                {"role": m.role, "content": m.content, "created_at": _iso(m.created_at)}
                for m in crud.list_messages(s, conversation_id)
            ]
            return _conversation_dict(conversation) | {"messages": messages}

    def delete(self, conversation_id: str) -> bool:
        _, _, db = self.service.ready()
        if not is_uuid(conversation_id):
            return False
        with self.service.db_errors(), session_scope(db) as s:
            return crud.delete_conversation(s, conversation_id)

    def page(self, limit: int, offset: int) -> ConversationList:
        _, _, db = self.service.ready()
        data = [ConversationInfo(**c) for c in self.list(limit, offset)]
        with self.service.db_errors(), session_scope(db) as s:
            total = crud.count_conversations(s)
        return ConversationList(data=data, has_more=offset + len(data) < total)

    def detail(self, conversation_id: str) -> ConversationDetail:
        found = self.get(conversation_id)
        if found is None:
            raise not_found(conversation_id)
        return ConversationDetail(**found)

    def remove(self, conversation_id: str) -> ConversationDeleted:
        if not self.delete(conversation_id):
            raise not_found(conversation_id)
        return ConversationDeleted(id=conversation_id)
