"""Constrained-decoding benchmark: decode tokens/s with a JSON-schema grammar against without, at batch 1 and 8.

Run `python bench/bench_grammar.py` (the bundled SmolLM2-135M; `--model` for another, `--tokens 256`
`--rounds 5` for a longer run; `--batches 1,8`).

Design choices:
- The engine alone (`BatchGenerator`, no HTTP), the same prompt in every row, greedy, every row generating
  exactly `--tokens` tokens: the grammar run's schema demands a long reply (an array of 10,000 short
  objects), so neither run ends early and both do the same forwards. What differs is the per-row mask:
  llguidance computing the allowed set, and the -inf fill of the masked logits.
- Interleaved rounds (free, constrained, free, ...) with the median per configuration, so a burst of load
  from elsewhere hits both alike. Prefill is excluded: the clock starts after each row's first token.
- The issue's target is at most 15% slower with a grammar; the table prints the slowdown per batch size.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mini_claude.engine import Engine
from mini_claude.generate import BatchGenerator, SamplingParams
from mini_claude.grammar import Grammar

SCHEMA = {
    "type": "array", "minItems": 10000, "maxItems": 10000,  # the array cannot close: no row ends early
    "items": {"type": "object", "additionalProperties": False, "required": ["name", "age", "city"],
              "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0,
                             "maximum": 120}, "city": {"type": "string", "maxLength": 12}}},
}  # fmt: skip
PROMPT = "List some people as JSON, with their name, age and city."


def decode_rate(engine: Engine, batch: int, tokens: int, grammar: Grammar | None) -> float:
    """Decode tokens/s of `batch` rows (all tokens after each row's first, over the wall time after prefill)."""
    prompt = engine.encode_chat([{"role": "user", "content": PROMPT}])
    gen = BatchGenerator(engine.model, batch, engine.tokenizer.stop_ids, masks=engine.grammars.mask)
    params = SamplingParams(max_new_tokens=tokens, temperature=0, ignore_eos=True, grammar=grammar)
    seqs = [gen.new_sequence(prompt, params) for _ in range(batch)]
    gen.admit(seqs)
    while any(not s.output_ids for s in seqs):  # prefill (chunked) until every row has its first token
        gen.step()
    start, first = time.perf_counter(), sum(len(s.output_ids) for s in seqs)
    while gen.running:
        gen.step()
    produced = sum(len(s.output_ids) for s in seqs) - first
    if grammar is not None:  # the schema's long array keeps every constrained row going to its budget
        assert all(len(s.output_ids) == tokens for s in seqs), "a constrained row ended early"
    return produced / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="a .gguf, a model dir or a name (default: the bundled model)")
    ap.add_argument("--tokens", type=int, default=128, help="tokens per row")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    from mini_claude.catalog import resolve_model

    engine = Engine.load(resolve_model(args.model), threads=args.threads)
    grammar = Grammar.json_schema(SCHEMA)
    engine.grammars.check(grammar)
    batches = [int(b) for b in args.batches.split(",")]
    decode_rate(engine, 1, 4, grammar)  # warm-up: kernels, llguidance's tokenizer view
    rates: dict[tuple[int, bool], list[float]] = {(b, g): [] for b in batches for g in (False, True)}
    for _ in range(args.rounds):
        for b in batches:
            for constrained in (False, True):
                rates[(b, constrained)].append(decode_rate(engine, b, args.tokens, grammar if constrained else None))
    print(f"threads {torch.get_num_threads()}, {args.tokens} tokens per row, median of {args.rounds} rounds")
    print(f"{'batch':>5} | {'free tok/s':>10} | {'json-schema tok/s':>17} | {'slowdown':>8}")
    for b in batches:
        free, con = statistics.median(rates[(b, False)]), statistics.median(rates[(b, True)])
        print(f"{b:>5} | {free:>10.1f} | {con:>17.1f} | {100 * (free / con - 1):>7.1f}%")


if __name__ == "__main__":
    main()
