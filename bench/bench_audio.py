"""Speech benchmark: time to first audio byte, real-time factor and round-trip word error rate per engine.

For each offline engine here (hibari, the default; Piper when installed; espeak-ng when its binary exists):

- **time to first audio byte** (TTFA) for a six-sentence paragraph, in process (`Speech.run`, mp3, the first
  `next()` to the first bytes) and over HTTP (`POST /v1/audio/speech` with `stream_format: "audio"` on a
  real uvicorn server, to the first body byte), against the time to the whole file (no `stream_format`):
  sentence streaming is what makes the first number small;
- **real-time factor** (RTF): synthesis + encoding time / seconds of audio made, over the 24 round-trip
  sentences (below 1 is faster than real time; 0.01 is 100x); and the same with CPU time instead of wall
  time (process + children), which a busy machine inflates far less: for a one-thread engine it is what
  the wall-clock RTF would be on an idle core;
- **WER** of the round trip: the engine speaks the 24 sentences of tests/audio/round_trip_sentences.txt,
  Whisper tiny.en transcribes them, jiwer scores them after the normalisation of tests/audio/test_round_trip.py;
  and the transcriber's own RTF.

The audio cache is off. Repetitions are interleaved across engines (the order rotates), and each engine's
CPU share (its process and children's CPU time / wall time) is printed as the noise check: about 1.0 for a
one-thread engine on a quiet machine, lower when it waited for a core. Run it at normal priority:

    .venv/bin/python bench/bench_audio.py --reps 5
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import socket
import statistics
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import uvicorn

ROOT = Path(__file__).resolve().parents[1]
SENTENCES = ROOT / "tests/audio/round_trip_sentences.txt"
PARAGRAPH = (
    "Mini-Claude runs a small language model on your own computer. It answers questions, remembers conversations "
    "and can fine-tune itself on your data. Replies stream as they are written. Now they can be heard as well. "
    "The first sentence plays while the rest is still being made. Nothing here needs the internet."
)

sys.path.insert(0, str(ROOT / "tests"))
from audio.test_round_trip import word_error_rate  # noqa: E402  (the test's normalisation, exactly)
from mini_claude.audio import Speech, Transcriber, decode, engines  # noqa: E402
from mini_claude.settings import Settings  # noqa: E402


def cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class Server:
    """The real app (no language model needed for audio: a tiny random one) on a free loopback port."""

    def __init__(self, settings: Settings) -> None:
        from helpers import TINY_VOCAB, tiny_tokenizer
        from mini_claude.config import PRESETS
        from mini_claude.engine import Engine
        from mini_claude.model import Transformer
        from mini_claude.server import create_app
        from mini_claude.tokenizer import Tokenizer

        config = PRESETS["tiny-llama"].replace(vocab_size=TINY_VOCAB, max_seq_len=64)
        engine = Engine(Transformer(config).eval(), Tokenizer(tiny_tokenizer(), eos_token="<|im_end|>"), "tiny")
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(create_app(settings, engine), log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def http_times(url: str, model: str, voice: str) -> tuple[float, float]:
    """(seconds to the first byte of a streamed response, seconds to the last byte of a whole-file one)."""
    body = {"model": model, "input": PARAGRAPH, "voice": voice, "response_format": "mp3"}
    start = time.perf_counter()
    with httpx.stream("POST", f"{url}/v1/audio/speech", json={**body, "stream_format": "audio"}, timeout=120) as r:
        r.raise_for_status()
        first = None
        for _ in r.iter_raw():
            first = first or time.perf_counter() - start
    start = time.perf_counter()
    httpx.post(f"{url}/v1/audio/speech", json=body, timeout=120).raise_for_status()
    return first or 0.0, time.perf_counter() - start


def measure(speech: Speech, name: str, voice: str, url: str) -> dict[str, float]:
    engine = speech.engines[name]
    cpu0, wall0 = cpu_seconds(), time.perf_counter()
    run = speech.run(speech.prepare(PARAGRAPH, voice, name, 1.0, "mp3"))
    start = time.perf_counter()
    for _ in run:
        pass
    whole = time.perf_counter() - start
    lines = [line.strip() for line in SENTENCES.read_text().splitlines() if line.strip()]
    rtf_run = speech.run(speech.prepare(" ".join(lines), voice, name, 1.0, "mp3"))
    cpu_rtf0 = cpu_seconds()
    for _ in rtf_run:
        pass
    cpu_rtf = cpu_seconds() - cpu_rtf0
    http_first, http_whole = http_times(url, name, voice)
    share = (cpu_seconds() - cpu0) / (time.perf_counter() - wall0)
    assert engine.status() is None
    return {
        "ttfa_ms": 1000 * (run.first_audio_seconds or 0.0), "whole_ms": 1000 * whole,
        "http_ttfb_ms": 1000 * http_first, "http_whole_ms": 1000 * http_whole,
        "rtf": rtf_run.synthesis_seconds / rtf_run.audio_seconds, "cpu_rtf": cpu_rtf / rtf_run.audio_seconds,
        "audio_s": rtf_run.audio_seconds, "cpu_share": share,
    }  # fmt: skip


def round_trip(speech: Speech, name: str, voice: str, transcriber: Transcriber) -> dict[str, Any]:
    lines = [line.strip() for line in SENTENCES.read_text().splitlines() if line.strip()]
    heard, audio_s, stt_s = [], 0.0, 0.0
    for line in lines:
        samples = decode(speech.synthesize(line, voice, name, 1.0, "flac"))
        start = time.perf_counter()
        heard.append(transcriber.transcribe(samples).text)
        stt_s += time.perf_counter() - start
        audio_s += samples.size / 16_000
    return {"wer": word_error_rate(lines, heard), "stt_rtf": stt_s / audio_s, "sentences": len(lines)}


def summarize(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def plot(summary: dict[str, Any], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.2
    bars = [("ttfa_ms", "first audio, in process"), ("http_ttfb_ms", "first byte, HTTP"),
            ("whole_ms", "whole file, in process"), ("http_whole_ms", "whole file, HTTP")]  # fmt: skip
    for i, (key, label) in enumerate(bars):
        values = [summary[n][key]["median"] for n in names]
        left.bar([x + (i - 1.5) * width for x in range(len(names))], values, width, label=label)
    left.set_xticks(range(len(names)), names)
    left.set_ylabel("ms (median)")
    left.set_yscale("log")
    left.set_title("six-sentence paragraph: time to first audio vs whole file")
    left.legend(fontsize=8)
    right.bar(names, [summary[n]["rtf"]["median"] for n in names], color="tab:green")
    for x, n in enumerate(names):
        wer = f"\nWER {summary[n]['wer']:.1%}" if "wer" in summary[n] else ""
        right.annotate(f"{1 / summary[n]['rtf']['median']:.0f}x real time{wer}",
                       (x, summary[n]["rtf"]["median"]), ha="center", va="bottom", fontsize=8)  # fmt: skip
    right.set_ylim(0, 1.3 * max(summary[n]["rtf"]["median"] for n in names))
    right.set_ylabel("real-time factor (lower is faster)")
    right.set_title("24 sentences: synthesis time / audio time")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results")
    parser.add_argument("--no-wer", action="store_true", help="skip the round trip (the slow part)")
    args = parser.parse_args()
    settings = Settings(_env_file=None, audio_cache_max_mb=0)  # type: ignore[call-arg]
    speech = Speech(engines(settings), "hibari")
    names = [n for n in ("hibari", "piper", "espeak-ng") if speech.engines[n].status() is None]
    skipped = {n: speech.engines[n].status() for n in ("piper", "espeak-ng") if n not in names}
    voices = {n: speech.engines[n].default_voice for n in names}
    server = Server(Settings(_env_file=None, audio_cache_max_mb=0, database_url="sqlite://", ui=False))  # type: ignore[call-arg]
    try:
        for n in names:  # warm up: load each engine (and the server's copy) once
            speech.synthesize("Warm up.", voices[n], n)
            http_times(server.url, n, voices[n])
        runs: dict[str, list[dict[str, float]]] = {n: [] for n in names}
        for rep in range(args.reps):
            order = names[rep % len(names) :] + names[: rep % len(names)]
            for n in order:
                runs[n].append(measure(speech, n, voices[n], server.url))
                print(f"rep {rep + 1}/{args.reps} {n}: " + ", ".join(f"{k} {v:.4g}" for k, v in runs[n][-1].items()),
                      flush=True)  # fmt: skip
    finally:
        server.stop()
    summary: dict[str, Any] = {n: {k: summarize([r[k] for r in runs[n]]) for k in runs[n][0]} for n in names}
    if not args.no_wer:
        transcriber = Transcriber()
        for n in names:
            summary[n].update(round_trip(speech, n, voices[n], transcriber))
            print(f"{n}: WER {summary[n]['wer']:.1%}", flush=True)
    load = os.getloadavg()
    rows = [
        ("time to first audio, in process (ms)", "ttfa_ms"), ("whole paragraph, in process (ms)", "whole_ms"),
        ("time to first byte, HTTP stream (ms)", "http_ttfb_ms"), ("whole file, HTTP (ms)", "http_whole_ms"),
        ("real-time factor (24 sentences)", "rtf"), ("CPU seconds per audio second", "cpu_rtf"),
        ("noise check: CPU share", "cpu_share"),
    ]  # fmt: skip
    formats = {"rtf": "{:.4f}", "cpu_rtf": "{:.4f}", "cpu_share": "{:.2f}"}

    def row(label: str, cells: list[str]) -> str:
        return f"| {label} | " + " | ".join(cells) + " |"

    def spread(key: str, n: str) -> str:
        show = formats.get(key, "{:.0f}").format
        return f"{show(summary[n][key]['median'])} ({show(summary[n][key]['min'])}-{show(summary[n][key]['max'])})"

    lines = [row("metric", names), "|---|" + "---|" * len(names)]
    lines += [row(label, [spread(key, n) for n in names]) for label, key in rows]
    lines.append(row("x real time (1 / RTF)", [f"{1 / summary[n]['rtf']['median']:.0f}x" for n in names]))
    if not args.no_wer:
        lines.append(row("round-trip WER (Whisper tiny.en)", [f"{summary[n]['wer']:.1%}" for n in names]))
        lines.append(row("Whisper tiny.en RTF on that audio", [f"{summary[n]['stt_rtf']:.3f}" for n in names]))
    print("\n" + "\n".join(lines))
    print(f"\nmedian (min-max) of {args.reps} interleaved reps; load average {' '.join(f'{x:.2f}' for x in load)}")
    for n, why in skipped.items():
        print(f"skipped {n}: {why}")
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    cpu = next((re.sub(r".*: ", "", line).strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU")  # fmt: skip
    meta = {"date": datetime.now().isoformat(timespec="seconds"), "cpu": cpu, "cores": os.cpu_count(),
            "load_avg": load, "reps": args.reps, "voices": voices, "skipped": skipped}  # fmt: skip
    json_path, png_path = args.out / f"audio-{stamp}.json", args.out / f"audio-{stamp}.png"
    json_path.write_text(json.dumps({"meta": meta, "summary": summary, "runs": runs}, indent=2))
    share = statistics.median(summary[n]["cpu_share"]["median"] for n in names)
    plot(summary, png_path, f"{cpu}, {os.cpu_count()} cores, one engine thread; CPU share {share:.2f}, "
                            f"load average {load[0]:.1f}")  # fmt: skip
    print(f"wrote {json_path} and {png_path}")


if __name__ == "__main__":
    main()
