"""Sampling and the token loop: prefill, then cached decode, for one sequence or many at once.

The engine speaks token ids only; text (detokenization, stop strings) is the caller's layer (`engine.py`).

`BatchGenerator` is the one loop everything uses. It owns a KV cache with `n_slots` rows; each sequence
takes a free slot. `add()` prefills any number of new prompts of different lengths in a single forward
(right-padded: a row's padding sits at positions no real token of that row will ever look at), and
`step()` decodes one token for every running sequence in a single forward. Sequences finish on their own
(end-of-sequence id, token budget, context window, or `cancel()`), free their slot, and new ones may join
between steps, which is what a server needs for continuous batching.

Sampling is per sequence with its own seeded `torch.Generator`, so a seed gives the same text whether the
sequence runs alone or in a batch.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from mini_claude.model import Transformer

if TYPE_CHECKING:
    from mini_claude.adapters import AdapterSet


class ContextOverflowError(ValueError):
    """A prompt that does not fit in the model's context window."""

    def __init__(self, n_tokens: int, limit: int) -> None:
        self.n_tokens, self.limit = n_tokens, limit
        super().__init__(
            f"the prompt has {n_tokens} tokens but the context window holds {limit} "
            f"(including at least one generated token)"
        )


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token. `temperature=0` is greedy decoding."""

    max_new_tokens: int = 256
    temperature: float = 0.7
    top_k: int | None = None  # keep only the k most likely tokens
    top_p: float = 1.0  # nucleus: keep the smallest set whose probability reaches p
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the prompt or reply (CTRL, 2019)
    seed: int | None = None
    # Never end on end-of-sequence: its logit is masked, so exactly max_new_tokens come out (benchmarks,
    # like transformers' min_new_tokens).
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        checks = [
            (self.max_new_tokens >= 1, "max_new_tokens must be at least 1"),
            (0.0 <= self.temperature <= 100.0, "temperature must be between 0 and 100"),
            (self.top_k is None or self.top_k >= 1, "top_k must be at least 1"),
            (0.0 < self.top_p <= 1.0, "top_p must be in (0, 1]"),
            (0.0 < self.repetition_penalty <= 10.0, "repetition_penalty must be in (0, 10]"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


def process_logits(logits: Tensor, params: SamplingParams, history: Tensor | None = None) -> Tensor:
    """Apply repetition penalty, temperature, top-k and top-p to one row of logits (V,); returns float32."""
    logits = logits.float()
    if params.repetition_penalty != 1.0 and history is not None and history.numel():
        seen = logits[history]
        logits = logits.scatter(
            0,
            history,
            torch.where(seen > 0, seen / params.repetition_penalty, seen * params.repetition_penalty),
        )
    if params.temperature == 0:
        return logits
    logits = logits / params.temperature
    if params.top_k is not None and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= params.top_p  # tokens after the set already reached top_p
        drop[0] = False  # the most likely token always stays, however small top_p is
        logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    return logits


def sample(logits: Tensor, params: SamplingParams, generator: torch.Generator, history: Tensor | None = None) -> int:
    """Pick the next token id from one row of logits (V,)."""
    processed = process_logits(logits, params, history)
    if params.temperature == 0:
        return int(processed.argmax())
    return int(torch.multinomial(processed.softmax(-1), 1, generator=generator))


@dataclass
class SequenceState:
    """One prompt being continued: its slot in the cache, what it produced, and why it stopped."""

    prompt_ids: list[int]
    params: SamplingParams
    stop_ids: frozenset[int]
    adapter: str | None = None  # a LoRA adapter of the generator's AdapterSet; None: the base model
    slot: int = -1
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (end of sequence or stop string), "length", "cancelled"
    generator: torch.Generator = field(default_factory=torch.Generator)

    @property
    def position(self) -> int:
        """Position the last sampled token will occupy when fed back."""
        return len(self.prompt_ids) + len(self.output_ids) - 1

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class TokenEvent:
    """One sampled token of one sequence; `finish_reason` is set on a sequence's last event."""

    seq: SequenceState
    token_id: int | None  # None when a sequence ends without a new token (e.g. cancelled)
    finish_reason: str | None


class BatchGenerator:
    """Runs many sequences through one model with one KV cache; see the module docstring."""

    def __init__(
        self, model: Transformer, n_slots: int = 1, stop_ids: Iterable[int] = (), adapters: AdapterSet | None = None
    ) -> None:
        self.model = model
        self.adapters = adapters
        self.max_seq_len = model.config.max_seq_len
        self.cache = model.new_cache(n_slots)
        self.free_slots = list(range(n_slots))
        self.running: list[SequenceState] = []
        self.stop_ids = frozenset(stop_ids)

    @property
    def n_free(self) -> int:
        return len(self.free_slots)

    def new_sequence(
        self, prompt_ids: Sequence[int], params: SamplingParams, adapter: str | None = None
    ) -> SequenceState:
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if len(prompt_ids) >= self.max_seq_len:
            raise ContextOverflowError(len(prompt_ids), self.max_seq_len)
        if adapter is not None:
            if self.adapters is None:
                raise ValueError(f"adapter {adapter!r} requested, but this generator has no adapters")
            self.adapters.check(adapter)
        stop_ids = frozenset() if params.ignore_eos else self.stop_ids
        seq = SequenceState(list(prompt_ids), params, stop_ids, adapter)
        seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        seq.generator.manual_seed(seed)
        return seq

    @torch.inference_mode()
    def add(self, seqs: Sequence[SequenceState]) -> list[TokenEvent]:
        """Prefill new sequences together and sample each one's first token."""
        if len(seqs) > self.n_free:
            raise RuntimeError(f"{len(seqs)} sequences but only {self.n_free} free slots")
        if not seqs:
            return []
        lengths = [len(s.prompt_ids) for s in seqs]
        longest = max(lengths)
        device = self.model.embed_tokens.weight.device
        idx = torch.zeros(len(seqs), longest, dtype=torch.long)
        for row, s in enumerate(seqs):
            idx[row, : len(s.prompt_ids)] = torch.tensor(s.prompt_ids)
            s.slot = self.free_slots.pop(0)
        slots = torch.tensor([s.slot for s in seqs])
        contiguous = slots.tolist() == list(range(len(seqs)))
        positions = torch.arange(longest).expand(len(seqs), longest)
        with self._routed(seqs):
            logits = self.model(
                idx.to(device),
                positions=None if contiguous and len(seqs) == 1 else positions.to(device),
                cache=self.cache,
                slots=None if contiguous else slots.to(device),
                logits_at=torch.tensor(lengths, device=device) - 1,
            )[:, 0]  # (B, V)
        self.running.extend(seqs)
        return [self._accept(s, logits[row]) for row, s in enumerate(seqs)]

    @torch.inference_mode()
    def step(self) -> list[TokenEvent]:
        """Feed every running sequence its last token and sample the next: one forward for all of them."""
        if not self.running:
            return []
        seqs = list(self.running)
        device = self.model.embed_tokens.weight.device
        idx = torch.tensor([[s.output_ids[-1]] for s in seqs], device=device)
        positions = torch.tensor([[s.position] for s in seqs], device=device)
        slots = [s.slot for s in seqs]
        contiguous = slots == list(range(len(seqs)))
        with self._routed(seqs):
            logits = self.model(
                idx,
                positions=positions,
                cache=self.cache,
                slots=None if contiguous else torch.tensor(slots, device=device),
            )[:, -1]  # (B, V)
        return [self._accept(s, logits[row]) for row, s in enumerate(seqs)]

    def _routed(self, seqs: Sequence[SequenceState]) -> contextlib.AbstractContextManager[None]:
        """Each row of the next forward uses its own sequence's adapter."""
        if self.adapters is None or not len(self.adapters):
            return contextlib.nullcontext()
        return self.adapters.route([s.adapter for s in seqs])

    def _accept(self, seq: SequenceState, logits: Tensor) -> TokenEvent:
        if seq.params.ignore_eos and self.stop_ids:
            logits = logits.index_fill(0, torch.tensor(sorted(self.stop_ids), device=logits.device), float("-inf"))
        history = None
        if seq.params.repetition_penalty != 1.0:
            history = torch.tensor(seq.prompt_ids + seq.output_ids, device=logits.device)
        token = sample(logits, seq.params, seq.generator, history)
        seq.output_ids.append(token)
        if token in seq.stop_ids:
            self.finish(seq, "stop")
        elif len(seq.output_ids) >= seq.params.max_new_tokens or seq.position >= self.max_seq_len:
            self.finish(seq, "length")  # budget spent, or no room left to feed this token back
        return TokenEvent(seq, token, seq.finish_reason)

    def finish(self, seq: SequenceState, reason: str) -> None:
        """End a sequence (also from outside, e.g. a stop string or a disconnected client) and free its slot."""
        if seq.finish_reason is None:
            seq.finish_reason = reason
        if seq in self.running:
            self.running.remove(seq)
            self.free_slots.append(seq.slot)
            self.free_slots.sort()


def generate_tokens(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
    stop_ids: Iterable[int] = (),
) -> Iterator[tuple[int, int, str | None]]:
    """Yield (prompt index, token id, finish reason or None) as each sequence advances; all in one batch."""
    per_prompt = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
    gen = BatchGenerator(model, n_slots=len(prompts), stop_ids=stop_ids)
    seqs = [gen.new_sequence(p, sp) for p, sp in zip(prompts, per_prompt, strict=True)]
    index = {id(s): i for i, s in enumerate(seqs)}
    events = gen.add(seqs)
    while events:
        for ev in events:
            yield index[id(ev.seq)], ev.token_id, ev.finish_reason  # type: ignore[misc]
        events = gen.step()
