"""ElevenLabs, through its official SDK, when `ELEVENLABS_API_KEY` is set.

Design choices:
- The SDK's client is built with the configured `base_url` (`MINI_CLAUDE_ELEVENLABS_BASE_URL`, default
  ElevenLabs' own), so the same code runs against the real service and against the ElevenLabs-shaped test
  server in tests/audio, which checks the `xi-api-key` header as the service does.
- Audio is asked for as raw 16-bit PCM at 24 kHz (`output_format="pcm_24000"`, offered on every plan), so it
  goes through our own encoders and cache like every other engine's, in whichever format the client wants.
- It takes the whole text in one request (`/v1/text-to-speech/{voice_id}/stream`): ElevenLabs streams
  as it synthesizes, and one request keeps the prosody across sentences and costs one call.
- The voice list (`GET /v1/voices`) is fetched on first use and kept for `VOICES_TTL_S`; a failure is kept
  as the engine's status (shown by /health), not raised at every listing.
- ElevenLabs' speed setting spans 0.7-1.2; OpenAI's wider range is clamped to it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from mini_claude.audio.tts import SpeechEngine, SpeechError, Voice

VOICES_TTL_S = 300.0
DEFAULT_MODEL = "eleven_multilingual_v2"
OUTPUT_FORMAT, OUTPUT_RATE = "pcm_24000", 24_000


def _message(exc: Exception) -> str:
    """A short reason from an SDK error (its `body` is ElevenLabs' JSON error, often `{"detail": ...}`)."""
    body = getattr(exc, "body", None)
    detail = body.get("detail") if isinstance(body, dict) else None
    if isinstance(detail, dict):
        detail = detail.get("message") or detail.get("status")
    status = getattr(exc, "status_code", None)
    text = str(detail or body or exc).strip()
    return f"HTTP {status}: {text}" if status else text


class ElevenLabsEngine(SpeechEngine):
    name = "elevenlabs"
    description = "ElevenLabs' text-to-speech service (needs ELEVENLABS_API_KEY and the network)"
    licence = "a hosted service: ElevenLabs' terms"
    speed_range = (0.7, 1.2)
    streams_sentences = False

    def __init__(self, api_key: str | None, base_url: str | None = None, model_id: str = DEFAULT_MODEL,
                 timeout_s: float = 60.0) -> None:  # fmt: skip
        self.api_key, self.base_url, self.model_id, self.timeout_s = api_key, base_url, model_id, timeout_s
        self._client: Any = None
        self._voices: list[Voice] = []
        self._fetched = 0.0
        self._error: str | None = None
        self._lock = threading.Lock()

    @property
    def client(self) -> Any:
        if self._client is None:
            from elevenlabs.client import ElevenLabs

            kwargs: dict[str, Any] = {"api_key": self.api_key, "timeout": self.timeout_s}
            if self.base_url:
                kwargs["base_url"] = self.base_url.rstrip("/")
            self._client = ElevenLabs(**kwargs)
        return self._client

    def status(self) -> str | None:
        if not self.api_key:
            return "not configured (set ELEVENLABS_API_KEY)"
        return self._error and f"the service failed: {self._error}"

    def _refresh(self) -> None:
        from elevenlabs.core.api_error import ApiError

        try:
            listing = self.client.voices.get_all()
        except ApiError as exc:
            self._error = _message(exc)
            return
        except Exception as exc:  # httpx's transport errors: the service is unreachable
            self._error = f"unreachable ({exc.__class__.__name__}: {exc})"
            return
        self._error = None
        self._voices = [
            Voice(id=f"elevenlabs:{v.voice_id}", name=v.name or v.voice_id, engine=self.name,
                  language=(v.labels or {}).get("language", "multilingual"), gender=(v.labels or {}).get("gender"),
                  description=v.description or (v.labels or {}).get("description"))
            for v in listing.voices
        ]  # fmt: skip

    def voices(self) -> list[Voice]:
        if not self.api_key:
            return []
        with self._lock:
            if time.monotonic() - self._fetched > VOICES_TTL_S or self._error:
                self._refresh()
                self._fetched = time.monotonic()
            return list(self._voices)

    @property
    def default_voice(self) -> str:
        voices = self.voices()
        return voices[0].id if voices else "elevenlabs:"

    def find_voice(self, name: str) -> Voice | None:
        voice = super().find_voice(name)
        if voice is None and name.startswith(f"{self.name}:") and len(name) > len(self.name) + 1:
            # A voice id the list does not show (a shared or library voice) is ElevenLabs' to accept or refuse.
            voice = Voice(id=name, name=name.split(":", 1)[1], engine=self.name, language="multilingual")
        return voice

    def sample_rate(self, voice: Voice) -> int:
        return OUTPUT_RATE

    def stream(self, sentences: Sequence[str], voice: Voice, speed: float) -> Iterator[np.ndarray]:
        from elevenlabs import VoiceSettings
        from elevenlabs.core.api_error import ApiError

        settings = VoiceSettings(speed=self.clamp_speed(speed)) if speed != 1.0 else None
        chunks = self.client.text_to_speech.stream(
            voice.short, text=" ".join(sentences), model_id=self.model_id, output_format=OUTPUT_FORMAT,
            voice_settings=settings,
        )  # fmt: skip
        pending = b""
        try:
            for chunk in chunks:
                pending += chunk
                whole = len(pending) - len(pending) % 2  # 16-bit samples may straddle two chunks
                if whole:
                    yield np.frombuffer(pending[:whole], dtype="<i2").astype(np.float32) / 32768.0
                    pending = pending[whole:]
        except ApiError as exc:
            status = getattr(exc, "status_code", None) or 502
            if status in (401, 403):
                raise SpeechError(f"ElevenLabs refused this server's API key ({_message(exc)})",
                                  code="upstream_auth_error", status=502) from None  # fmt: skip
            if status in (400, 404, 422):
                raise SpeechError(f"ElevenLabs refused the request ({_message(exc)})", param="voice",
                                  code="upstream_error", status=400) from None  # fmt: skip
            raise SpeechError(f"ElevenLabs failed ({_message(exc)})", code="upstream_error", status=502) from None
        except SpeechError:
            raise
        except Exception as exc:
            if exc.__class__.__module__.startswith("httpx"):
                raise SpeechError(f"ElevenLabs is unreachable ({exc})", code="upstream_unavailable",
                                  status=502) from None  # fmt: skip
            raise
