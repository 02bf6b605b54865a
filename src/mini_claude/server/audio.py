"""`/v1/audio/*` serving logic: speech (streamed as it is made), transcription, the voice and model lists.

No FastAPI here (STYLE.md, point 8). Design choices:
- One `Speech` pipeline and one `Transcriber` per server, built from the settings on first use (engines
  load lazily; audio works before, and without, the language model). The web UI speaks through the same
  object (`speak_text`), never over HTTP.
- Engines are synchronous and CPU-bound: each step of a `SpeechRun` (one sentence: synthesize, encode) and
  each transcription runs in a worker thread, one at a time per kind (`CapacityLimiter(1)`: the machine has
  two cores and the scheduler's decode loop needs one), so the event loop never blocks.
- The first piece of audio is made before the response starts: a failure there (an engine error, an
  upstream refusing the key) is still a proper error response. A failure after that ends the stream (an SSE
  stream gets an `error` event first); the partial audio is not cached.
- `model` may name an agent: its voice and speed are the defaults for what the request leaves out.
- `instructions` is accepted and ignored (no engine here has a style prompt): `X-Ignored-Params` says so, and
  `X-Speed-Applied` reports a speed the engine clamped to its range.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio

from mini_claude.audio import AudioFormatError, Speech, SpeechError, SpeechRun, Transcriber, decode
from mini_claude.audio import speech_from_settings as _speech_from_settings
from mini_claude.server.errors import APIError
from mini_claude.server.protocol.audio import (
    AudioModelList,
    SpeechAudioDelta,
    SpeechAudioDone,
    SpeechRequest,
    SpeechUsage,
    Transcription,
    VoiceCard,
    VoiceList,
)

if TYPE_CHECKING:
    from mini_claude.server.service import ChatService

log = logging.getLogger(__name__)

MAX_UPLOAD_BYTES = 25 * 1024 * 1024  # OpenAI's limit for one transcription file
TEXT_FORMATS = {"text": "text/plain", "srt": "application/x-subrip", "vtt": "text/vtt"}


@dataclass
class SpeechResponse:
    """What the route sends: a media type, headers, and either the whole file or a stream of pieces."""

    media_type: str
    headers: dict[str, str] = field(default_factory=dict)
    content: bytes | None = None  # the whole file (no `stream_format`)
    stream: AsyncIterator[bytes] | AsyncIterator[str] | None = None  # "audio": bytes; "sse": event lines


def _api_error(exc: SpeechError | AudioFormatError) -> APIError:
    if isinstance(exc, AudioFormatError):
        return APIError(400, f"Could not read the audio file: {exc}.", param="file", code="invalid_audio")
    kind = "invalid_request_error" if exc.status < 500 else "server_error"
    return APIError(exc.status, exc.message, kind, param=exc.param, code=exc.code)


class AudioService:
    def __init__(self, service: ChatService) -> None:
        self.service = service
        self._speech: Speech | None = None
        self._transcriber: Transcriber | None = None
        self._tts_limiter = anyio.CapacityLimiter(1)
        self._stt_limiter = anyio.CapacityLimiter(1)

    @property
    def speech(self) -> Speech:
        if self._speech is None:
            self._speech = _speech_from_settings(self.service.settings)
            if self._speech.cache is not None:
                self.service.metrics.watch_audio_cache(self._speech.cache)
        return self._speech

    @property
    def transcriber(self) -> Transcriber:
        if self._transcriber is None:
            self._transcriber = Transcriber(threads=self.service.settings.audio_threads)
        return self._transcriber

    # ---------------------------------------------------------------------------------------- listings
    def voices(self) -> VoiceList:
        return VoiceList(voices=[VoiceCard(**voice.to_dict()) for voice in self.speech.voices()])

    def models(self) -> AudioModelList:
        return AudioModelList(models=[*self.speech.models(), *self.transcriber.models()])

    def health(self) -> dict[str, str]:
        """Each voice engine's state ("available" or why not), the transcriber's under its model name."""
        return {**self.speech.status(), self.transcriber.name: self.transcriber.status() or "available"}

    # ------------------------------------------------------------------------------------------ speech
    async def _pieces(self, run: SpeechRun) -> AsyncIterator[bytes]:
        """The run's pieces, each made in a worker thread; records its metrics when it ends."""
        pieces: Iterator[bytes] = iter(run)
        try:
            while (piece := await anyio.to_thread.run_sync(next, pieces, None, limiter=self._tts_limiter)) is not None:
                yield piece
        finally:
            pieces.close()  # type: ignore[attr-defined]
            self.service.metrics.observe_speech(run)

    async def _with_agent(self, req: SpeechRequest) -> SpeechRequest:
        """An agent as `model` gives the voice and speed the request leaves out (request > agent > engine)."""
        agents = self.service.agents
        spec = await self.service.db_call(agents.get_spec, req.model) if self.service.db is not None else None
        if spec is None:
            if req.voice is None:
                raise APIError(400, "Invalid value for 'voice': required (unless the model is an agent with a voice).",
                               param="voice")  # fmt: skip
            return req
        self.service.metrics.observe_agent(spec.name)
        fill: dict[str, Any] = {"model": None}  # the default engine, unless the voice id names another
        if spec.voice is not None and "voice" not in req.model_fields_set:
            fill["voice"] = spec.voice.voice
        if spec.voice is not None and spec.voice.speed is not None and "speed" not in req.model_fields_set:
            fill["speed"] = spec.voice.speed
        return req.model_copy(update=fill)

    async def speak(self, req: SpeechRequest) -> SpeechResponse:
        """Resolve the request, make its first piece, and return the response that streams the rest."""
        req = await self._with_agent(req)
        try:  # in a thread: resolving an ElevenLabs voice may ask the service for its voice list
            utterance = await anyio.to_thread.run_sync(
                self.speech.prepare, req.input, req.voice_name, req.model, req.speed, req.response_format
            )
        except SpeechError as exc:
            raise _api_error(exc) from None
        run = self.speech.run(utterance, progressive=req.stream_format is not None)
        pieces = self._pieces(run)
        try:
            first = await anext(pieces, b"")
        except SpeechError as exc:
            await pieces.aclose()
            raise _api_error(exc) from None
        headers = {"X-Voice": utterance.voice.id, "X-Cache": "hit" if run.cached else "miss"}
        if req.instructions:
            headers["X-Ignored-Params"] = "instructions"
        if utterance.speed != utterance.requested_speed:
            headers["X-Speed-Applied"] = f"{utterance.speed:g}"
        if req.stream_format == "sse":
            headers["Cache-Control"] = "no-cache"
            return SpeechResponse("text/event-stream", headers, stream=self._events(first, pieces, run))
        if req.stream_format == "audio":
            return SpeechResponse(utterance.media_type, headers, stream=self._chain(first, pieces))
        try:
            rest = b"".join([piece async for piece in pieces])
        except SpeechError as exc:
            raise _api_error(exc) from None
        return SpeechResponse(utterance.media_type, headers, content=first + rest)

    @staticmethod
    async def _chain(first: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        try:
            if first:
                yield first
            async for piece in rest:
                yield piece
        except SpeechError as exc:
            log.warning("speech failed mid-stream: %s", exc.message)
        finally:
            await rest.aclose()  # type: ignore[attr-defined]

    async def _events(self, first: bytes, rest: AsyncIterator[bytes], run: SpeechRun) -> AsyncIterator[str]:
        def delta(piece: bytes) -> str:
            return f"data: {SpeechAudioDelta(audio=base64.b64encode(piece).decode()).model_dump_json()}\n\n"

        try:
            if first:
                yield delta(first)
            async for piece in rest:
                yield delta(piece)
        except SpeechError as exc:
            error = _api_error(exc).body().error.model_dump()
            yield f"data: {json.dumps({'type': 'error', 'error': error})}\n\n"
            return
        finally:
            await rest.aclose()  # type: ignore[attr-defined]
        usage = SpeechUsage(input_characters=len(run.utterance.text), audio_seconds=round(run.audio_seconds, 3))
        yield f"data: {SpeechAudioDone(usage=usage).model_dump_json()}\n\n"

    async def speak_text(self, text: str, voice: str | None = None, fmt: str = "mp3") -> bytes:
        """The whole file for `text` (the web UI's play button): same pipeline, cache and metrics as the API."""
        try:
            utterance = await anyio.to_thread.run_sync(self.speech.prepare, text, voice, None, 1.0, fmt)
            run = self.speech.run(utterance, progressive=False)
            return b"".join([piece async for piece in self._pieces(run)])
        except SpeechError as exc:
            raise _api_error(exc) from None

    # ----------------------------------------------------------------------------------- transcription
    async def transcribe(
        self, data: bytes, model: str | None = None, language: str | None = None, prompt: str | None = None,
        response_format: str = "json", temperature: float = 0.0, words: bool = False,
    ) -> tuple[Any, str]:  # fmt: skip
        """(body, media type): a `Transcription` / verbose dict for the JSON formats, text for the others."""
        if len(data) > MAX_UPLOAD_BYTES:
            raise APIError(413, f"The file is {len(data) / 1e6:.1f} MB; the limit is 25 MB.", param="file",
                           code="file_too_large")  # fmt: skip
        if not 0.0 <= temperature <= 1.0:
            raise APIError(400, "temperature must be between 0 and 1.", param="temperature")
        transcriber = self.transcriber
        try:
            transcriber.check_model(model)
            samples = await anyio.to_thread.run_sync(decode, data, limiter=self._stt_limiter)
            transcript = await anyio.to_thread.run_sync(
                lambda: transcriber.transcribe(samples, language, prompt, temperature, words),
                limiter=self._stt_limiter,
            )
        except (SpeechError, AudioFormatError) as exc:
            raise _api_error(exc) from None
        self.service.metrics.observe_transcription(transcript.duration)
        if response_format == "json":
            return Transcription(text=transcript.text), "application/json"
        if response_format == "verbose_json":
            return transcript.verbose(words), "application/json"
        if response_format == "srt":
            return transcript.srt(), TEXT_FORMATS["srt"]
        if response_format == "vtt":
            return transcript.vtt(), TEXT_FORMATS["vtt"]
        return transcript.text, TEXT_FORMATS["text"]

    async def transcribe_file(self, data: bytes) -> str:
        """The text of an audio file (the web UI's microphone)."""
        body, _ = await self.transcribe(data)
        return body.text
