"""One LoRA training step, Mini-Claude against Hugging Face `transformers` + `peft`: step time and peak memory.

Run `python bench/bench_train.py --reps 3` (add `--dtype float32`, `--targets all-linear`, `--threads 1`, ...).
Both sides train the same thing: the bundled SmolLM2-135M-Instruct GGUF dequantized to dense weights, the same
batch of chatterbot conversations (rendered once with the chat template, assistant tokens as the only targets,
right-padded), LoRA with the same rank, alpha and target modules and no dropout, AdamW with the same
learning rate, and, in bf16 mode, bf16 base weights with float32 adapters under `torch.autocast`. A step is
forward, loss, backward, clip, optimizer step: Mini-Claude's `Trainer.train_step()` against the usual
`loss = model(**batch).loss; loss.backward(); clip; opt.step(); opt.zero_grad()` loop.

Design choices (as in `bench_engine.py`):

- One fresh subprocess per (backend, repetition), because peak RSS is a per-process high-water mark. The
  mark is reset after loading (`echo 5 > /proc/self/clear_refs`), so "peak RSS while training" is the most
  memory the process held during the measured steps: weights, activations, gradients and optimizer state.
- Repetitions alternate backends, so a noisy neighbour slows both alike; we report the median and min-max.
- The first-step loss of both is printed: on the same weights and batch they must agree (to rounding), which
  shows the two sides really do the same computation.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

BACKENDS = ("mini-claude", "hf-peft")
WARMUP_STEPS = 2


def vm_hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_hwm() -> None:
    with contextlib.suppress(OSError):  # not Linux, or not allowed: the mark then covers loading too
        Path("/proc/self/clear_refs").write_text("5")


def make_batch(model_path: str, batch_size: int) -> list[dict[str, list[int]]]:
    """The first `batch_size` training examples of the chatterbot set, tokenized once for both backends."""
    from mini_claude.checkpoint import read_gguf
    from mini_claude.tokenizer import Tokenizer
    from mini_claude.train.finetune import load_data

    tokenizer = Tokenizer.from_gguf_metadata(read_gguf(Path(model_path))[0])  # the metadata only, not the weights
    return load_data("chatterbot", tokenizer, 512, 0.1, 0).train[:batch_size]


# ------------------------------------------------------------------------------------------- workers


def worker_mini_claude(args: argparse.Namespace, examples: list[dict[str, list[int]]]) -> dict[str, Any]:
    import torch

    from mini_claude.checkpoint import load_model
    from mini_claude.lora import LoRAConfig, apply_lora
    from mini_claude.train.trainer import TrainConfig, Trainer

    dtype = getattr(torch, args.dtype)
    model, _, _ = load_model(args.model, dtype)
    targets = args.targets if args.targets == "all-linear" else args.targets.split(",")
    apply_lora(model, LoRAConfig(r=args.rank, alpha=2 * args.rank, dropout=0.0, target_modules=targets))
    config = TrainConfig(
        steps=10**6, lr=args.lr, warmup_steps=0, min_lr_ratio=1.0, batch_size=len(examples), precision=args.dtype
    )
    trainer = Trainer(model, examples, [], config, tempfile.mkdtemp(), progress=False)
    return run_steps(args, lambda: trainer.train_step()["loss"])


def worker_hf_peft(args: argparse.Namespace, examples: list[dict[str, list[int]]]) -> dict[str, Any]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from mini_claude.train.data import collate

    dtype = getattr(torch, args.dtype)
    path = Path(args.model)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    targets = args.targets if args.targets == "all-linear" else args.targets.split(",")
    lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules=targets)
    model = get_peft_model(model, lora)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr)
    batch = collate(examples)
    amp = torch.autocast("cpu", dtype=dtype) if dtype != torch.float32 else torch.autocast("cpu", enabled=False)

    def step() -> float:
        with amp:
            loss = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
            ).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    return run_steps(args, step)


def run_steps(args: argparse.Namespace, step: Any) -> dict[str, Any]:
    rss_loaded = vm_hwm_mb()
    reset_hwm()
    losses, times = [], []
    for i in range(WARMUP_STEPS + args.steps):
        start = time.perf_counter()
        loss = step()
        took = time.perf_counter() - start
        losses.append(loss)
        if i >= WARMUP_STEPS:
            times.append(took)
    return {
        "step_s": statistics.median(times),
        "step_times": times,
        "first_loss": losses[0],
        "losses": losses,
        "peak_rss_load_mb": rss_loaded,
        "peak_rss_train_mb": vm_hwm_mb(),
        "load_avg": os.getloadavg()[0],
    }


def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    examples = json.loads(Path(args.batch_file).read_text())
    run = worker_mini_claude if args.worker == "mini-claude" else worker_hf_peft
    print(json.dumps(run(args, examples)))


# -------------------------------------------------------------------------------------------- parent


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, float]]:
    out = {}
    for name, reps in runs.items():
        step = [r["step_s"] for r in reps]
        mem = [r["peak_rss_train_mb"] for r in reps]
        out[name] = {
            "step_s": statistics.median(step),
            "step_s_min": min(step),
            "step_s_max": max(step),
            "peak_rss_train_mb": statistics.median(mem),
            "first_loss": reps[0]["first_loss"],
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3, help="fresh processes per backend")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per process (after 2 warm-up steps)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank; alpha is 2 * rank")
    parser.add_argument("--targets", default="q_proj,v_proj", help="comma-separated module names, or all-linear")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default=None, help="a GGUF file (default: the bundled SmolLM2)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--worker", choices=BACKENDS, help=argparse.SUPPRESS)
    parser.add_argument("--batch-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.model is None:
        from mini_claude.catalog import resolve_model

        args.model = str(resolve_model(None))
    if args.worker:
        worker(args)
        return
    if args.targets != "all-linear":
        args.targets = ",".join(t.strip() for t in args.targets.split(","))

    examples = make_batch(args.model, args.batch_size)
    tokens = sum(len(ex["input_ids"]) for ex in examples)
    batch_file = Path(tempfile.mkdtemp()) / "batch.json"
    batch_file.write_text(json.dumps(examples))
    print(f"batch: {len(examples)} conversations, {tokens} tokens; LoRA r={args.rank} on {args.targets}; {args.dtype}; "
          f"{args.threads} thread(s)")  # fmt: skip
    runs: dict[str, list[dict[str, Any]]] = {b: [] for b in BACKENDS}
    forwarded = ["--steps", str(args.steps), "--rank", str(args.rank), "--targets", args.targets, "--dtype", args.dtype,
                 "--lr", str(args.lr), "--threads", str(args.threads), "--model", args.model]  # fmt: skip
    for rep in range(args.reps):
        order = BACKENDS if rep % 2 == 0 else BACKENDS[::-1]
        for name in order:
            cmd = [sys.executable, __file__, "--worker", name, "--batch-file", str(batch_file), *forwarded]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"{name} worker failed:\n{proc.stderr[-3000:]}")
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            runs[name].append(result)
            print(f"  rep {rep + 1} {name:<12} step {result['step_s']:.2f}s  "
                  f"peak RSS {result['peak_rss_train_mb']:.0f} MB  (load avg {result['load_avg']:.1f})")  # fmt: skip

    summary = summarize(runs)
    ours, peer = summary["mini-claude"], summary["hf-peft"]
    print(f"\n{'':<24}{'mini-claude':>16}{'hf + peft':>16}{'ratio':>10}")
    print(
        f"{'step time (s)':<24}{ours['step_s']:>16.3f}{peer['step_s']:>16.3f}{ours['step_s'] / peer['step_s']:>10.2f}"
    )
    spread = {n: f"{s['step_s_min']:.2f}-{s['step_s_max']:.2f}" for n, s in summary.items()}
    print(f"{'  min-max':<24}{spread['mini-claude']:>16}{spread['hf-peft']:>16}")
    mem_ratio = ours["peak_rss_train_mb"] / peer["peak_rss_train_mb"]
    mems = ours["peak_rss_train_mb"], peer["peak_rss_train_mb"]
    print(f"{'peak RSS training (MB)':<24}{mems[0]:>16.0f}{mems[1]:>16.0f}{mem_ratio:>10.2f}")
    print(f"{'first-step loss':<24}{ours['first_loss']:>16.4f}{peer['first_loss']:>16.4f}")
    print("ratios are mini-claude / hf + peft: below 1 means Mini-Claude is faster or smaller")

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"train-{datetime.now():%Y%m%d-%H%M%S}.json"
    settings = {k: v for k, v in vars(args).items() if k not in ("worker", "batch_file")}
    ratios = {"step_time": ours["step_s"] / peer["step_s"], "peak_rss": mem_ratio}
    path.write_text(json.dumps({"settings": settings, "batch_tokens": tokens, "summary": summary, "ratios": ratios,
                                "runs": runs}, indent=2))  # fmt: skip
    print(f"results written to {path}")


if __name__ == "__main__":
    main()
