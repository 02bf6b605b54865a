"""What serving a LoRA adapter costs: decode speed with and without one, Mini-Claude against `transformers` + `peft`.

Run `python bench/bench_adapters.py --reps 3` (`--adapter DIR` for a trained adapter; by default a random
rank-8 adapter on all seven projections of every block, the shape of `configs/lora_default.yaml`).

Backends, each in fresh processes (as in `bench_engine.py`), greedy decoding of `--new-tokens` tokens after a
short chat prompt, end of sequence ignored so every run decodes the same number of tokens:

- `mc-base` / `mc-adapter`: the bundled model as `mini-claude serve` runs it (int4 weights), without and with
  the adapter (added per row by `adapters.py`, never merged).
- `mc-mixed4`: four sequences decoded together, two with the adapter and two without (the server's case when
  clients ask for different models), against `mc-base4`, four plain ones.
- `hf-base` / `hf-peft`: `transformers` on the same GGUF (float32, eager) without and with
  `peft.PeftModel.from_pretrained(...)`, unmerged, which is how PEFT serves an adapter it may switch off.

The report gives each backend's decode tokens/s and the ratios that matter: what the adapter costs each
engine (adapter / base) and Mini-Claude with an adapter against PEFT with the same adapter.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

BACKENDS = ("mc-base", "mc-adapter", "mc-base4", "mc-mixed4", "hf-base", "hf-peft")
PROMPT = [{"role": "user", "content": "Tell me about the history of the bicycle."}]


def make_random_adapter(model: str, out: Path, rank: int) -> Path:
    """A random (B non-zero) adapter on every projection: the recipe's shape, for timing only."""
    import torch

    from mini_claude.checkpoint import load_model
    from mini_claude.lora import LoRAConfig, apply_lora, save_adapter

    net, _, _ = load_model(model, torch.float32, quantize="none")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    apply_lora(net, LoRAConfig(r=rank, alpha=2 * rank, target_modules=targets, init_lora_weights=False))
    return save_adapter(net, out, base_model_name=model)


def worker(name: str, model: str, adapter: str, new_tokens: int) -> dict[str, Any]:
    import torch

    from mini_claude.engine import Engine
    from mini_claude.generate import SamplingParams

    greedy = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    if name.startswith("mc-"):
        engine = Engine.load(model)
        if name in ("mc-adapter", "mc-mixed4"):
            engine.load_adapter(adapter, "tuned")
        ids = engine.encode_chat(PROMPT)
        rows = {"mc-base": [None], "mc-adapter": ["tuned"], "mc-base4": [None] * 4,
                "mc-mixed4": ["tuned", None, "tuned", None]}[name]  # fmt: skip

        def run() -> tuple[float, int]:
            from mini_claude.generate import BatchGenerator

            gen = BatchGenerator(engine.model, len(rows), engine.tokenizer.stop_ids, engine.adapters)
            gen.add([gen.new_sequence(ids, greedy, a) for a in rows])  # prefill + first tokens: not timed
            start, steps = time.perf_counter(), 0
            while gen.running:
                gen.step()
                steps += 1
            return time.perf_counter() - start, steps * len(rows)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(model)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
        if name == "hf-peft":
            from peft import PeftModel

            hf = PeftModel.from_pretrained(hf, adapter).eval()
        ids = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, return_dict=True, return_tensors="pt")[
            "input_ids"
        ]

        @torch.inference_mode()
        def run() -> tuple[float, int]:
            first = time.perf_counter()
            hf.generate(ids, max_new_tokens=1, do_sample=False)
            prefill = time.perf_counter() - first  # subtract the prompt and first token, as for mc-*
            start = time.perf_counter()
            hf.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            return time.perf_counter() - start - prefill, new_tokens - 1

    run()  # warm-up: first-call allocations, kernel selection
    seconds, tokens = run()
    return {"backend": name, "decode_tokens_per_s": tokens / seconds, "tokens": tokens, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3, help="fresh processes per backend")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--adapter", help="a PEFT-format adapter dir (default: a random rank-8 one)")
    parser.add_argument("--rank", type=int, default=8, help="rank of the random adapter")
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default=None, help="a GGUF file (default: the bundled SmolLM2)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(worker(args.worker, args.model, args.adapter, args.new_tokens)))
        return
    from mini_claude.catalog import bundled_model_path

    model = args.model or str(bundled_model_path())
    backends = args.backends.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        adapter = args.adapter or str(make_random_adapter(model, Path(tmp) / "adapter", args.rank))
        runs: dict[str, list[float]] = {b: [] for b in backends}
        for rep in range(args.reps):
            for name in backends if rep % 2 == 0 else reversed(backends):  # alternate: noise hits all alike
                command = [sys.executable, __file__, "--worker", name, "--model", model, "--adapter", adapter,
                           "--new-tokens", str(args.new_tokens), "--threads", str(args.threads)]  # fmt: skip
                done = subprocess.run(command, capture_output=True, text=True, check=True)
                result = json.loads(done.stdout.strip().splitlines()[-1])
                runs[name].append(result["decode_tokens_per_s"])
                print(f"rep {rep + 1} {name:>10}: {result['decode_tokens_per_s']:6.1f} tok/s", flush=True)
    median = {name: statistics.median(v) for name, v in runs.items() if v}
    print(f"\ndecode tokens/s, median of {args.reps} (min-max), {args.new_tokens} new tokens, {args.threads} threads")
    for name, values in runs.items():
        print(f"  {name:>10}: {median[name]:6.1f} ({min(values):.1f}-{max(values):.1f})")
    ratios = {
        "mini-claude adapter / base": ("mc-adapter", "mc-base"),
        "mini-claude mixed batch of 4 / plain batch of 4": ("mc-mixed4", "mc-base4"),
        "hf+peft adapter / hf base": ("hf-peft", "hf-base"),
        "mini-claude adapter / hf+peft adapter": ("mc-adapter", "hf-peft"),
    }
    report = {label: median[a] / median[b] for label, (a, b) in ratios.items() if a in median and b in median}
    print("\nratios (above 1: faster)")
    for label, value in report.items():
        print(f"  {label}: {value:.2f}x")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"adapters-{datetime.now():%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps({"runs": runs, "median": median, "ratios": report, "args": vars(args)}, indent=2))
    print(f"\nwritten to {path}")


if __name__ == "__main__":
    main()
