"""Every response format, whole and streamed, decodes back to the samples; uploads of any container decode."""

from __future__ import annotations

import io
import wave

import av
import numpy as np
import pytest

from mini_claude.audio import formats
from mini_claude.audio.formats import FORMATS, AudioFormatError, Encoder, decode, resample


def tone(seconds: float = 1.0, rate: int = 24_000, hz: float = 440.0) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    return (0.4 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def peak_hz(samples: np.ndarray, rate: int) -> float:
    """The loudest frequency (to 1/duration Hz)."""
    return float(np.argmax(np.abs(np.fft.rfft(samples))) * rate / samples.size)


@pytest.mark.parametrize("fmt", FORMATS)
def test_whole_and_streamed_files_decode_to_the_same_audio(fmt: str) -> None:
    chunks = [tone(0.5, hz=220 * (i + 1)) for i in range(3)]
    encoder = Encoder(fmt)  # type: ignore[arg-type]
    streamed = b"".join(encoder.write(c) for c in chunks) + encoder.close()
    whole = np.concatenate(chunks)
    if fmt == "pcm":
        assert streamed == encoder.file == formats.to_int16(whole)
        return
    assert len(streamed) == len(encoder.file)  # header patches change bytes, never the length
    for data in (encoder.file, streamed):
        got = decode(data, rate=24_000)
        if fmt in ("wav", "flac"):  # lossless: the samples themselves, to 16-bit rounding
            np.testing.assert_allclose(got, whole, atol=1 / 16_000)
            continue
        assert abs(got.size - whole.size) <= 2048  # mp3/aac add an encoder delay of a frame or two
        delay = got.size - whole.size
        for i, hz in enumerate((220, 440, 660)):  # each half second still sounds at its own pitch
            part = got[delay + i * 12_000 + 2000 : delay + (i + 1) * 12_000 - 2000]
            assert abs(peak_hz(part, 24_000) - hz) <= 3, (fmt, i)


def test_wav_headers_streamed_as_openai_does_and_exact_in_the_file() -> None:
    encoder = Encoder("wav")
    streamed = encoder.write(tone(0.25)) + encoder.write(tone(0.25)) + encoder.close()
    assert streamed[4:8] == b"\xff\xff\xff\xff" and streamed[40:44] == b"\xff\xff\xff\xff"
    with wave.open(io.BytesIO(encoder.file)) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth(), w.getnframes()) == (24_000, 1, 2, 12_000)


def test_aac_is_refused_clearly_without_an_encoder(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(formats, "aac_available", lambda: False)
    with pytest.raises(AudioFormatError, match="needs an AAC encoder"):
        Encoder("aac")


def test_resampling_keeps_pitch_and_duration() -> None:
    out = resample(tone(1.0, 22_050, 300.0), 22_050, 24_000)
    assert abs(out.size - 24_000) <= 32
    assert abs(peak_hz(out[:24_000], 24_000) - 300) <= 1  # 1 Hz bins over one second


def _browser_recording(codec: str, container: str) -> bytes:
    """A tone the way a browser records it (webm/opus) or a phone uploads it (m4a/aac), written by FFmpeg."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=container) as out:
        stream = out.add_stream(codec, rate=48_000, layout="mono")
        frame = av.AudioFrame.from_ndarray(tone(1.0, 48_000).reshape(1, -1), format="flt", layout="mono")
        frame.sample_rate = 48_000
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            out.mux(packet)
    return buffer.getvalue()


@pytest.mark.parametrize(("codec", "container"), [("libopus", "webm"), ("aac", "mp4"), ("libopus", "ogg")])
def test_decode_reads_browser_containers_at_16_khz(codec: str, container: str) -> None:
    got = decode(_browser_recording(codec, container))
    assert abs(got.size - 16_000) < 1600
    assert abs(peak_hz(got[:16_000], 16_000) - 440) <= 2


@pytest.mark.parametrize("data", [b"", b"this is plain text, not audio" * 10, b"RIFF\x00\x00\x00\x00WAVEjunk"])
def test_decode_refuses_what_is_not_audio(data: bytes) -> None:
    with pytest.raises(AudioFormatError):
        decode(data)
