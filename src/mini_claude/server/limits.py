"""`BodyLimitMiddleware`: a request body over the configured size is a 413 before anything parses it.

Without it a 20 MB chat message was read into memory, parsed by pydantic, rendered and tokenized (28 s and
gigabytes of resident memory) before the context check refused it. The limit is enforced in ASGI, under
FastAPI, so no route can forget it:

- A declared `Content-Length` over the limit is refused at once. A body within its declared length needs no
  counting: the HTTP parser (h11 or httptools) never delivers more than the header announced.
- A body without a length (`Transfer-Encoding: chunked`) is counted as it arrives and held back from the
  app until it is complete, so the app never starts on a body that turns out too large. Holding it costs
  nothing extra: every JSON route reads the whole body before parsing it anyway.
- A refused body is read to its end and thrown away (in constant memory, for at most `DRAIN_S`) before the
  413 is sent. Answering while the client is still uploading would make most clients see a reset
  connection instead of the error. A client that sent `Expect: 100-continue` has not uploaded yet: it gets
  the 413 at once.
"""

from __future__ import annotations

import json
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

DRAIN_S = 10.0  # longest time spent discarding a refused body; then the 413 goes out and the connection closes


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None:
            if declared.strip().isdigit() and int(declared) > self.max_bytes:
                # A client that waits for `100 Continue` has sent nothing yet: it gets the 413 instead, no upload.
                await self._refuse(receive, send, more=headers.get(b"expect", b"").lower() != b"100-continue")
            else:
                await self.app(scope, receive, send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left before its body was complete: nothing to answer
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self._refuse(receive, send, more=message.get("more_body", False))
                return
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        del chunks
        delivered = False

        async def replay() -> Message:
            nonlocal delivered
            if delivered:
                return await receive()  # after the body: disconnect notices, as the app expects
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, receive: Receive, send: Send, more: bool) -> None:
        deadline = time.monotonic() + DRAIN_S
        while more and time.monotonic() < deadline:
            message = await receive()
            more = message["type"] == "http.request" and message.get("more_body", False)
        limit = self.max_bytes
        error = {
            "message": f"The request body is larger than this server accepts ({limit} bytes, {limit / 2**20:g} MiB).",
            "type": "invalid_request_error", "param": None, "code": "request_too_large",
        }  # fmt: skip
        payload = json.dumps({"error": error}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                   (b"connection", b"close")]  # fmt: skip
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": payload})
