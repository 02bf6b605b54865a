"""`mini-claude finetune`: LoRA fine-tuning as one plain function, so its parameters are the command's flags.

Every parameter is a flag and a key of a YAML recipe (`--config configs/lora_default.yaml`, then flags
override it), as in litgpt. The function composes the pieces and owns no training logic of its own:
`load_model` (dense weights: the int4 layers are inference-only), `load_data` (the `train.data` pipeline),
`apply_lora`, and `Trainer`.

What lands in `--out`:

    adapter/            the final adapter in PEFT's format (adapter_config.json + adapter_model.safetensors)
    metrics.jsonl       one JSON object per step (loss, lr, grad norm, tokens/s) and per evaluation
    loss.png            training and validation loss curves
    summary.json        what was trained on what, held-out perplexity before and after, wall time
    checkpoints/        step-NNNNNN/ dirs that `--resume` continues from exactly

Data parallel: start the same command under `torchrun --nproc_per_node N -m mini_claude finetune ...`; each
process takes its share of every global batch (see `trainer.py`). Keep `batch_size x grad_accum x N` equal to
reproduce a one-process run.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist

from mini_claude.train.trainer import TrainConfig, Trainer, TrainingError, latest_checkpoint

Example = dict[str, list[int]]
BUILTIN_DATA = ("chatterbot", "shakespeare")


@dataclass
class DataSplits:
    train: list[Example]
    val: list[Example]
    report: str  # what the pipeline kept and dropped, to show the user


def load_data(
    data: str | Sequence[str],
    tokenizer: Any,
    max_length: int = 512,
    val_fraction: float = 0.1,
    seed: int = 0,
    safety_filter: bool = True,
    augment: Any = None,
) -> DataSplits:
    """Tokenized train/validation examples from data files and bundled data sets, seeded and repeatable.

    `data` names JSON / JSON-lines files of chat or Alpaca records, or bundled sets: `chatterbot[:language]`
    (chatterbot-corpus conversations) and `shakespeare[:play,play,...]` (plain text cut into `max_length`
    windows, every token a target). Records go through `prepare_dataset` (clean, de-duplicate, safety filter,
    chat template, length filter, split); text windows are split with the same seed. The same arguments give
    the same split, which is how `mini-claude eval --split val` finds a fine-tuning run's held-out examples;
    `augment` (a `train.augment.Augmenter`) adds rewritten copies of training records only, so it leaves
    the validation split as it is.
    """
    from mini_claude.train import corpora
    from mini_claude.train import data as D

    specs = [data] if isinstance(data, str) else list(data)
    if not specs:
        raise TrainingError("no data given: pass --data FILE (JSON or JSON lines) or a bundled set (chatterbot)")
    if not 0 <= val_fraction < 1:
        raise TrainingError(f"val_fraction must be in [0, 1), got {val_fraction}")
    files: list[Path] = []
    records: list[D.Record] = []
    windows: list[Example] = []
    for spec in specs:
        path = Path(spec).expanduser()
        name, _, arg = spec.partition(":")
        try:
            if path.is_file():
                files.append(path)
            elif path.exists():
                raise TrainingError(f"{spec} is a directory; give a JSON or JSON-lines file")
            elif name == "chatterbot":
                found = corpora.chatterbot_records(arg or "english")
                if not found:
                    raise TrainingError(f"chatterbot-corpus has no conversations for language {arg!r}")
                records += found
            elif name == "shakespeare":
                windows += corpora.shakespeare_chunks(tokenizer, max_length, arg.split(",") if arg else None)
            else:
                builtin = ", ".join(BUILTIN_DATA)
                raise TrainingError(f"data file not found: {spec} (bundled data sets: {builtin})")
        except FileNotFoundError as exc:  # a bundled set whose package is not installed
            raise TrainingError(str(exc)) from None
    train: list[Example] = []
    val: list[Example] = []
    reports = []
    if files or records:
        prepared = D.prepare_dataset(
            files, tokenizer, records, max_tokens=max_length, val_fraction=val_fraction, seed=seed,
            safety_check="default" if safety_filter else None, augment=augment,
        )  # fmt: skip
        train, val = prepared.train, prepared.val
        reports.append(str(prepared.report))
    if windows:
        t, v = D.train_val_split(windows, val_fraction, seed)
        train, val = train + t, val + v
        reports.append(f"text windows {len(windows)} of {max_length} tokens")
    if not train:
        raise TrainingError("no training examples are left after cleaning and filtering (see the report above)")
    return DataSplits(train, val, "\n".join(reports))


def make_augmenter(method: str, copies: int, seed: int, model: Any = None, tokenizer: Any = None) -> Any:
    """The augmentation stage for `--augment METHOD` (None for "none")."""
    if method == "none":
        return None
    from mini_claude.train.augment import Augmenter, ModelParaphraser, RuleRewriter

    if method not in ("rules", "paraphrase"):
        raise TrainingError(f"unknown augment method {method!r} (choose from none, rules, paraphrase)")
    try:
        rewriter = RuleRewriter(seed) if method == "rules" else ModelParaphraser(model, tokenizer)
        return Augmenter(rewriter, copies, seed=seed)
    except ValueError as exc:
        raise TrainingError(str(exc)) from None


def resolve_precision(dtype: str, device: torch.device) -> str:
    """`auto` is bfloat16 where the hardware multiplies it natively (AMX / AVX512-BF16, or a recent GPU)."""
    if dtype == "auto":
        if device.type == "cuda":
            return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        return "bfloat16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "float32"
    if dtype not in ("float32", "bfloat16", "float16"):
        raise TrainingError(f"unknown dtype {dtype!r} (choose from auto, float32, bfloat16, float16)")
    return dtype


def init_distributed(device: torch.device) -> bool:
    """Join the process group `torchrun` describes in the environment; True if this call created it."""
    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return True


def finetune(
    data: str | list[str] = "chatterbot",
    out: str = "out/finetune",
    model: str | None = None,
    rank: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.05,
    targets: list[str] | str | None = None,
    steps: int = 0,
    epochs: float = 1.0,
    lr: float = 2e-4,
    min_lr_ratio: float = 0.1,
    batch_size: int = 8,
    grad_accum: int = 1,
    warmup_steps: int = 10,
    weight_decay: float = 0.0,
    max_grad_norm: float = 1.0,
    eval_every: int = 50,
    save_every: int = 100,
    max_length: int = 512,
    val_fraction: float = 0.1,
    seed: int = 0,
    resume: bool = False,
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto",
    device: str | None = None,
    threads: int | None = None,
    skip_safety_filter: bool = False,
    augment: Literal["none", "rules", "paraphrase"] = "none",
    augment_copies: int = 1,
    quiet: bool = False,
) -> dict[str, Any]:
    """Fine-tune a model with LoRA on chat data; writes the adapter, metrics, loss curve and checkpoints to OUT.

    Args:
        data: JSON / JSON-lines files of chat ({"messages": [...]}) or Alpaca records, or a bundled set:
            chatterbot[:language], shakespeare[:play,...].
        out: output directory (adapter/, metrics.jsonl, loss.png, summary.json, checkpoints/).
        model: a .gguf file, a model dir, or a name from `mini-claude models` (default: the bundled SmolLM2).
        rank: LoRA rank r.
        alpha: LoRA alpha; updates are scaled by alpha / rank.
        dropout: dropout on the LoRA input.
        targets: module names to adapt (default q_proj, v_proj), a regular expression, or all-linear.
        steps: optimizer steps; 0 trains for --epochs instead.
        epochs: passes over the training examples when --steps is 0.
        lr: peak learning rate.
        min_lr_ratio: the cosine schedule ends at lr * min_lr_ratio.
        batch_size: examples per micro-batch (per process).
        grad_accum: micro-batches per optimizer step.
        warmup_steps: steps of linear warmup from 0 to lr.
        weight_decay: AdamW weight decay.
        max_grad_norm: clip the gradient norm to this (0: no clipping).
        eval_every: evaluate held-out loss and perplexity every this many steps (0: at the start and end only).
        save_every: write a checkpoint every this many steps (0: at the end only).
        max_length: drop examples longer than this many tokens (text windows have this length).
        val_fraction: share of the examples held out for validation.
        seed: seeds the split, the data order and the adapter initialisation.
        resume: continue the run in OUT from its latest checkpoint.
        dtype: compute dtype; auto is bfloat16 where the hardware supports it (adapters and optimizer stay float32).
        device: cpu or cuda (default: cuda if available).
        threads: CPU threads for the matrix kernels.
        skip_safety_filter: keep records the safety classifier flags as harmful.
        augment: add rewritten copies of the training records' user turns: rules (contractions, synonyms,
            lead-ins, casual typing) or paraphrase (written by the loaded model, slower); none by default.
            Validation examples are never augmented, and no copy equal or near to one is added.
        augment_copies: rewritten copies per training record.
        quiet: no progress bar or report.
    """
    from mini_claude.catalog import resolve_model
    from mini_claude.checkpoint import load_model
    from mini_claude.lora import LoRAConfig, apply_lora, save_adapter
    from mini_claude.lora_report import parameter_report

    started = time.perf_counter()
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    precision = resolve_precision(dtype, dev)
    config = TrainConfig(
        steps=steps, epochs=epochs, lr=lr, min_lr_ratio=min_lr_ratio, warmup_steps=warmup_steps,
        weight_decay=weight_decay, max_grad_norm=max_grad_norm, batch_size=batch_size, grad_accum=grad_accum,
        eval_every=eval_every, save_every=save_every, seed=seed, precision=precision,  # type: ignore[arg-type]
    )  # fmt: skip
    try:
        lora_config = LoRAConfig(r=rank, alpha=alpha, dropout=dropout, target_modules=targets or ["q_proj", "v_proj"])
    except ValueError as exc:
        raise TrainingError(str(exc)) from None
    out_dir = Path(out).expanduser()
    checkpoint = latest_checkpoint(out_dir)
    if resume and checkpoint is None:
        raise TrainingError(f"nothing to resume: {out_dir / 'checkpoints'} holds no checkpoint")
    if not resume and checkpoint is not None:
        raise TrainingError(f"{out_dir} already holds a run; pass --resume to continue it, or choose another --out")
    if threads:
        torch.set_num_threads(threads)

    own_group = init_distributed(dev)
    try:
        is_main = not dist.is_initialized() or dist.get_rank() == 0
        say: Callable[[str], None] = print if is_main and not quiet else lambda _: None
        torch.manual_seed(seed)
        path = resolve_model(model)
        net, tokenizer, name = load_model(path, torch.float32 if precision == "float32" else getattr(torch, precision))
        net.to(dev)
        augmenter = make_augmenter(augment, augment_copies, seed, net, tokenizer)
        splits = load_data(data, tokenizer, max_length, val_fraction, seed, not skip_safety_filter, augmenter)
        say(splits.report)
        try:
            apply_lora(net, lora_config)
        except ValueError as exc:
            raise TrainingError(str(exc)) from None
        say(str(parameter_report(net)).splitlines()[-2])
        trainer = Trainer(
            net, splits.train, splits.val, config, out_dir, pad_id=tokenizer.eos_id or 0,
            base_model_name=str(path), progress=not quiet, log=say,
        )  # fmt: skip
        if checkpoint is not None:
            trainer.load_checkpoint(checkpoint)
            say(f"resuming from {checkpoint} (step {trainer.step} of {trainer.total_steps})")
        say(
            f"training {name}: {len(splits.train)} examples, {len(splits.val)} held out; {trainer.total_steps} steps "
            f"of {trainer.global_batch} examples on {trainer.world} process(es), {precision} compute"
        )
        history = trainer.fit()
        summary = _summary(history, trainer, str(path), data, out_dir, time.perf_counter() - started)
        if is_main:
            save_adapter(net, out_dir / "adapter", base_model_name=str(path))
            (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            split = (("val_fraction", val_fraction, 0.1), ("seed", seed, 0), ("max_length", max_length, 512))
            split_flags = [f"--{k} {v}" for k, v, default in split if v != default]
            split_flags += ["--skip_safety_filter"] if skip_safety_filter else []
            say(_summary_text(summary, model, data, split_flags))
        return summary
    finally:
        if own_group:
            dist.destroy_process_group()


def _summary(
    history: list[dict[str, Any]], trainer: Trainer, model: str, data: Any, out_dir: Path, wall: float
) -> dict[str, Any]:
    evals = [r for r in history if "val_ppl" in r]
    train = [r for r in history if "loss" in r]
    before = next((r["val_ppl"] for r in evals if r["step"] == 0), None)
    after = evals[-1]["val_ppl"] if evals else None
    return {
        "model": model,
        "data": data,
        "adapter": str(out_dir / "adapter"),
        "steps": trainer.step,
        "global_batch": trainer.global_batch,
        "processes": trainer.world,
        "train_examples": len(trainer.train_data),
        "val_examples": len(trainer.val_data),
        "train_loss_first": train[0]["loss"] if train else None,
        "train_loss_last": train[-1]["loss"] if train else None,
        "val_ppl_before": before,
        "val_ppl_after": after,
        "val_ppl_change": (after / before - 1) if before and after else None,
        "train_time_s": trainer.elapsed,
        "wall_time_s": wall,
        "tokens_trained": sum(r["tokens"] for r in train),
        "config": trainer.config.__dict__,
    }


def _summary_text(summary: dict[str, Any], model: str | None, data: Any, split_flags: list[str]) -> str:
    lines = [f"adapter written to {summary['adapter']}"]
    if summary["val_ppl_before"] is not None and summary["val_ppl_after"] is not None:
        lines.append(
            f"held-out perplexity {summary['val_ppl_before']:.2f} -> {summary['val_ppl_after']:.2f} "
            f"({100 * summary['val_ppl_change']:+.1f}%)"
        )
    lines.append(f"wall time {summary['wall_time_s']:.0f}s (training {summary['train_time_s']:.0f}s)")
    specs = f"'[{','.join(data)}]'" if isinstance(data, list) else data
    flags = [f"--model {model}"] if model else []
    flags += [f"--adapter {summary['adapter']}", f"--data {specs}", "--split val", *split_flags, "--compare"]
    lines.append(f"compare with the base model on the held-out split:\n  mini-claude eval {' '.join(flags)}")
    return "\n".join(lines)
