"""The round trip: our TTS speaks 24 varied sentences, our STT (Whisper tiny.en) transcribes them, and the word
error rate is computed with jiwer after the usual normalisation (case, punctuation, hyphens, numbers as words).

The default engine must stay under 15% WER (it measures about 3% here, see bench/README.md); espeak-ng is
measured too, with a looser bound: formant speech is much harder for a tiny recogniser. Each run prints its
figures (`pytest -s` shows them) and the bench (`bench/bench_audio.py`) records them.
"""

from __future__ import annotations

import re

import jiwer
import pytest

from audio.conftest import SENTENCES, require_espeak  # type: ignore[import-not-found]
from mini_claude.audio import Speech, Transcriber, decode
from mini_claude.audio.espeak import EspeakEngine
from mini_claude.audio.neural import HibariEngine

_ONES = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
    "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen",
]  # fmt: skip
_TENS = ["twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def _number_words(n: int) -> str:
    """0-999 in words, as the reference sentences write numbers (Whisper writes digits)."""
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10 - 2] + ("" if n % 10 == 0 else f" {_ONES[n % 10]}")
    rest = n % 100
    return f"{_ONES[n // 100]} hundred" + (f" {_number_words(rest)}" if rest else "")


def normalise(text: str) -> str:
    text = re.sub(r"\d+", lambda m: _number_words(int(m.group())) if int(m.group()) < 1000 else m.group(), text)
    text = text.lower().replace("-", " ").replace("o'clock", "oclock")
    return " ".join(re.sub(r"[^a-z0-9' ]", " ", text).split())


def word_error_rate(references: list[str], hypotheses: list[str]) -> float:
    return jiwer.wer([normalise(r) for r in references], [normalise(h) for h in hypotheses])


def round_trip(speech: Speech, transcriber: Transcriber, voice: str) -> tuple[float, list[tuple[str, str]]]:
    references = [line.strip() for line in SENTENCES.read_text().splitlines() if line.strip()]
    heard = [transcriber.transcribe(decode(speech.synthesize(s, voice, fmt="flac"))).text for s in references]
    return word_error_rate(references, heard), [(r, h) for r, h in zip(references, heard, strict=True)
                                                 if normalise(r) != normalise(h)]  # fmt: skip


def test_the_normalisation_only_forgives_spelling() -> None:
    said = normalise("Water boils at 100 degrees, at 8 o'clock.")
    assert said == "water boils at one hundred degrees at eight oclock"
    assert word_error_rate(["snow glowed pink"], ["Snow-glowed pink!"]) == 0.0
    assert word_error_rate(["the cat sat"], ["the hat sat down"]) == pytest.approx(2 / 3)


@pytest.mark.slow
def test_round_trip_word_error_rate_of_the_default_voice(hibari: HibariEngine, transcriber: Transcriber) -> None:
    references = [line for line in SENTENCES.read_text().splitlines() if line.strip()]
    assert len(references) >= 20
    wer, misses = round_trip(Speech([hibari], "hibari"), transcriber, "hibari:heart")
    print(f"\nhibari:heart -> whisper tiny.en: WER {wer:.1%} over {len(references)} sentences")
    for reference, heard in misses:
        print(f"  said {reference!r}\n  heard {heard!r}")
    assert wer < 0.15


@pytest.mark.slow
def test_round_trip_word_error_rate_of_espeak(espeak: EspeakEngine, transcriber: Transcriber) -> None:
    require_espeak()
    wer, _ = round_trip(Speech([HibariEngine(), espeak], "espeak-ng"), transcriber, "espeak-ng:en-us")
    print(f"\nespeak-ng:en-us -> whisper tiny.en: WER {wer:.1%}")
    assert wer < 0.35  # formant speech: intelligible, but far from the neural voice
