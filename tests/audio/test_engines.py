"""The offline engines and the pipeline over them: voices, sentence streaming, speed, formats, cache, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from audio.conftest import require_espeak  # type: ignore[import-not-found]
from mini_claude.audio import AudioCache, Speech, SpeechError, decode
from mini_claude.audio.espeak import EspeakEngine
from mini_claude.audio.neural import HibariEngine, PiperEngine
from mini_claude.audio.speech import OPENAI_VOICES

TEXT = "The first sentence is short. The second one is a little longer than the first. And a third!"


def test_hibari_speaks_its_bundled_voice_deterministically(hibari: HibariEngine) -> None:
    assert hibari.status() is None
    voice = hibari.find_voice("heart")
    assert voice is not None and voice.id == hibari.default_voice == "hibari:heart"
    first = list(hibari.stream(["Hello there."], voice, 1.0))
    again = list(hibari.stream(["Hello there."], voice, 1.0))
    assert len(first) == 1 and np.array_equal(first[0], again[0])  # seeded: a cached file equals a fresh one
    assert 0.4 < first[0].size / 24_000 < 3 and 0.05 < np.abs(first[0]).max() <= 1.0
    slow = next(hibari.stream(["Hello there."], voice, 0.5))
    assert slow.size > 1.5 * first[0].size


def test_espeak_lists_languages_and_takes_variants(espeak: EspeakEngine) -> None:
    require_espeak()
    ids = {v.id for v in espeak.voices()}
    assert {"espeak-ng:en-us", "espeak-ng:fr-fr", "espeak-ng:de", "espeak-ng:ja"} <= ids and len(ids) > 50
    assert not any(v.id.startswith("espeak-ng:mb") for v in espeak.voices())
    voice = espeak.find_voice("en-us+f3")
    assert voice is not None and voice.short == "en-us+f3"
    with pytest.raises(SpeechError, match="no variant"):
        espeak.find_voice("en-us+nosuchvariant")
    fast, slow = (next(espeak.stream(["Hello there, how are you?"], voice, s)) for s in (2.0, 0.5))
    assert slow.size > 2.5 * fast.size


def test_the_pipeline_streams_one_piece_per_sentence_and_caches_the_exact_file(
    hibari: HibariEngine, espeak: EspeakEngine, tmp_path: Path
) -> None:
    speech = Speech([hibari, espeak], "hibari", AudioCache(tmp_path, 10_000_000))
    utterance = speech.prepare(TEXT, "alloy", "tts-1", 1.0, "mp3")
    assert (utterance.engine.name, utterance.voice.id, len(utterance.sentences)) == ("hibari", "hibari:heart", 3)
    run = speech.run(utterance)
    pieces = list(run)
    assert run.cached is False and run.complete and len(pieces) >= 3  # audio left after each sentence
    assert run.first_audio_seconds is not None and run.first_audio_seconds < run.synthesis_seconds
    assert 3 < run.audio_seconds < 15 and run.file is not None
    hit = speech.run(speech.prepare(TEXT, "nova", None, 1.0, "mp3"))
    assert b"".join(hit) == run.file and hit.cached is True
    whole = speech.synthesize(TEXT, "hibari:heart", "hibari", 1.0, "mp3")
    assert whole == run.file
    assert abs(decode(whole, 24_000).size / 24_000 - run.audio_seconds) < 0.2


def test_openai_names_select_the_default_engine_and_engine_names_select_theirs(speech: Speech) -> None:
    require_espeak()
    for voice in OPENAI_VOICES:
        assert speech.resolve_voice(voice, "gpt-4o-mini-tts")[1].id == "hibari:heart"
    assert speech.resolve_voice("alloy", "espeak-ng")[1].id == "espeak-ng:en-us"
    assert speech.resolve_voice("fr", "espeak-ng")[1].id == "espeak-ng:fr-fr"  # a language without its region
    assert speech.resolve_voice("espeak-ng:de", "tts-1")[1].id == "espeak-ng:de"  # an id names its engine
    assert speech.resolve_voice("de", None)[1].id == "espeak-ng:de"  # a bare name any engine has
    assert speech.resolve_voice(None, None)[1].id == "hibari:heart"


@pytest.mark.parametrize(
    ("kwargs", "param", "code"),
    [
        ({"voice": "nobody"}, "voice", "voice_not_found"),
        ({"voice": "espeak-ng:en-us", "model": "hibari"}, "voice", "voice_not_found"),
        ({"model": "tts-9"}, "model", "model_not_found"),
        ({"text": " \n ** ** "}, "input", "empty_input"),
        ({"text": "x" * 4097}, "input", "input_too_long"),
        ({"fmt": "ogg"}, "response_format", "invalid_format"),
        ({"speed": 4.5}, "speed", None),
    ],
)
def test_user_mistakes_are_speech_errors_before_any_work(
    speech: Speech, kwargs: dict[str, object], param: str, code: str | None
) -> None:
    request: dict[str, object] = {"text": "Hello.", "voice": "alloy", "model": "tts-1", "speed": 1.0, "fmt": "mp3"}
    with pytest.raises(SpeechError) as caught:
        speech.prepare(**{**request, **kwargs})  # type: ignore[arg-type]
    assert (caught.value.param, caught.value.code, caught.value.status) == (
        param, code, 404 if code == "model_not_found" else 400,
    )  # fmt: skip


def test_speed_is_clamped_to_the_engine_and_reported(speech: Speech) -> None:
    utterance = speech.prepare("Hello.", "alloy", "tts-1", 4.0, "wav")
    assert (utterance.speed, utterance.requested_speed) == (2.0, 4.0)  # hibari's range is 0.5-2


def test_an_engine_that_is_not_installed_says_so() -> None:
    class Missing(EspeakEngine):
        def __init__(self) -> None:
            super().__init__(binary="no-such-espeak-binary")

    speech = Speech([HibariEngine(), Missing()], "hibari")
    assert speech.status()["espeak-ng"].startswith("no-such-espeak-binary is not installed")
    with pytest.raises(SpeechError, match="not available here") as caught:
        speech.prepare("Hello.", "espeak-ng:en-us")
    assert caught.value.code == "engine_unavailable"


def test_piper_when_installed() -> None:
    piper = PiperEngine()
    if piper.status() is not None:
        pytest.skip(f"Piper is optional: {piper.status()}")
    voice = piper.find_voice("joe")
    assert voice is not None
    [samples] = list(piper.stream(["Hello there."], voice, 1.0))
    assert 0.4 < samples.size / piper.sample_rate(voice) < 3
