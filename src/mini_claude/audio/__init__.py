"""Voice in and out: text-to-speech engines, speech-to-text, audio formats and the audio cache.

`engines` lists the engines (hibari, the offline neural default; espeak-ng; Piper when installed;
ElevenLabs with a key), `Speech` is the pipeline over them (`speech.py`), `Transcriber` is Whisper tiny.en
(`stt.py`). This package knows nothing of HTTP: the server, the web UI, the CLI and the benchmark use it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mini_claude.audio.cache import AudioCache
from mini_claude.audio.formats import AudioFormatError, decode, encode
from mini_claude.audio.speech import Speech, SpeechRun, Utterance
from mini_claude.audio.stt import Transcriber, Transcript
from mini_claude.audio.tts import SpeechEngine, SpeechError, Voice

if TYPE_CHECKING:
    from mini_claude.settings import Settings


def engines(settings: Settings) -> list[SpeechEngine]:
    """Every engine this build knows, in the order `/v1/audio/voices` lists them; each reports its own state."""
    from mini_claude.audio.elevenlabs import ElevenLabsEngine
    from mini_claude.audio.espeak import EspeakEngine
    from mini_claude.audio.neural import HibariEngine, PiperEngine

    return [
        HibariEngine(threads=settings.audio_threads), EspeakEngine(), PiperEngine(),
        ElevenLabsEngine(settings.elevenlabs_api_key, settings.elevenlabs_base_url, settings.elevenlabs_model),
    ]  # fmt: skip


def speech_from_settings(settings: Settings) -> Speech:
    """The pipeline as configured: the engines, the default one, and the on-disk cache (unless 0 MB)."""
    cache = None
    if settings.audio_cache_max_mb > 0:
        cache = AudioCache(settings.audio_cache_dir, int(settings.audio_cache_max_mb * 1024 * 1024))
    return Speech(engines(settings), settings.tts_engine, cache)


__all__ = [
    "AudioCache", "AudioFormatError", "Speech", "SpeechEngine", "SpeechError", "SpeechRun", "Transcriber",
    "Transcript", "Utterance", "Voice", "decode", "encode", "engines", "speech_from_settings",
]  # fmt: skip
