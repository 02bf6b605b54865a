"""Errors in OpenAI's shape: `APIError` carries the HTTP status and the `{"error": {...}}` body.

Every serving module raises these; the app turns them into responses (no FastAPI here, so the serving logic
stays testable on its own). Pydantic's validation errors are translated once, by `validation_error`, so a
bad field reads the same whichever route it came through.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mini_claude.server.protocol import ErrorDetail, ErrorResponse


class APIError(Exception):
    """A failure to report to the client in OpenAI's error shape, with its HTTP status."""

    def __init__(
        self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
        code: str | None = None,
    ) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> ErrorResponse:
        return ErrorResponse(error=ErrorDetail(message=self.message, type=self.type, param=self.param, code=self.code))


def invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def shutting_down() -> APIError:
    """The scheduler closed under a request (its `submit` or `call` raised RuntimeError)."""
    return APIError(503, "The server is shutting down.", "server_error", code="unavailable")


def generation_failed() -> APIError:
    return APIError(500, "The generation failed; try again.", "server_error", code="generation_failed")


_TYPE_TAGS = {"body", "query", "path", "header", "str", "int", "float", "bool", "list", "dict", "none"}


def validation_error(errors: Sequence[Any]) -> APIError:
    """A 400 from pydantic's error list: the first problem, and where it is (`messages[0].role`).

    Model-level checks in `protocol.py` raise `ValueError("field: problem")`; the field is read back from that
    prefix, since pydantic gives such errors no location.
    """
    first = dict(errors[0]) if errors else {"msg": "invalid request", "loc": ()}
    # Drop "body" and the union-member tags pydantic puts in locations (`str`, `function-after[...]`, ...).
    loc = [p for p in first.get("loc", ()) if isinstance(p, int) or (p.isidentifier() and p not in _TYPE_TAGS)]
    message = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
    if first.get("type") == "json_invalid":
        return invalid("We could not parse the JSON body of your request: it is not valid JSON.", code="invalid_json")
    if not loc and first.get("type") in ("missing", "model_attributes_type", "dict_type"):
        return invalid("The request body must be a JSON object.", code="invalid_body")
    param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or None
    if ": " in message and message.split(": ", 1)[0].isidentifier():  # a model-level check names its field
        field, message = message.split(": ", 1)
        param = f"{param}.{field}" if param else field
    text = f"Invalid value for '{param}': {message}" if param else message
    return invalid(text, param=param)
