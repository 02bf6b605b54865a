"""The speech pipeline every front end uses: resolve model and voice, then text -> sentences -> engine ->
24 kHz samples -> encoder -> bytes, through the cache.

Design choices:
- `Speech.prepare` turns a request's (text, model, voice, speed, format) into an `Utterance`, raising
  `SpeechError` for every user mistake before any work starts; `Speech.run` makes a `SpeechRun`, an iterator
  of bytes that is lazy: the first sentence is synthesized, encoded and sent before the second is started,
  so time to the first audio byte is one sentence's work, not the whole text's.
- OpenAI's model names (`tts-1`, `tts-1-hd`, `gpt-4o-mini-tts`) select the default engine, and its voice names
  (alloy, nova, ...) that engine's default voice, so OpenAI's clients work unchanged; an engine's own name
  (`hibari`, `espeak-ng`, `elevenlabs`, `piper`) selects that engine.
- A run that finishes stores the exact file in the cache; a hit is sent as it is. `progressive=False` sends
  only the exact file, once it is complete (what a request without `stream_format` gets).
- Nothing here is asynchronous or knows HTTP: the server runs a `SpeechRun` in a worker thread, the CLI and
  the benchmark iterate it directly.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mini_claude.audio.cache import AudioCache, cache_key
from mini_claude.audio.formats import FORMATS, MEDIA_TYPES, SAMPLE_RATE, Encoder, Format, Resampler
from mini_claude.audio.text import sentences, speakable
from mini_claude.audio.tts import SpeechEngine, SpeechError, Voice

OPENAI_TTS_MODELS = ("tts-1", "tts-1-hd", "gpt-4o-mini-tts", "gpt-4o-mini-tts-2025-12-15")
OPENAI_VOICES = ("alloy", "ash", "ballad", "coral", "echo", "fable", "onyx", "nova", "sage", "shimmer", "verse",
                 "marin", "cedar")  # fmt: skip
MAX_INPUT_CHARS = 4096  # OpenAI's limit for one request
SENTENCE_GAP_S = 0.12  # silence between sentences an engine speaks separately
SEND_BYTES = 1 << 16  # a cached file goes out in pieces of this size


@dataclass(frozen=True)
class Utterance:
    """A request ready to speak: the engine, the voice, what will be said and how."""

    engine: SpeechEngine
    voice: Voice
    text: str  # the speakable text (markup removed)
    sentences: tuple[str, ...]
    speed: float  # as applied by the engine (clamped to its range)
    fmt: Format
    requested_speed: float = 1.0

    @property
    def key(self) -> str:
        return cache_key(self.engine.name, self.voice.id, self.text, self.speed, self.fmt)

    @property
    def media_type(self) -> str:
        return MEDIA_TYPES[self.fmt]


@dataclass
class SpeechRun:
    """The bytes of one utterance, made as they are iterated; the timings are filled in meanwhile."""

    utterance: Utterance
    speech: Speech
    progressive: bool = True
    cached: bool | None = None  # None until the first piece is asked for
    audio_seconds: float = 0.0  # audio produced (for a hit: unknown, left 0)
    synthesis_seconds: float = 0.0  # engine + encoding time spent
    first_audio_seconds: float | None = None  # from the first `next()` to the first non-empty piece
    complete: bool = False
    file: bytes | None = None  # the exact file once complete
    _started: float = field(default=0.0, repr=False)

    def __iter__(self) -> Iterator[bytes]:
        self._started = time.perf_counter()
        for piece in self._pieces():
            if piece:
                if self.first_audio_seconds is None:
                    self.first_audio_seconds = time.perf_counter() - self._started
                yield piece
        self.complete = True

    def _pieces(self) -> Iterator[bytes]:
        u, cache = self.utterance, self.speech.cache
        data = cache.get(u.key) if cache is not None else None
        self.cached = data is not None
        if data is not None:
            self.file = data
            for start in range(0, len(data), SEND_BYTES):
                yield data[start : start + SEND_BYTES]
            return
        encoder = Encoder(u.fmt)
        resampler = Resampler(u.engine.sample_rate(u.voice), SAMPLE_RATE)
        gap = np.zeros(round(SENTENCE_GAP_S * SAMPLE_RATE) if u.engine.streams_sentences else 0, np.float32)
        clock = time.perf_counter()
        for i, samples in enumerate(u.engine.stream(u.sentences, u.voice, u.speed)):
            audio = resampler(samples)
            if i and gap.size:
                audio = np.concatenate([gap, audio])
            self.audio_seconds += audio.size / SAMPLE_RATE
            out = encoder.write(audio)
            self.synthesis_seconds += time.perf_counter() - clock
            if self.progressive:
                yield out
            clock = time.perf_counter()
        tail = resampler(None)
        self.audio_seconds += tail.size / SAMPLE_RATE
        out = encoder.write(tail) + encoder.close()
        self.synthesis_seconds += time.perf_counter() - clock
        self.file = encoder.file
        if cache is not None:
            cache.put(u.key, self.file)
        yield out if self.progressive else self.file


class Speech:
    """The engines, the default one, and the cache; `prepare` then `run` (or `synthesize` for a whole file)."""

    def __init__(self, engines: Sequence[SpeechEngine], default: str, cache: AudioCache | None = None) -> None:
        self.engines = {engine.name: engine for engine in engines}
        if default not in self.engines:
            raise ValueError(f"unknown default speech engine {default!r}; known: {', '.join(self.engines)}")
        self.default = default
        self.cache = cache

    # ------------------------------------------------------------------------------------------ listing
    def available(self) -> list[SpeechEngine]:
        return [engine for engine in self.engines.values() if engine.status() is None]

    def voices(self) -> list[Voice]:
        """Every usable voice of every available engine, the default engine's first."""
        engines = sorted(self.available(), key=lambda engine: engine.name != self.default)
        return [voice for engine in engines for voice in engine.voices()]

    def models(self) -> list[dict[str, Any]]:
        """OpenAI's model names (aliases of the default engine), then each engine."""
        default = self.engines[self.default]
        available = default.status() is None
        aliases = [
            {"id": name, "object": "model", "owned_by": "mini-claude", "task": "text-to-speech",
             "engine": default.name, "available": available}
            for name in OPENAI_TTS_MODELS
        ]  # fmt: skip
        return aliases + [engine.info() for engine in self.engines.values()]

    def status(self) -> dict[str, str]:
        """Each engine's state: "available", or why not."""
        return {name: engine.status() or "available" for name, engine in self.engines.items()}

    # ---------------------------------------------------------------------------------------- resolving
    def _engine_for_model(self, model: str | None) -> SpeechEngine | None:
        """The engine `model` names; None for OpenAI's names and no model (the voice may then choose)."""
        if model is None or model in OPENAI_TTS_MODELS:
            return None
        if model in self.engines:
            return self.engines[model]
        names = ", ".join([*OPENAI_TTS_MODELS, *self.engines])
        raise SpeechError(f"The model '{model}' does not exist; speech models here: {names}.", param="model",
                          code="model_not_found", status=404)  # fmt: skip

    def _usable(self, engine: SpeechEngine) -> SpeechEngine:
        if (reason := engine.status()) is not None:
            raise SpeechError(f"The speech engine '{engine.name}' is not available here: {reason}.", param="model",
                              code="engine_unavailable")  # fmt: skip
        return engine

    def resolve_voice(self, voice: str | None, model: str | None = None) -> tuple[SpeechEngine, Voice]:
        """The engine and voice a request's `voice` (and `model`) name; see the module docstring."""
        chosen = self._engine_for_model(model)
        name = (voice or "").strip()
        prefix = name.split(":", 1)[0] if ":" in name else None
        if prefix in self.engines:
            engine = self.engines[prefix]
            if chosen is not None and chosen is not engine:
                raise SpeechError(f"The voice '{name}' belongs to '{engine.name}', not to the model '{model}'.",
                                  param="voice", code="voice_not_found")  # fmt: skip
        else:
            engine = chosen or self.engines[self.default]
        engine = self._usable(engine)
        if not name or name.lower() in OPENAI_VOICES:
            name = engine.default_voice
        found = engine.find_voice(name)
        if found is None and chosen is None and prefix is None:  # a bare name: any engine that has it
            found = next((v for e in self.available() if (v := e.find_voice(name)) is not None), None)
            engine = self.engines[found.engine] if found is not None else engine
        if found is None:
            some = ", ".join(v.id for v in self.voices()[:8])
            message = f"The voice '{name}' does not exist here; voices include {some} (GET /v1/audio/voices lists all)."
            raise SpeechError(message, param="voice", code="voice_not_found")
        return engine, found

    def prepare(self, text: str, voice: str | None = None, model: str | None = None, speed: float = 1.0,
                fmt: str = "mp3") -> Utterance:  # fmt: skip
        """Check a request and resolve it; every user mistake is a `SpeechError` here, before any synthesis."""
        if fmt not in FORMATS:
            raise SpeechError(f"Unknown response_format '{fmt}'; use one of {', '.join(FORMATS)}.",
                              param="response_format", code="invalid_format")  # fmt: skip
        if not 0.25 <= speed <= 4.0:
            raise SpeechError("speed must be between 0.25 and 4.0.", param="speed")
        if len(text) > MAX_INPUT_CHARS:
            raise SpeechError(f"The input is {len(text)} characters long; the limit is {MAX_INPUT_CHARS}.",
                              param="input", code="input_too_long")  # fmt: skip
        spoken = speakable(text)
        pieces = tuple(sentences(spoken))
        if not pieces:
            raise SpeechError("The input has nothing to say: it is empty or has no words.", param="input",
                              code="empty_input")  # fmt: skip
        engine, found = self.resolve_voice(voice, model)
        if fmt == "aac":
            from mini_claude.audio.formats import aac_available

            if not aac_available():
                raise SpeechError("response_format 'aac' needs an AAC encoder (PyAV's FFmpeg), which is not "
                                  "installed here; use mp3, opus, flac, wav or pcm.", param="response_format",
                                  code="unsupported_format")  # fmt: skip
        return Utterance(engine, found, spoken, pieces, engine.clamp_speed(speed), fmt, speed)  # type: ignore[arg-type]

    def run(self, utterance: Utterance, progressive: bool = True) -> SpeechRun:
        return SpeechRun(utterance, self, progressive)

    def synthesize(self, text: str, voice: str | None = None, model: str | None = None, speed: float = 1.0,
                   fmt: str = "wav") -> bytes:  # fmt: skip
        """The whole file for `text` (the CLI's and the web UI's call)."""
        run = self.run(self.prepare(text, voice, model, speed, fmt), progressive=False)
        for _ in run:
            pass
        assert run.file is not None
        return run.file
