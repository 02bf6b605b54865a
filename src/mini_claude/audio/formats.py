"""Audio formats: float samples in, OpenAI's response formats out (as they are made), and any upload decoded.

Design choices:
- Every engine's audio is resampled to one rate, 24 kHz mono (what OpenAI's `pcm` format promises and the
  rate Opus accepts), so the formats, the cache and the clients never depend on which engine spoke.
- mp3, opus (in Ogg), flac and wav are written by libsndfile, which the `soundfile` wheel bundles with LAME
  and Opus, so no ffmpeg is needed. aac has no libsndfile encoder: it is written by PyAV's FFmpeg (installed
  with faster-whisper), and is refused with a clear error where that encoder is missing.
- Streaming: an `Encoder` writes into a `_Sink`, and what has been appended since the last call is sent at
  once. Encoders patch their headers when they close (a WAV's sizes, a FLAC's sample count and MD5, the mp3
  LAME tag); a patch to bytes already sent is kept in the full file only. So the streamed bytes are a valid
  progressive file (a FLAC of unknown length, a WAV whose sizes are 0xFFFFFFFF as OpenAI streams them) and
  `Encoder.file` is the exact file, which is what the cache stores and a non-streaming response sends.
  mp3 is constant bitrate so that even a reader that estimates length from the file size gets it right.
- Decoding goes through PyAV (FFmpeg), which reads every container browsers record (webm/opus, ogg, mp4/aac)
  as well as wav, mp3 and flac, and resamples to what Whisper wants (16 kHz mono float).
"""

from __future__ import annotations

import io
import struct
from collections.abc import Callable
from typing import Any, Literal

import numpy as np

SAMPLE_RATE = 24_000  # every engine's audio is resampled to this before encoding
Format = Literal["mp3", "opus", "aac", "flac", "wav", "pcm"]
FORMATS: tuple[Format, ...] = ("mp3", "opus", "aac", "flac", "wav", "pcm")
MEDIA_TYPES: dict[str, str] = {
    "mp3": "audio/mpeg", "opus": "audio/ogg; codecs=opus", "aac": "audio/aac", "flac": "audio/flac",
    "wav": "audio/wav", "pcm": "audio/pcm; rate=24000",
}  # fmt: skip
EXTENSIONS: dict[str, Format] = {
    ".mp3": "mp3", ".opus": "opus", ".ogg": "opus", ".aac": "aac", ".flac": "flac", ".wav": "wav", ".pcm": "pcm",
    ".raw": "pcm",
}  # fmt: skip
_SNDFILE = {"mp3": ("MP3", "MPEG_LAYER_III"), "opus": ("OGG", "OPUS"), "flac": ("FLAC", "PCM_16")}


class AudioFormatError(ValueError):
    """Audio that cannot be read, or a format that cannot be written here; the message says which and why."""


def to_int16(samples: np.ndarray) -> bytes:
    """Float samples in [-1, 1] as little-endian 16-bit PCM (the inverse of reading PCM as `int16 / 32768`)."""
    return np.clip(np.rint(np.asarray(samples, np.float64) * 32768.0), -32768, 32767).astype("<i2").tobytes()


def aac_available() -> bool:
    """Whether an AAC encoder is installed (PyAV's FFmpeg build)."""
    try:
        import av
    except ImportError:
        return False
    return "aac" in av.codecs_available


class _Sink:
    """A seekable in-memory file; `take()` returns what was appended since the last call.

    Writes into the part already taken still land in `data` (the exact file) but are not sent again.
    """

    def __init__(self) -> None:
        self.data = bytearray()
        self.pos = 0
        self.sent = 0

    def write(self, chunk: Any) -> int:
        chunk = bytes(chunk)
        end = self.pos + len(chunk)
        if end > len(self.data):
            self.data.extend(b"\0" * (end - len(self.data)))
        self.data[self.pos : end] = chunk
        self.pos = end
        return len(chunk)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: len(self.data)}[whence]
        self.pos = base + offset
        return self.pos

    def tell(self) -> int:
        return self.pos

    def read(self, size: int = -1) -> bytes:
        end = len(self.data) if size < 0 else self.pos + size
        out = bytes(self.data[self.pos : end])
        self.pos += len(out)
        return out

    def seekable(self) -> bool:
        return True

    def flush(self) -> None:
        pass

    def take(self) -> bytes:
        out = bytes(self.data[self.sent :])
        self.sent = len(self.data)
        return out


def _wav_header(data_bytes: int | None, rate: int = SAMPLE_RATE) -> bytes:
    """A 16-bit mono PCM WAV header; `data_bytes=None` (streaming) writes OpenAI's 0xFFFFFFFF sizes."""
    riff = 0xFFFFFFFF if data_bytes is None else 36 + data_bytes
    size = 0xFFFFFFFF if data_bytes is None else data_bytes
    return (
        b"RIFF" + struct.pack("<I", riff) + b"WAVEfmt " + struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16)
        + b"data" + struct.pack("<I", size)
    )  # fmt: skip


class Encoder:
    """Encodes 24 kHz float chunks into `fmt`: `write` and `close` return the bytes to send now.

    After `close`, `file` is the exact file (headers patched), which may differ from the streamed bytes.
    """

    def __init__(self, fmt: Format, rate: int = SAMPLE_RATE) -> None:
        if fmt not in FORMATS:
            raise AudioFormatError(f"unknown audio format {fmt!r}; use one of {', '.join(FORMATS)}")
        self.fmt, self.rate = fmt, rate
        self._pcm = bytearray()  # wav and pcm: the samples so far
        self._sink = _Sink()
        self._file: bytes | None = None
        self._started = False
        self._write: Callable[[np.ndarray], None]
        self._close: Callable[[], None]
        if fmt in _SNDFILE:
            import soundfile as sf

            container, subtype = _SNDFILE[fmt]
            extra = {"bitrate_mode": "CONSTANT", "compression_level": 0.5} if fmt == "mp3" else {}
            sound = sf.SoundFile(self._sink, "w", rate, 1, subtype, format=container, **extra)
            self._write = lambda samples: (sound.write(samples), sound.flush())  # type: ignore[func-returns-value]
            self._close = sound.close
        elif fmt == "aac":
            self._open_aac()

    def _open_aac(self) -> None:
        if not aac_available():
            raise AudioFormatError(
                "response_format 'aac' needs an AAC encoder, and none is installed here (PyAV with FFmpeg's aac); "
                "use mp3, opus, flac, wav or pcm"
            )
        import av

        container = av.open(self._sink, "w", format="adts")
        stream = container.add_stream("aac", rate=self.rate, layout="mono")
        stream.bit_rate = 64_000

        def write(samples: np.ndarray) -> None:
            frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1).astype(np.float32), format="flt", layout="mono")
            frame.sample_rate = self.rate
            for packet in stream.encode(frame):
                container.mux(packet)

        def close() -> None:
            for packet in stream.encode(None):
                container.mux(packet)
            container.close()

        self._write, self._close = write, close

    def write(self, samples: np.ndarray) -> bytes:
        """Add float samples (mono, `self.rate`); returns the bytes that are ready to send."""
        samples = np.asarray(samples, dtype=np.float32).reshape(-1)
        if self.fmt in ("wav", "pcm"):
            pcm = to_int16(samples)
            self._pcm += pcm
            head = b"" if self._started or self.fmt == "pcm" else _wav_header(None, self.rate)
            self._started = True
            return head + pcm
        if samples.size:
            self._write(samples)
        self._started = True
        return self._sink.take()

    def close(self) -> bytes:
        """Finish the file; returns the last bytes to send (then `file` is the exact file)."""
        if self.fmt in ("wav", "pcm"):
            head = b"" if self._started or self.fmt == "pcm" else _wav_header(None, self.rate)
            pcm = bytes(self._pcm)
            self._file = (_wav_header(len(pcm), self.rate) + pcm) if self.fmt == "wav" else pcm
            return head
        self._close()
        self._file = bytes(self._sink.data)
        return self._sink.take()

    @property
    def file(self) -> bytes:
        if self._file is None:
            raise RuntimeError("the encoder is still open")
        return self._file


def encode(samples: np.ndarray, fmt: Format, rate: int = SAMPLE_RATE) -> bytes:
    """The whole file of `samples` (mono float at `rate`) in `fmt`."""
    encoder = Encoder(fmt, rate)
    encoder.write(samples)
    encoder.close()
    return encoder.file


class Resampler:
    """Mono float audio from one rate to another, chunk after chunk (FFmpeg's resampler keeps its state)."""

    def __init__(self, source: int, target: int = SAMPLE_RATE) -> None:
        self.source, self.target = source, target
        self._resampler: Any = None
        if source != target:
            import av

            self._resampler = av.AudioResampler(format="flt", layout="mono", rate=target)

    def __call__(self, samples: np.ndarray | None) -> np.ndarray:
        """Resampled `samples`; `None` flushes what the filter still holds (call it once at the end)."""
        if self._resampler is None:
            return np.zeros(0, np.float32) if samples is None else np.asarray(samples, np.float32).reshape(-1)
        import av

        frame = None
        if samples is not None:
            samples = np.ascontiguousarray(np.asarray(samples, np.float32).reshape(1, -1))
            if samples.size == 0:
                return np.zeros(0, np.float32)
            frame = av.AudioFrame.from_ndarray(samples, format="flt", layout="mono")
            frame.sample_rate = self.source
        frames = self._resampler.resample(frame)
        parts = [f.to_ndarray().reshape(-1) for f in frames]
        return np.concatenate(parts).astype(np.float32) if parts else np.zeros(0, np.float32)


def resample(samples: np.ndarray, source: int, target: int = SAMPLE_RATE) -> np.ndarray:
    """All of `samples` from `source` Hz to `target` Hz."""
    resampler = Resampler(source, target)
    return np.concatenate([resampler(samples), resampler(None)])


def decode(data: bytes, rate: int = 16_000, max_seconds: float = 3 * 3600) -> np.ndarray:
    """Any audio file (wav, mp3, flac, ogg/opus, webm, mp4/m4a, aac...) as mono float samples at `rate`.

    Raises:
        AudioFormatError: the bytes are not audio FFmpeg can read, have no audio stream, or run longer than
            `max_seconds`.
    """
    import av

    if not data:
        raise AudioFormatError("the file is empty")
    try:
        with av.open(io.BytesIO(data), "r") as container:
            if not container.streams.audio:
                raise AudioFormatError("the file has no audio stream")
            resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
            parts: list[np.ndarray] = []
            total = 0
            for frame in container.decode(audio=0):
                for out in resampler.resample(frame):
                    parts.append(out.to_ndarray().reshape(-1))
                    total += parts[-1].size
                if total > max_seconds * rate:
                    raise AudioFormatError(f"the audio is longer than {max_seconds / 3600:g} hours")
            parts.extend(out.to_ndarray().reshape(-1) for out in resampler.resample(None))
    except av.error.FFmpegError as exc:
        raise AudioFormatError(f"the file is not audio that can be decoded ({exc.strerror or exc})") from None
    if not parts:
        raise AudioFormatError("the file contains no audio samples")
    return np.concatenate(parts).astype(np.float32)
