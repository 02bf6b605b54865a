"""`/v1/audio/*` over real sockets, driven by the official `openai` client where it has the call.

The speech comes from the real default engine (hibari) and the transcripts from the real Whisper tiny.en;
what is checked is the wire format, streaming, the cache and its metrics, and errors in OpenAI's shape.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from mini_claude.audio import decode

TEXT = ("The first sentence is here. A second sentence follows it. Then a third one comes. The fourth is next. "
        "And the fifth sentence ends it.")  # fmt: skip


@pytest.fixture
def server(make_live: Callable[..., Any], tmp_path: Path) -> Any:
    return make_live(audio_cache_dir=str(tmp_path / "audio-cache"), audio_cache_max_mb=64)


@pytest.fixture
def client(server: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def metric(server: Any, name: str) -> float:
    for line in httpx.get(f"{server.url}/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} is not in /metrics")


@pytest.mark.slow
def test_speech_round_trips_through_transcription(client: openai.OpenAI) -> None:
    speech = client.audio.speech.create(model="tts-1", voice="alloy", input="Please open the window.",
                                        response_format="mp3")  # fmt: skip
    audio = speech.content
    assert audio[:3] == b"ID3" or audio[:2] in (b"\xff\xf3", b"\xff\xfb", b"\xff\xf2")
    text = client.audio.transcriptions.create(model="whisper-1", file=("speech.mp3", audio), response_format="text")
    assert text.strip().lower().rstrip(".") == "please open the window"
    verbose = client.audio.transcriptions.create(
        model="whisper-1", file=("speech.mp3", audio), response_format="verbose_json",
        timestamp_granularities=["word", "segment"],
    )  # fmt: skip
    assert verbose.text.strip() == text.strip() and verbose.language == "english"
    assert verbose.segments and verbose.segments[0].start >= 0 and verbose.segments[-1].end <= verbose.duration + 1
    assert [w.word.strip(" .").lower() for w in verbose.words or []] == ["please", "open", "the", "window"]
    srt = client.audio.transcriptions.create(model="whisper-1", file=("speech.mp3", audio), response_format="srt")
    assert srt.startswith("1\n00:00:00,000 --> 00:00:0") and "window" in srt
    vtt = client.audio.transcriptions.create(model="whisper-1", file=("speech.mp3", audio), response_format="vtt")
    assert vtt.startswith("WEBVTT\n\n00:00:00.000 --> ")


@pytest.mark.slow
def test_stream_format_audio_sends_the_first_sentence_before_the_last_is_made(client: openai.OpenAI) -> None:
    client.audio.speech.create(model="tts-1", voice="nova", input="Warm up.")  # loads the engine (about a second)
    arrivals: list[float] = []
    pieces: list[bytes] = []
    start = time.perf_counter()
    with client.audio.speech.with_streaming_response.create(
        model="tts-1", voice="nova", input=TEXT * 2, response_format="pcm", extra_body={"stream_format": "audio"}
    ) as response:
        assert response.headers["content-type"] == "audio/pcm; rate=24000"
        for piece in response.iter_bytes():
            arrivals.append(time.perf_counter() - start)
            pieces.append(piece)
    pcm = b"".join(pieces)
    assert len(pcm) % 2 == 0 and len(pcm) / 2 / 24_000 > 8  # ten sentences of 16-bit 24 kHz audio
    assert len(pieces) >= 10
    assert arrivals[0] < 0.6 * arrivals[-1], f"the audio did not stream: chunks arrived at {arrivals}"


def test_sse_sends_base64_deltas_then_done_with_usage(server: Any) -> None:
    body = {"model": "tts-1", "input": "One. Two.", "voice": "alloy", "response_format": "wav", "stream_format": "sse"}
    with httpx.stream("POST", f"{server.url}/v1/audio/speech", json=body, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]
    assert [e["type"] for e in events[:-1]] == ["speech.audio.delta"] * (len(events) - 1) and len(events) >= 3
    assert events[-1]["type"] == "speech.audio.done"
    assert events[-1]["usage"]["input_characters"] == len("One. Two.") and events[-1]["usage"]["audio_seconds"] > 0.3
    wav = b"".join(base64.b64decode(e["audio"]) for e in events[:-1])
    assert wav[:4] == b"RIFF" and abs(decode(wav, 24_000).size / 24_000 - events[-1]["usage"]["audio_seconds"]) < 0.05


def test_repeated_speech_is_served_from_the_cache_and_counted(server: Any) -> None:
    body = {"model": "gpt-4o-mini-tts", "input": "Cache me.", "voice": "shimmer", "response_format": "flac",
            "instructions": "Speak cheerfully."}  # fmt: skip
    first = httpx.post(f"{server.url}/v1/audio/speech", json=body, timeout=60)
    second = httpx.post(f"{server.url}/v1/audio/speech", json=body, timeout=60)
    assert (first.status_code, second.status_code) == (200, 200)
    assert (first.headers["x-cache"], second.headers["x-cache"]) == ("miss", "hit")
    assert first.content == second.content and first.content[:4] == b"fLaC"
    assert first.headers["x-ignored-params"] == "instructions" and first.headers["x-voice"] == "hibari:heart"
    assert metric(server, "mini_claude_audio_cache_hits_total") == 1
    assert metric(server, "mini_claude_audio_cache_misses_total") == 1
    assert metric(server, "mini_claude_audio_cache_bytes") == len(first.content)
    assert metric(server, 'mini_claude_speech_audio_seconds_total{engine="hibari"}') > 0.3


def test_every_format_has_its_media_type(server: Any) -> None:
    media = {"mp3": "audio/mpeg", "opus": "audio/ogg; codecs=opus", "aac": "audio/aac", "flac": "audio/flac",
             "wav": "audio/wav", "pcm": "audio/pcm; rate=24000"}  # fmt: skip
    for fmt, media_type in media.items():
        body = {"model": "tts-1", "input": "Format check.", "voice": "alloy", "response_format": fmt}
        response = httpx.post(f"{server.url}/v1/audio/speech", json=body, timeout=60)
        assert response.status_code == 200 and response.headers["content-type"] == media_type, fmt
        if fmt != "pcm":
            assert 0.5 < decode(response.content, 24_000).size / 24_000 < 3, fmt


def test_voices_models_and_health_list_every_engine(server: Any) -> None:
    voices = httpx.get(f"{server.url}/v1/audio/voices").json()
    assert voices["object"] == "list" and voices["voices"][0]["id"] == "hibari:heart"
    assert all({"id", "name", "engine", "language"} <= set(v) for v in voices["voices"])
    models = {m["id"]: m for m in httpx.get(f"{server.url}/v1/audio/models").json()["models"]}
    assert {"tts-1", "tts-1-hd", "gpt-4o-mini-tts", "hibari", "espeak-ng", "elevenlabs", "whisper-1"} <= set(models)
    assert models["tts-1"]["engine"] == "hibari" and models["whisper-1"]["task"] == "speech-to-text"
    assert models["elevenlabs"]["available"] is False
    voice = httpx.get(f"{server.url}/health").json()["voice"]
    assert voice["hibari"] == voice["whisper-tiny.en"] == "available"
    assert voice["elevenlabs"] == "not configured (set ELEVENLABS_API_KEY)"


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"input": ""}, "input", None),
        ({"input": "x" * 4097}, "input", None),
        ({"voice": "nobody"}, "voice", "voice_not_found"),
        ({"voice": {"id": "voice_1234"}}, "voice", "voice_not_found"),
        ({"response_format": "ogg"}, "response_format", None),
        ({"speed": 0.1}, "speed", None),
        ({"input": "**  **"}, "input", "empty_input"),
    ],
)
def test_speech_mistakes_are_400s_in_openai_shape(
    client: openai.OpenAI, body: dict[str, Any], param: str, code: str | None
) -> None:
    request = {"model": "tts-1", "input": "Hello.", "voice": "alloy", **body}
    with pytest.raises(openai.BadRequestError) as caught:
        client.audio.speech.create(**request)
    error = caught.value.body
    assert isinstance(error, dict) and (error["param"], error["code"]) == (param, code)
    assert error["type"] == "invalid_request_error"


def test_unknown_models_are_404s(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.audio.speech.create(model="tts-9", input="Hello.", voice="alloy")
    with pytest.raises(openai.NotFoundError):
        client.audio.transcriptions.create(model="whisper-9", file=("a.wav", b"RIFF"))


def test_transcription_mistakes_are_400s(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.audio.transcriptions.create(model="whisper-1", file=("notes.txt", b"these are notes, not audio" * 9))
    assert caught.value.code == "invalid_audio"
    wav = httpx.post(f"{client.base_url}audio/speech", json={"model": "tts-1", "input": "Hi.", "voice": "alloy",
                                                              "response_format": "wav"}).content  # fmt: skip
    with pytest.raises(openai.BadRequestError) as caught:
        client.audio.transcriptions.create(model="whisper-1", file=("a.wav", wav), language="fr")
    assert caught.value.code == "unsupported_language"
    with pytest.raises(openai.BadRequestError):
        client.audio.transcriptions.create(model="whisper-1", file=("a.wav", wav), response_format="docx")  # type: ignore[arg-type]
