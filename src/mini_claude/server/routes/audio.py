"""`/v1/audio/speech`, `/v1/audio/transcriptions` (OpenAI's), `/v1/audio/voices` and `/v1/audio/models`
(the lists Open WebUI, Kokoro-FastAPI and speaches serve)."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import File, Form, Response, UploadFile
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from mini_claude.server.errors import APIError
from mini_claude.server.protocol.audio import (
    AudioModelList,
    SpeechRequest,
    Transcription,
    TranscriptionFormat,
    TranscriptionVerbose,
    VoiceList,
)
from mini_claude.server.routes.common import ServiceDep, api_router

router = api_router()
Granularity = Literal["word", "segment"]
AUDIO_DOC = {200: {"content": {"audio/mpeg": {}, "text/event-stream": {}}}}


@router.post("/v1/audio/speech", response_class=Response, responses=AUDIO_DOC)
async def speech(body: SpeechRequest, service: ServiceDep) -> Response:
    """Speak `input` (OpenAI's shape). Without `stream_format` the finished file is sent; "audio" streams it as it
    is made (sentence by sentence); "sse" sends `speech.audio.delta` / `speech.audio.done` events."""
    result = await service.audio.speak(body)
    if result.content is not None:
        return Response(result.content, media_type=result.media_type, headers=result.headers)
    headers = {"X-Accel-Buffering": "no", **result.headers}
    return StreamingResponse(result.stream, media_type=result.media_type, headers=headers)  # type: ignore[arg-type]


@router.post("/v1/audio/transcriptions", response_model=Transcription | TranscriptionVerbose)
async def transcriptions(
    service: ServiceDep,
    file: Annotated[UploadFile, File(description="Audio: wav, mp3, flac, ogg/opus, webm, m4a/mp4...")],
    model: Annotated[str, Form()] = "whisper-1",
    language: Annotated[str | None, Form()] = None,
    prompt: Annotated[str | None, Form()] = None,
    response_format: Annotated[TranscriptionFormat, Form()] = "json",
    temperature: Annotated[float, Form()] = 0.0,
    timestamp_granularities: Annotated[list[Granularity] | None, Form(alias="timestamp_granularities[]")] = None,
) -> Response:
    """Transcribe an audio file with Whisper tiny.en (OpenAI's shape: json, text, verbose_json, srt, vtt)."""
    data = await file.read()
    words = "word" in (timestamp_granularities or [])
    if words and response_format != "verbose_json":
        raise APIError(400, "timestamp_granularities needs response_format 'verbose_json'.",
                       param="timestamp_granularities")  # fmt: skip
    body, media_type = await service.audio.transcribe(data, model, language, prompt, response_format, temperature,
                                                      words)  # fmt: skip
    if isinstance(body, str):
        return PlainTextResponse(body, media_type=media_type)
    return JSONResponse(body if isinstance(body, dict) else body.model_dump())


@router.get("/v1/audio/voices", response_model=VoiceList)
def voices(service: ServiceDep) -> VoiceList:
    """Every engine's voices, `{"voices": [{"id", "name", ...}]}`; send an `id` as a speech request's `voice`."""
    return service.audio.voices()


@router.get("/v1/audio/models", response_model=AudioModelList)
def audio_models(service: ServiceDep) -> AudioModelList:
    """The speech and transcription models: OpenAI's names (aliases of the defaults) and each engine, with its state."""
    return service.audio.models()
