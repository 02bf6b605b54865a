"""ElevenLabs through the official SDK, against a local server that answers in ElevenLabs' API shape.

The server (a stdlib `ThreadingHTTPServer` on 127.0.0.1) implements what the SDK calls: `GET /v1/voices` and
`POST /v1/text-to-speech/{voice_id}/stream` with `?output_format=pcm_24000`, checking the `xi-api-key` header
and answering errors as ElevenLabs does (`{"detail": {"status", "message"}}`). Its audio is a tone that
depends on the voice and the text, so the tests can check the exact samples arrive, through our engine and
through `/v1/audio/speech`.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import parse_qs, urlparse

import numpy as np
import pytest
from fastapi.testclient import TestClient

from helpers import TINY_VOCAB, tiny_tokenizer
from mini_claude.audio.elevenlabs import ElevenLabsEngine
from mini_claude.audio.formats import to_int16
from mini_claude.config import PRESETS
from mini_claude.engine import Engine
from mini_claude.model import Transformer
from mini_claude.server import create_app
from mini_claude.settings import Settings
from mini_claude.tokenizer import Tokenizer

KEY = "test-elevenlabs-key"
VOICES = [
    {"voice_id": "21m00Tcm4TlvDq8ikWAM", "name": "Rachel", "category": "premade",
     "labels": {"gender": "female", "accent": "american", "language": "en"}},
    {"voice_id": "pNInz6obpgDQGcFmaJgB", "name": "Adam", "category": "premade", "labels": {"gender": "male"}},
]  # fmt: skip


def fake_pcm(voice_id: str, text: str) -> bytes:
    """The fake service's audio: 10 ms of tone per character, pitched by voice."""
    hz = 300 if voice_id == VOICES[0]["voice_id"] else 150
    t = np.arange(240 * len(text)) / 24_000
    return to_int16((0.3 * np.sin(2 * np.pi * hz * t)).astype(np.float32))


class FakeElevenLabs(BaseHTTPRequestHandler):
    requests: ClassVar[list[dict[str, Any]]] = []

    def log_message(self, *args: Any) -> None:
        pass

    def _json(self, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _authorized(self) -> bool:
        if self.headers.get("xi-api-key") == KEY:
            return True
        self._json(401, {"detail": {"status": "invalid_api_key", "message": "Invalid API key"}})
        return False

    def do_GET(self) -> None:
        if urlparse(self.path).path != "/v1/voices":
            return self._json(404, {"detail": "Not Found"})
        if self._authorized():
            self._json(200, {"voices": VOICES})

    def do_POST(self) -> None:
        url = urlparse(self.path)
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        parts = url.path.strip("/").split("/")  # v1 text-to-speech {voice_id} stream
        if parts[:2] != ["v1", "text-to-speech"] or len(parts) not in (3, 4):
            return self._json(404, {"detail": "Not Found"})
        if not self._authorized():
            return None
        query = parse_qs(url.query)
        self.requests.append({"voice_id": parts[2], "query": query, "body": body, "path": url.path})
        if parts[2] not in {v["voice_id"] for v in VOICES}:
            return self._json(404, {"detail": {"status": "voice_not_found", "message": "A voice with that ID does "
                                               "not exist."}})  # fmt: skip
        if query.get("output_format") != ["pcm_24000"]:
            return self._json(422, {"detail": "this fake only speaks pcm_24000"})
        pcm = fake_pcm(parts[2], body["text"])
        self.send_response(200)
        self.send_header("Content-Type", "audio/pcm")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for start in range(0, len(pcm), 4801):  # odd-sized chunks: samples straddle them
            piece = pcm[start : start + 4801]
            self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
        self.wfile.write(b"0\r\n\r\n")
        return None


@pytest.fixture(scope="module")
def service_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeElevenLabs)
    FakeElevenLabs.protocol_version = "HTTP/1.1"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_the_engine_lists_voices_and_streams_pcm_through_the_sdk(service_url: str) -> None:
    FakeElevenLabs.requests.clear()
    engine = ElevenLabsEngine(KEY, service_url)
    assert engine.status() is None
    assert [(v.id, v.name, v.gender) for v in engine.voices()] == [
        ("elevenlabs:21m00Tcm4TlvDq8ikWAM", "Rachel", "female"), ("elevenlabs:pNInz6obpgDQGcFmaJgB", "Adam", "male"),
    ]  # fmt: skip
    voice = engine.find_voice("Rachel") or engine.find_voice("21m00Tcm4TlvDq8ikWAM")
    assert voice is not None
    samples = np.concatenate(list(engine.stream(["Hello there.", "Second."], voice, 0.5)))
    expected = np.frombuffer(fake_pcm(voice.short, "Hello there. Second."), "<i2").astype(np.float32) / 32768
    np.testing.assert_array_equal(samples, expected)
    [request] = FakeElevenLabs.requests
    assert request["path"].endswith("/stream") and request["body"]["text"] == "Hello there. Second."
    assert request["body"]["model_id"] == "eleven_multilingual_v2"
    assert request["body"]["voice_settings"]["speed"] == 0.7  # OpenAI's 0.5 clamped to ElevenLabs' range


def test_a_wrong_key_is_reported_not_raised(service_url: str) -> None:
    engine = ElevenLabsEngine("wrong-key", service_url)
    assert engine.voices() == []
    assert "401" in (engine.status() or "") and "Invalid API key" in (engine.status() or "")
    assert ElevenLabsEngine(None, service_url).status() == "not configured (set ELEVENLABS_API_KEY)"


def _app(tmp_path: Path, **settings: Any) -> TestClient:
    config = PRESETS["tiny-llama"].replace(vocab_size=TINY_VOCAB, max_seq_len=64)
    engine = Engine(Transformer(config).eval(), Tokenizer(tiny_tokenizer(), eos_token="<|im_end|>"), "tiny")
    values = {"database_url": f"sqlite:///{tmp_path / 'db.sqlite'}", "api_keys": [], "ui": False,
              "audio_cache_dir": str(tmp_path / "cache"), **settings}  # fmt: skip
    return TestClient(create_app(Settings(_env_file=None, **values), engine))  # type: ignore[arg-type]


def test_the_api_speaks_with_elevenlabs_voices(service_url: str, tmp_path: Path) -> None:
    with _app(tmp_path, ELEVENLABS_API_KEY=KEY, elevenlabs_base_url=service_url) as client:
        assert client.get("/health").json()["voice"]["elevenlabs"] == "available"
        ids = [v["id"] for v in client.get("/v1/audio/voices").json()["voices"]]
        assert "elevenlabs:21m00Tcm4TlvDq8ikWAM" in ids and ids[0] == "hibari:heart"
        body = {"model": "elevenlabs", "input": "Hi from the fake.", "voice": "elevenlabs:pNInz6obpgDQGcFmaJgB",
                "response_format": "pcm"}  # fmt: skip
        response = client.post("/v1/audio/speech", json=body)
        assert response.status_code == 200 and response.headers["content-type"] == "audio/pcm; rate=24000"
        assert response.content == fake_pcm("pNInz6obpgDQGcFmaJgB", "Hi from the fake.")  # 24 kHz in and out: exact
        unknown = client.post("/v1/audio/speech", json={**body, "voice": "elevenlabs:nope"})
        assert unknown.status_code == 400 and unknown.json()["error"]["code"] == "upstream_error"


def test_the_api_reports_a_refused_key_as_a_bad_gateway(service_url: str, tmp_path: Path) -> None:
    with _app(tmp_path, ELEVENLABS_API_KEY="wrong-key", elevenlabs_base_url=service_url) as client:
        body = {"model": "elevenlabs", "input": "Hello.", "voice": "elevenlabs:21m00Tcm4TlvDq8ikWAM"}
        response = client.post("/v1/audio/speech", json=body)
        assert response.status_code == 502
        assert response.json()["error"]["code"] == "upstream_auth_error"
        assert "refused this server's API key" in response.json()["error"]["message"]
        assert "Invalid API key" in client.get("/health").json()["voice"]["elevenlabs"]
