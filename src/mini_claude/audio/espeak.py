"""espeak-ng: formant synthesis in about a hundred languages, used when its binary is installed.

It is the multilingual fallback, not the default: robotic next to the neural engines (the STT round trip
shows it), but tiny, instant and everywhere (`apt-get install espeak-ng`; .ci/run installs it). The binary is
run once per sentence with the text on stdin (never as an argument, so text cannot become an option) and
its WAV read from stdout.

Voices are espeak-ng's languages (`espeak-ng:en-us`, `espeak-ng:fr`, ...; its MBROLA voices are left out,
they need separate databases). A variant may be added as espeak does: `espeak-ng:en-us+f3`, `+klatt`, one of
`espeak-ng --voices=variant`. Speed is words per minute: 175 x speed, within espeak-ng's 80-450.
"""

from __future__ import annotations

import functools
import io
import shutil
import struct
import subprocess
from collections.abc import Iterator, Sequence

import numpy as np

from mini_claude.audio.tts import SpeechEngine, SpeechError, Voice

WORDS_PER_MINUTE = 175  # espeak-ng's own default rate: speed 1.0
TIMEOUT_S = 60


def _parse_voices(listing: str) -> list[tuple[str, str, str, str]]:
    """(language, gender, name, file) rows of `espeak-ng --voices` output."""
    rows = []
    for line in listing.splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 5:
            rows.append((parts[1], parts[2].rpartition("/")[2], parts[3], parts[4]))
    return rows


def _read_wav(data: bytes) -> tuple[np.ndarray, int]:
    """Samples and rate of espeak-ng's 16-bit WAV (its sizes are bogus when written to a pipe)."""
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise RuntimeError("espeak-ng did not write a WAV file")
    stream, rate = io.BytesIO(data), 22050
    stream.seek(12)
    while header := stream.read(8):
        kind, size = header[:4], struct.unpack("<I", header[4:])[0]
        if kind == b"fmt ":
            rate = struct.unpack("<I", stream.read(size)[4:8])[0]
        elif kind == b"data":
            pcm = np.frombuffer(stream.read(), dtype="<i2")
            return pcm.astype(np.float32) / 32768.0, rate
        else:
            stream.seek(size, io.SEEK_CUR)
    return np.zeros(0, np.float32), rate


class EspeakEngine(SpeechEngine):
    name = "espeak-ng"
    description = "espeak-ng: formant synthesis, about a hundred languages, offline"
    licence = "GPL-3.0-or-later (run as a separate program)"
    speed_range = (80 / WORDS_PER_MINUTE, 450 / WORDS_PER_MINUTE)

    def __init__(self, binary: str = "espeak-ng") -> None:
        self.binary = binary

    @functools.cached_property
    def path(self) -> str | None:
        return shutil.which(self.binary)

    def status(self) -> str | None:
        return None if self.path else f"{self.binary} is not installed (apt-get install espeak-ng)"

    def _run(self, *args: str, text: str | None = None) -> bytes:
        assert self.path is not None
        result = subprocess.run(
            [self.path, *args], input=(text or "").encode(), capture_output=True, timeout=TIMEOUT_S, check=False
        )
        if result.returncode != 0:
            raise RuntimeError(f"espeak-ng failed: {result.stderr.decode(errors='replace').strip()}")
        return result.stdout

    @functools.cached_property
    def _voices(self) -> list[Voice]:
        if self.path is None:
            return []
        out, seen = [], set()
        for language, gender, name, file in _parse_voices(self._run("--voices").decode()):
            if file.startswith("mb/") or language in seen:  # MBROLA voices need databases we do not have
                continue
            seen.add(language)
            gender = {"M": "male", "F": "female"}.get(gender)
            out.append(Voice(id=f"espeak-ng:{language}", name=name.replace("_", " "), engine=self.name,
                             language=language, gender=gender))  # fmt: skip
        return out

    @functools.cached_property
    def variants(self) -> set[str]:
        """Variant names (`f3`, `klatt`, `Alex`, ...) a voice may add after `+`."""
        if self.path is None:
            return set()
        rows = _parse_voices(self._run("--voices=variant").decode())
        return {file.rpartition("/")[2] for _, _, _, file in rows}

    def voices(self) -> list[Voice]:
        return list(self._voices)

    @property
    def default_voice(self) -> str:
        return "espeak-ng:en-us"

    def find_voice(self, name: str) -> Voice | None:
        """A listed language, optionally with `+variant` (`en-us+f3`)."""
        base, plus, variant = name.removeprefix(f"{self.name}:").partition("+")
        voice = super().find_voice(base) or self._by_language(base)
        if voice is None or not plus:
            return voice
        if variant not in self.variants:
            raise SpeechError(
                f"espeak-ng has no variant {variant!r}; try one of {', '.join(sorted(self.variants)[:12])}, ...",
                param="voice", code="voice_not_found",
            )  # fmt: skip
        return Voice(id=f"{voice.id}+{variant}", name=f"{voice.name} ({variant})", engine=self.name,
                     language=voice.language)  # fmt: skip

    def _by_language(self, language: str) -> Voice | None:
        """A language without its region, as espeak-ng's `-v fr` takes it: `fr` -> `fr-fr`, `pt` -> `pt-br`..."""
        regional = [v for v in self._voices if v.language.startswith(f"{language.lower()}-")]
        same = [v for v in regional if v.language == f"{language.lower()}-{language.lower()}"]
        return (same or regional or [None])[0]

    def sample_rate(self, voice: Voice) -> int:
        return 22_050

    def stream(self, sentences: Sequence[str], voice: Voice, speed: float) -> Iterator[np.ndarray]:
        rate = str(round(WORDS_PER_MINUTE * self.clamp_speed(speed)))
        for sentence in sentences:
            samples, _ = _read_wav(self._run("--stdout", "-v", voice.short, "-s", rate, text=sentence))
            yield samples
