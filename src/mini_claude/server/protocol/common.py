"""What every area of the wire format shares: the request base (unknown fields ignored), ids, time, valid
Unicode text, the error shape, health."""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict

INT64 = 2**63


def new_id(prefix: str) -> str:
    """An OpenAI-style object id such as `chatcmpl-3f2a...`."""
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class HealthResponse(BaseModel):
    status: Literal["healthy", "unhealthy", "starting"]
    model: str | None
    database: Literal["ok", "unreachable", "not started"]
    scheduler: Literal["running", "stopped", "not started"]
    waiting: int = 0
    running: int = 0
    uptime_s: float = 0.0
    voice: dict[str, str] = {}  # each speech engine and the transcriber: "available", or why not
    upstreams: dict[str, str] = {}  # each upstream: "ok", or why not (its state does not make us unhealthy)
