"""The text-to-speech interface every engine implements, and what a voice is.

Design choices:
- An engine turns sentences into float samples at its own rate (`stream`), one array per piece as soon as it
  is ready; splitting text, resampling, encoding, caching and streaming are the pipeline's (`speech.py`), so
  an engine is only what differs: how to load, which voices, how to make samples.
- Engines report their own state (`status()`: None when usable, else why not) instead of failing at import:
  `/health` and `/v1/audio/models` say which engines run here and what a missing one needs.
- Voice ids are `engine:voice` (`hibari:heart`, `espeak-ng:en-us`, `elevenlabs:<id>`), unique across engines;
  a bare voice name is looked up in the engine a request's `model` selects.
- `speed` is OpenAI's 0.25-4 multiplier; an engine clamps it to what it can do (`speed_range`) and the
  pipeline reports the speed it applied. `instructions` (OpenAI's style prompt) has no effect on these
  engines: none of them takes a free-text style control.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


class SpeechError(ValueError):
    """A request an engine cannot serve (unknown voice, engine not available); `param` names the field."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.message, self.param, self.code, self.status = message, param, code, status


@dataclass(frozen=True)
class Voice:
    """One voice of one engine, as `/v1/audio/voices` lists it (`{"id", "name", ...}`, Open WebUI's shape)."""

    id: str  # "engine:name", unique across engines
    name: str
    engine: str
    language: str = "en-us"
    gender: str | None = None
    description: str | None = None

    @property
    def short(self) -> str:
        """The voice's name within its engine (the id without the `engine:` prefix)."""
        return self.id.split(":", 1)[1]

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


class SpeechEngine(ABC):
    """A text-to-speech engine: voices, a sample rate, and samples for sentences."""

    name: str  # what `model` names to select it, and the prefix of its voice ids
    description: str
    licence: str
    speed_range: tuple[float, float] = (0.25, 4.0)
    streams_sentences = True  # the pipeline feeds it one sentence at a time (False: it takes the whole text)

    @abstractmethod
    def status(self) -> str | None:
        """None when the engine can speak here, else a one-line reason (what is missing)."""

    @abstractmethod
    def voices(self) -> list[Voice]:
        """The voices this engine can use now (nothing that would need a download)."""

    @property
    @abstractmethod
    def default_voice(self) -> str:
        """The id of the voice OpenAI's voice names (alloy, nova, ...) map to."""

    @abstractmethod
    def sample_rate(self, voice: Voice) -> int:
        """The rate of the samples `stream` yields for `voice`."""

    @abstractmethod
    def stream(self, sentences: Sequence[str], voice: Voice, speed: float) -> Iterator[np.ndarray]:
        """Mono float32 samples in [-1, 1], one array per piece as soon as it is made."""

    def clamp_speed(self, speed: float) -> float:
        low, high = self.speed_range
        return min(max(speed, low), high)

    def find_voice(self, name: str) -> Voice | None:
        """The voice called `name` (its id, or its name within this engine), if this engine has it."""
        for voice in self.voices():
            if name in (voice.id, voice.short):
                return voice
        return None

    def info(self) -> dict[str, Any]:
        """What `/v1/audio/models` says about the engine."""
        status = self.status()
        return {
            "id": self.name, "object": "model", "owned_by": "mini-claude", "task": "text-to-speech",
            "description": self.description, "license": self.licence, "available": status is None,
            "status": status or "available", "speed_range": list(self.speed_range),
        }  # fmt: skip
