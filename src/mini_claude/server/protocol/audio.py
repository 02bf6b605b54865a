"""`/v1/audio/*`: OpenAI's speech and transcription requests and responses, and the voice and model lists.

`voice` is a name or `{"id": ...}` (OpenAI's custom-voice form); `speed` is OpenAI's 0.25-4;
`instructions` is accepted (OpenAI's style prompt for gpt-4o-mini-tts) and has no effect here, since none
of our engines takes a free-text style; the response says so in `X-Ignored-Params`. `stream_format`
absent sends the finished file; "audio" streams it as it is made; "sse" sends `speech.audio.delta` events
(base64 audio) and one `speech.audio.done`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

from mini_claude.server.protocol.common import _Request
from mini_claude.text import Text

MAX_INPUT_CHARS = 4096
SpeechFormat = Literal["mp3", "opus", "aac", "flac", "wav", "pcm"]
TranscriptionFormat = Literal["json", "text", "srt", "verbose_json", "vtt"]


class VoiceId(BaseModel):
    id: str


class SpeechRequest(_Request):
    model: str = Field(
        description="tts-1, tts-1-hd or gpt-4o-mini-tts (the default engine), an engine's name, or an agent's "
        "(its voice and speed are the defaults)"
    )
    input: Text = Field(max_length=MAX_INPUT_CHARS, description="The text to speak (at most 4096 characters).")
    voice: str | VoiceId | None = Field(
        None, description="A voice id from GET /v1/audio/voices, or an OpenAI voice name (optional with an agent)."
    )
    response_format: SpeechFormat = "mp3"
    speed: float = Field(1.0, ge=0.25, le=4.0)
    instructions: Text | None = Field(None, max_length=MAX_INPUT_CHARS)
    stream_format: Literal["audio", "sse"] | None = None

    @field_validator("input")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value

    @property
    def voice_name(self) -> str | None:
        return self.voice.id if isinstance(self.voice, VoiceId) else self.voice


class SpeechUsage(BaseModel):
    """OpenAI's `speech.audio.done` usage; no engine here counts tokens, so those are 0 (as in speaches)."""

    input_tokens: int = 0
    output_tokens: int = 0
    total_tokens: int = 0
    input_characters: int = 0
    audio_seconds: float = 0.0


class SpeechAudioDelta(BaseModel):
    type: Literal["speech.audio.delta"] = "speech.audio.delta"
    audio: str  # base64 of the next bytes of the file in `response_format`


class SpeechAudioDone(BaseModel):
    type: Literal["speech.audio.done"] = "speech.audio.done"
    usage: SpeechUsage


class VoiceCard(BaseModel):
    id: str
    name: str
    engine: str
    language: str
    gender: str | None = None
    description: str | None = None


class VoiceList(BaseModel):
    object: Literal["list"] = "list"
    voices: list[VoiceCard]


class AudioModelList(BaseModel):
    object: Literal["list"] = "list"
    models: list[dict[str, Any]]


class Transcription(BaseModel):
    text: str


class TranscriptionSegment(BaseModel):
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


class TranscriptionWord(BaseModel):
    word: str
    start: float
    end: float
    probability: float | None = None


class TranscriptionVerbose(BaseModel):
    task: Literal["transcribe"] = "transcribe"
    language: str
    duration: float
    text: str
    segments: list[TranscriptionSegment]
    words: list[TranscriptionWord] | None = None
