"""OpenAI-compatible remote backends ("upstreams"): configuration, presets, model lists, health, and the calls.

An upstream is any server that speaks OpenAI's chat-completions wire format: OpenAI itself, Google Gemini's
and Anthropic's OpenAI-compatible endpoints, Ollama, vLLM, or another Mini-Claude. Its models are served
here as `UPSTREAM/MODEL`; the server (`server/remote.py`) proxies chat requests for them through this module.

Design choices:
- Configuration is one setting, `MINI_CLAUDE_UPSTREAMS`: a JSON list of `{"name", "base_url", "api_key_env",
  "models"}` (the last two optional), a path to a YAML or JSON file saying the same, or just preset names
  (`openai,ollama`). A preset fills in the base URL and the API-key variable, so `{"name": "openai"}` is a
  whole entry. Keys are read from the environment at request time and never stored in the settings, so they
  do not show up in logs, reprs or `/health`.
- No FastAPI here (STYLE.md, point 8): failures are `UpstreamError`s that already carry the status and the
  OpenAI-shaped fields the client will see, and the server only re-raises them in its own error type. The
  mapping follows what a client can act on: the upstream's 4xx are the client's to fix and are kept (429
  included, so retry logic works); the upstream refusing *our* key (401/403) is not the client's fault and
  becomes a 502 that says which variable to check; unreachable or failing upstreams are 502; timeouts 504.
- Model lists: an entry's `models` are listed as they are (no network); without them the upstream's own
  `GET /models` is asked, with a short timeout, and remembered for a minute, so `/v1/models` stays fast
  and a dead upstream costs one short wait per minute, not one per listing. Health checks are cached the same
  way (10 s), because probes call `/health` often.
- Calls are plain httpx (no `openai` SDK in the server): the body goes through unchanged apart from `model`,
  and a stream is read line by line as server-sent events, so chunks reach the client as they arrive.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import httpx
from pydantic import BaseModel, ConfigDict, Field, model_validator

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
MODELS_TTL_S = 60.0
HEALTH_TTL_S = 10.0
PROBE_TIMEOUT_S = 3.0  # model discovery and health checks: a dead upstream must not stall a listing


@dataclass(frozen=True)
class Preset:
    base_url: str
    api_key_env: str | None
    doc: str


# Base URLs as each vendor documents its OpenAI-compatible endpoint.
PRESETS: dict[str, Preset] = {
    "openai": Preset("https://api.openai.com/v1", "OPENAI_API_KEY", "OpenAI"),
    "gemini": Preset(
        "https://generativelanguage.googleapis.com/v1beta/openai", "GEMINI_API_KEY", "Google Gemini (OpenAI compat.)"
    ),
    "anthropic": Preset("https://api.anthropic.com/v1", "ANTHROPIC_API_KEY", "Anthropic (OpenAI SDK compatibility)"),
    "ollama": Preset("http://127.0.0.1:11434/v1", None, "Ollama on this machine"),
    "vllm": Preset("http://127.0.0.1:8000/v1", "VLLM_API_KEY", "vLLM's OpenAI server on this machine"),
}


class UpstreamConfig(BaseModel):
    """One upstream. `preset` (or a `name` that is a preset's) fills `base_url` and `api_key_env`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=NAME_PATTERN, description="Its prefix in model ids: NAME/MODEL.")
    preset: Literal["openai", "gemini", "anthropic", "ollama", "vllm"] | None = None
    base_url: str = Field(description="The API root, up to and including /v1 (where /chat/completions lives).")
    api_key_env: str | None = Field(None, description="The environment variable holding its API key, if any.")
    models: list[str] | None = Field(None, description="The models to list (default: ask the upstream).")
    timeout_s: float = Field(120.0, gt=0, description="Longest wait for a response, or between streamed chunks.")

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, value: Any) -> Any:
        if isinstance(value, str):  # a bare preset name
            value = {"name": value}
        if not isinstance(value, dict):
            return value
        preset = PRESETS.get(value.get("preset") or value.get("name") or "")
        if preset is None:
            if "base_url" not in value:
                raise ValueError(f"base_url: required unless the name or preset is one of {', '.join(PRESETS)}")
            return value
        return {"base_url": preset.base_url, "api_key_env": preset.api_key_env, **value}

    @model_validator(mode="after")
    def _check_url(self) -> UpstreamConfig:
        if not re.match(r"^https?://[^/\s]+", self.base_url):
            raise ValueError(f"base_url: {self.base_url!r} is not an http(s) URL")
        return self


def parse_upstreams(value: Any) -> list[Any]:
    """The raw entries of the setting: a JSON list, a YAML/JSON file's path, or comma-separated preset names.

    A file holds a list, or a mapping with an `upstreams` list (so it can sit in a larger config file).
    """
    if not isinstance(value, str):
        return value
    text = value.strip()
    if not text:
        return []
    if text.startswith("["):
        return json.loads(text)
    if text.endswith((".yaml", ".yml", ".json")) or Path(text).is_file():
        import yaml

        path = Path(text).expanduser()
        if not path.is_file():
            raise ValueError(f"the upstreams file {text} does not exist")
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or []
        return loaded.get("upstreams", []) if isinstance(loaded, dict) else loaded
    return [name.strip() for name in text.split(",") if name.strip()]


def check_unique(configs: list[UpstreamConfig]) -> list[UpstreamConfig]:
    names = [c.name for c in configs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"upstream names must be unique; repeated: {', '.join(twice)}")
    return configs


class UpstreamError(Exception):
    """A failed upstream call, as the client will see it: HTTP status and OpenAI's error fields."""

    def __init__(
        self, status: int, message: str, type: str = "upstream_error", code: str | None = None,
        param: str | None = None,
    ) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param


def _error_fields(body: bytes) -> tuple[str, str | None, str | None, str | None]:
    """(message, type, code, param) from an error body: OpenAI's `{"error": {...}}`, Gemini's `[{"error"}]`,
    FastAPI's `{"detail": ...}`, or plain text."""
    try:
        data: Any = json.loads(body)
    except ValueError:
        return body.decode("utf-8", "replace").strip()[:500] or "no message", None, None, None
    if isinstance(data, list) and data:
        data = data[0]
    error = data.get("error", data) if isinstance(data, dict) else data
    if isinstance(error, dict):
        message = error.get("message") or error.get("detail") or json.dumps(error)[:500]
        code = error.get("code")
        return str(message), error.get("type"), None if code is None else str(code), error.get("param")
    return str(error)[:500], None, None, None


class Upstream:
    """One configured upstream: its model list, health, and chat calls (async, for the server's event loop)."""

    def __init__(self, config: UpstreamConfig, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.config = config
        self.name = config.name
        self.base_url = config.base_url.rstrip("/")
        self._transport = transport  # tests may inject one; production uses httpx's own
        self._models: tuple[float, list[str]] | None = None
        self._health: tuple[float, str] | None = None
        self._clients: dict[int, httpx.AsyncClient] = {}  # one per event loop (a TestClient runs its own)

    # ------------------------------------------------------------------------------------------ identity
    @property
    def api_key(self) -> str | None:
        env = self.config.api_key_env
        return os.environ.get(env) or None if env else None

    def headers(self) -> dict[str, str]:
        key = self.api_key
        return {"Authorization": f"Bearer {key}"} if key else {}

    def _missing_key(self) -> UpstreamError | None:
        env = self.config.api_key_env
        if env and not self.api_key:
            return UpstreamError(502, f"The upstream '{self.name}' needs an API key: set the environment variable "
                                 f"{env} for the server.", code="upstream_auth_failed")  # fmt: skip
        return None

    def error_for(self, status: int, body: bytes) -> UpstreamError:
        """The client's view of an upstream's error response (see the module docstring for the mapping)."""
        message, kind, code, param = _error_fields(body)
        if status in (401, 403):
            where = f"check {self.config.api_key_env}" if self.config.api_key_env else "it needs an API key"
            return UpstreamError(502, f"The upstream '{self.name}' refused our credentials ({status}: {message}); "
                                 f"{where}.", code="upstream_auth_failed")  # fmt: skip
        if 400 <= status < 500:
            return UpstreamError(status, message, kind or "invalid_request_error", code, param)
        return UpstreamError(502, f"The upstream '{self.name}' failed ({status}): {message}", code="upstream_error")

    def transport_error(self, exc: httpx.HTTPError) -> UpstreamError:
        if isinstance(exc, httpx.TimeoutException):
            return UpstreamError(504, f"The upstream '{self.name}' did not answer in time ({type(exc).__name__}).",
                                 code="upstream_timeout")  # fmt: skip
        return UpstreamError(502, f"Could not reach the upstream '{self.name}' at {self.base_url} "
                             f"({type(exc).__name__}: {exc}).", code="upstream_unreachable")  # fmt: skip

    # --------------------------------------------------------------------------- listing and health (sync)
    def _probe(self) -> httpx.Response:
        with httpx.Client(timeout=PROBE_TIMEOUT_S) as client:
            return client.get(f"{self.base_url}/models", headers=self.headers())

    def models(self) -> list[str]:
        """The upstream's model names: the configured ones, else its `/models` (cached; [] when unreachable)."""
        if self.config.models is not None:
            return list(self.config.models)
        now = time.monotonic()
        if self._models is not None and now - self._models[0] < MODELS_TTL_S:
            return self._models[1]
        names: list[str] = self._models[1] if self._models else []
        try:
            response = self._probe()
            if response.status_code == 200:
                names = [str(m["id"]) for m in response.json().get("data", []) if isinstance(m, dict) and "id" in m]
        except (httpx.HTTPError, ValueError, AttributeError):
            pass  # keep what we knew; /health says why
        self._models = (now, names)
        return names

    def health(self) -> str:
        """ "ok", or why not: "no API key (set X)", "refused our credentials (401)", "unreachable", ... (cached)."""
        now = time.monotonic()
        if self._health is not None and now - self._health[0] < HEALTH_TTL_S:
            return self._health[1]
        if self._missing_key() is not None:
            state = f"no API key (set {self.config.api_key_env})"
        else:
            try:
                status = self._probe().status_code
                state = "ok" if status < 400 else f"refused our credentials ({status})" if status in (401, 403) \
                    else f"error ({status})"  # fmt: skip
            except httpx.TimeoutException:
                state = "timeout"
            except httpx.HTTPError:
                state = "unreachable"
        self._health = (now, state)
        return state

    # ------------------------------------------------------------------------------------- chat (async)
    def _client(self) -> httpx.AsyncClient:
        loop = id(asyncio.get_running_loop())
        client = self._clients.get(loop)
        if client is None or client.is_closed:
            timeout = httpx.Timeout(self.config.timeout_s, connect=min(10.0, self.config.timeout_s))
            client = self._clients[loop] = httpx.AsyncClient(timeout=timeout, transport=self._transport)
        return client

    async def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        """POST a (non-streaming) chat completion; the upstream's JSON response.

        Raises:
            UpstreamError: it refused, failed, timed out or could not be reached.
        """
        if (missing := self._missing_key()) is not None:
            raise missing
        try:
            response = await self._client().post(f"{self.base_url}/chat/completions", json=body, headers=self.headers())
        except httpx.HTTPError as exc:
            raise self.transport_error(exc) from None
        if response.status_code != 200:
            raise self.error_for(response.status_code, response.content)
        try:
            return response.json()
        except ValueError:
            raise UpstreamError(502, f"The upstream '{self.name}' sent a response that is not JSON.") from None

    async def stream(self, body: dict[str, Any]) -> ChatStream:
        """Start a streaming chat completion. The status is checked before this returns, so an upstream error
        is still a proper error response; then `ChatStream.chunks()` yields each parsed chunk as it arrives.

        Raises:
            UpstreamError: as `chat`.
        """
        if (missing := self._missing_key()) is not None:
            raise missing
        client = self._client()
        request = client.build_request("POST", f"{self.base_url}/chat/completions", json=body, headers=self.headers())
        try:
            response = await client.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise self.transport_error(exc) from None
        if response.status_code != 200:
            try:
                content = await response.aread()
            except httpx.HTTPError:
                content = b""
            finally:
                await response.aclose()
            raise self.error_for(response.status_code, content)
        return ChatStream(self, response)

    async def aclose(self) -> None:
        for client in self._clients.values():
            await client.aclose()
        self._clients.clear()


class ChatStream:
    """An open streaming response: `chunks()` parses its server-sent events; `aclose()` ends it early."""

    def __init__(self, upstream: Upstream, response: httpx.Response) -> None:
        self.upstream, self.response = upstream, response
        self._closing: asyncio.Future[None] | None = None

    async def chunks(self) -> AsyncIterator[dict[str, Any]]:
        """Each `data:` payload as a dict, until `[DONE]` or the end of the body.

        Raises:
            UpstreamError: the connection broke or timed out, or the upstream sent an error event.
        """
        try:
            async for line in self.response.aiter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators, `: keep-alive` comments, `event:` lines
                payload = line[5:].strip()
                if payload == "[DONE]":
                    return
                try:
                    chunk = json.loads(payload)
                except ValueError:
                    continue
                if isinstance(chunk, dict) and "error" in chunk and "choices" not in chunk:
                    raise self.upstream.error_for(502, payload.encode())
                if isinstance(chunk, dict):
                    yield chunk
        except httpx.HTTPError as exc:
            raise self.upstream.transport_error(exc) from None
        finally:
            await self.response.aclose()

    async def aclose(self) -> None:
        await self.response.aclose()

    def cancel(self) -> None:
        """Close the connection from synchronous code (the server's handles are cancelled that way)."""
        if not self.response.is_closed:
            self._closing = asyncio.ensure_future(self.response.aclose())
