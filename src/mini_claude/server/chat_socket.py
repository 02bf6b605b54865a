"""The WebSocket chat protocol (`/chat/stream`), independent of the web framework.

One `ChatSocket` per connection; the route only moves frames. A reply is the same `ChatCompletions.stream_reply`
the web UI uses, so both store and stream exactly like an API chat.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from mini_claude.server.errors import validation_error
from mini_claude.server.protocol import SocketRequest

if TYPE_CHECKING:
    from mini_claude.server.service import ChatService

log = logging.getLogger(__name__)


class ChatSocket:
    """The WebSocket chat protocol of one connection, independent of the web framework.

    The route feeds it each text frame (`on_message`) and gives it a `send` for JSON messages. Client
    messages: `{"message": ..., "conversation_id"?, "system_prompt"?, sampling fields?}` starts a reply,
    `{"type": "cancel"}` stops it, `{"type": "ping"}` gets a pong. The server answers a reply with
    `start`, `token`..., `done` (or `error`); after a cancel, `done` has finish_reason "cancelled". A bad
    message gets an `error` and the socket stays open; one reply runs at a time.
    """

    def __init__(self, service: ChatService, send: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
        self.service = service
        self.send = send
        self.task: asyncio.Task[None] | None = None
        self.conversation_id = ""

    async def on_message(self, data: str | bytes | None) -> None:
        try:
            payload = json.loads(data or "")
        except (ValueError, UnicodeDecodeError):
            await self._error("Messages must be JSON objects.", "invalid_json")
            return
        kind = payload.get("type", "message") if isinstance(payload, dict) else None
        if kind == "cancel":
            await self.cancel()
        elif kind == "ping":
            await self.send({"type": "pong"})
        elif kind != "message":
            await self._error('Send {"message": "..."} to chat or {"type": "cancel"} to stop a reply.', "invalid_type")
        elif self.task is not None and not self.task.done():
            await self._error('A reply is in progress; wait for "done" or send {"type": "cancel"}.', "busy")
        else:
            try:
                req = SocketRequest.model_validate(payload)
            except ValidationError as exc:
                await self._error(validation_error(exc.errors()).message, "invalid_request")
                return
            self.conversation_id = req.conversation_id or ""
            self.task = asyncio.create_task(self._relay(req))

    async def _relay(self, req: SocketRequest) -> None:
        fields = req.model_dump(exclude={"type", "message", "conversation_id", "system_prompt"})
        events = self.service.chat.stream_reply(req.message, req.conversation_id, req.system_prompt, **fields)
        try:
            async with aclosing(events):
                async for event in events:
                    self.conversation_id = event.conversation_id or self.conversation_id
                    await self.send(event.to_dict())
        except Exception as exc:  # the socket closed under us (or a bug): the reply is over either way
            log.warning("WebSocket reply ended early: %r", exc)
            with contextlib.suppress(Exception):
                await self._error("The reply failed.", "server_error")

    async def cancel(self) -> None:
        """Stop the reply in progress (its partial text is stored) and say so with a `done` message."""
        if self.task is None or self.task.done():
            return  # nothing to stop (it may have just finished): not an error
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await self.send({"type": "done", "conversation_id": self.conversation_id, "usage": None,
                         "finish_reason": "cancelled"})  # fmt: skip

    async def close(self) -> None:
        """The connection is gone: stop whatever it was waiting for."""
        if self.task is not None and not self.task.done():
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)

    async def _error(self, message: str, code: str) -> None:
        await self.send({"type": "error", "message": message, "code": code, "conversation_id": self.conversation_id})
