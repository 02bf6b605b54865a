"""Sampling and the token loop: prefill, then cached decode, for one sequence or many at once.

The engine speaks token ids only; text (detokenization, stop strings) is the caller's layer (`engine.py`).

`BatchGenerator` is the one loop everything uses. Its KV cache is paged (`kv_cache.py`): each sequence
takes a free slot and blocks as it grows, starts from the longest cached prefix of its prompt (the prefix
cache), and gives its blocks back when it ends. `step()` runs one forward for every running sequence: the
last sampled token of each decoding one and the next chunk of each prompt still to be prefilled, every token
a row of its own (nothing padded), as llama-server mixes prompt tokens into its decode batches. Sequences
finish on their own (end-of-sequence id, token budget, context window, `cancel()`, or an error of their own:
a failing sampler, NaN logits, a removed adapter, which ends that sequence alone) and new ones join between
steps, which is what a server needs for continuous batching.

Sampling is per sequence with its own seeded `torch.Generator`, so a seed gives the same text whether the
sequence runs alone or in a batch. The per-row sampling step (`_accept`) is also where a sequence's grammar
mask is applied (`grammar.py`: each row its own state, rows without a grammar untouched) and where its
log-probabilities are read: from the model's raw logits, before penalties, temperature or the mask, which is
what OpenAI's and vLLM's `logprobs` report.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from mini_claude.kv_cache import BLOCK_SIZE, PagedKVCache
from mini_claude.model import Transformer, fast_ops

if TYPE_CHECKING:
    from mini_claude.adapters import AdapterSet
    from mini_claude.grammar import Grammar, TokenMask


MAX_TOP_LOGPROBS = 20  # OpenAI's limit
PREFILL_CHUNK = 512  # prompt tokens per step at most: a long prompt never stalls the running sequences for long


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
    grammar: Grammar | None = None  # constrain the output (a JSON schema, Lark, a regex): see grammar.py
    logprobs: bool = False  # report each sampled token's log-probability
    top_logprobs: int = 0  # ... and the most likely alternatives at each position (at most 20)

    def __post_init__(self) -> None:
        checks = [
            (self.max_new_tokens >= 1, "max_new_tokens must be at least 1"),
            (0.0 <= self.temperature <= 100.0, "temperature must be between 0 and 100"),
            (self.top_k is None or self.top_k >= 1, "top_k must be at least 1"),
            (0.0 < self.top_p <= 1.0, "top_p must be in (0, 1]"),
            (0.0 < self.repetition_penalty <= 10.0, "repetition_penalty must be in (0, 10]"),
            (0 <= self.top_logprobs <= MAX_TOP_LOGPROBS, f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}"),
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


def row_argmax(logits: Tensor) -> tuple[Tensor, Tensor]:
    """Each row's maximum and the first index of it, NaN counting as the greatest (torch.argmax's rule).

    Our kernel where it runs: torch's own reductions over a 49k vocabulary cost 50-70 us a call here (each
    wakes its OpenMP threads; its argmax is not vectorized), and greedy decoding made two a token, ~2% of a
    step of the bundled model.
    """
    ops = fast_ops()
    if ops is not None and logits.dim() == 2 and logits.dtype == torch.float32 and logits.shape[1] > 0:
        return ops.row_argmax(logits)
    return logits.max(-1).values, logits.argmax(-1)


def sample(logits: Tensor, params: SamplingParams, generator: torch.Generator, history: Tensor | None = None) -> int:
    """Pick the next token id from one row of logits (V,)."""
    processed = process_logits(logits, params, history)
    if params.temperature == 0:
        return int(row_argmax(processed[None])[1][0])
    return int(torch.multinomial(processed.softmax(-1), 1, generator=generator))


LogitsHook = Callable[["SequenceState", Tensor], Tensor]
MaskFactory = Callable[["Grammar"], "TokenMask"]


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability at its position, and the `top` most likely tokens there (id, logprob)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def token_logprobs(logits: Tensor, token_ids: Tensor, top: int) -> list[TokenLogprob]:
    """log_softmax of each row of logits (N, V) in float32, read at `token_ids` (N,), with the `top` best."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(-1, token_ids[:, None])[:, 0].tolist()
    best_v, best_i = torch.topk(logp, top, dim=-1) if top else (logp[:, :0], logp[:, :0].long())
    return [
        TokenLogprob(int(t), lp, tuple(zip(bi, bv, strict=True)))
        for t, lp, bi, bv in zip(token_ids.tolist(), chosen, best_i.tolist(), best_v.tolist(), strict=True)
    ]


@dataclass
class SequenceState:
    """One prompt being continued: its slot in the cache, what it produced, and why it stopped."""

    prompt_ids: list[int]
    params: SamplingParams
    stop_ids: frozenset[int]
    adapter: str | None = None  # a LoRA adapter of the generator's AdapterSet; None: the base model
    slot: int = -1
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (end of sequence or stop string), "length", "cancelled", "error"
    error: str | None = None  # why, when finish_reason is "error"
    generator: torch.Generator = field(default_factory=torch.Generator)
    # A per-sequence step of sampling: it gets this row's raw logits (V,) and returns the logits to sample from
    # (a grammar's mask, logprobs). An exception in it ends this sequence alone with an error.
    logits_hook: LogitsHook | None = None
    mask: TokenMask | None = None  # the grammar's state, when `params.grammar` is set
    n_computed: int = 0  # tokens whose keys and values are in the cache
    n_cached: int = 0  # of the prompt, tokens reused from the prefix cache
    namespace: bytes = b""  # what the prefix cache keys this sequence's blocks by (its adapter)

    @property
    def position(self) -> int:
        """Position the last sampled token will occupy when fed back."""
        return len(self.prompt_ids) + len(self.output_ids) - 1

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def prefilling(self) -> bool:
        """Whether some of the prompt still has to go through the model."""
        return self.n_computed < len(self.prompt_ids)

    def tokens(self) -> list[int]:
        return self.prompt_ids + self.output_ids


@dataclass
class TokenEvent:
    """One sampled token of one sequence; `finish_reason` is set on a sequence's last event."""

    seq: SequenceState
    token_id: int | None  # None when a sequence ends without a new token (cancelled, failed)
    finish_reason: str | None
    logprob: TokenLogprob | None = None  # with `params.logprobs`


class GenerationError(RuntimeError):
    """A sequence failed (its sampler raised, its logits were NaN, its adapter went away)."""


class BatchGenerator:
    """Runs many sequences through one model with one paged KV cache; see the module docstring."""

    def __init__(
        self,
        model: Transformer,
        n_slots: int = 1,
        stop_ids: Iterable[int] = (),
        adapters: AdapterSet | None = None,
        prefix_cache_tokens: int = 0,
        prefill_chunk: int = PREFILL_CHUNK,
        block_size: int = BLOCK_SIZE,
        masks: MaskFactory | None = None,
    ) -> None:
        """`masks` compiles a sequence's `params.grammar` into its token mask (`GrammarCompiler.mask`: it
        knows the tokenizer, which this loop does not)."""
        self.model = model
        self.masks = masks
        self.adapters = adapters
        self.max_seq_len = model.config.max_seq_len
        p = model.embed_tokens.weight
        dtype = p.dtype if p.is_floating_point() else torch.float32
        self.cache = PagedKVCache(
            model.config, n_slots, dtype, p.device, block_size, prefix_cache_blocks=prefix_cache_tokens // block_size
        )
        self.prefill_chunk = prefill_chunk
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
        namespace = b""
        if adapter is not None:
            if self.adapters is None:
                raise ValueError(f"adapter {adapter!r} requested, but this generator has no adapters")
            self.adapters.check(adapter)
            namespace = self.adapters.uid(adapter).to_bytes(8, "little")
        stop_ids = frozenset() if params.ignore_eos else self.stop_ids
        seq = SequenceState(list(prompt_ids), params, stop_ids, adapter, namespace=namespace)
        if params.grammar is not None:
            if self.masks is None:
                raise ValueError("a grammar was given, but this generator compiles no grammars")
            seq.mask = self.masks(params.grammar)
        seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        seq.generator.manual_seed(seed)
        return seq

    def admit(self, seqs: Sequence[SequenceState]) -> None:
        """Give new sequences a slot and their cached prefix; their prompts go through the next steps."""
        if len(seqs) > self.n_free:
            raise RuntimeError(f"{len(seqs)} sequences but only {self.n_free} free slots")
        for s in seqs:
            s.slot = self.free_slots.pop(0)
            s.n_cached = s.n_computed = self.cache.start(s.slot, s.prompt_ids, s.namespace)
            self.running.append(s)

    def add(self, seqs: Sequence[SequenceState]) -> list[TokenEvent]:
        """Admit new sequences and run one step (which prefills them, and advances the running ones)."""
        self.admit(seqs)
        return self.step()

    @torch.inference_mode()
    def step(self) -> list[TokenEvent]:
        """One forward for every running sequence: the last token of each decoding one, and the next chunk of
        each prompt still being prefilled (up to `prefill_chunk` prompt tokens in all, oldest first). Every
        token is a row of its own, so nothing is padded; a sequence gets a token when its row is the end of
        what it has to feed."""
        events = [self._fail(s, "its adapter was removed") for s in self._without_adapter()]
        budget = self.prefill_chunk
        feed: list[tuple[SequenceState, int]] = []  # (sequence, tokens fed this step)
        for s in self.running:
            if s.prefilling:
                n = min(len(s.prompt_ids) - s.n_computed, budget)
                if n <= 0:
                    continue
                budget -= n
            else:
                n = 1
            feed.append((s, n))
        if not feed:
            return events
        idx, positions, slots, wanted = [], [], [], []
        for s, n in feed:
            self.cache.extend(s.slot, s.n_computed + n)
            tokens = s.tokens()
            idx += tokens[s.n_computed : s.n_computed + n]
            positions += range(s.n_computed, s.n_computed + n)
            slots += [s.slot] * n
            if s.n_computed + n == len(tokens):  # the end of what it has: its next token is sampled now
                wanted.append(len(idx) - 1)
        device = self.model.embed_tokens.weight.device
        rows = torch.tensor(wanted, dtype=torch.long, device=device)
        try:
            with self._routed([s.adapter for s, n in feed for _ in range(n)], rows):
                logits = self.model(
                    torch.tensor(idx, device=device)[:, None],
                    positions=torch.tensor(positions, device=device)[:, None],
                    cache=self.cache,
                    slots=torch.tensor(slots, device=device),
                    logits_rows=rows,
                )[:, -1]  # (K, V)
        except ValueError:  # an adapter was removed after the check above (AdapterError): fail its rows, retry
            if not self._without_adapter():
                raise
            return events + self.step()
        sampled = []
        for s, n in feed:
            s.n_computed += n
            self.cache.commit(s.slot, s.tokens(), s.n_computed, s.namespace)
            if not s.prefilling:
                sampled.append(s)
        # One check for the batch (max propagates NaN: one pass, no mask); a NaN row fails its sequence alone.
        bad = row_argmax(logits)[0].isnan().tolist()
        for row, s in enumerate(sampled):
            events.append(self._fail(s, "the model produced NaN logits") if bad[row] else self._accept(s, logits[row]))
        return events

    def _without_adapter(self) -> list[SequenceState]:
        """Running sequences whose adapter is no longer loaded (removed while they ran)."""
        if self.adapters is None:
            return []
        return [s for s in self.running if s.adapter is not None and s.adapter not in self.adapters]

    def _routed(self, adapters: Sequence[str | None], rows: Tensor) -> contextlib.AbstractContextManager[None]:
        """Each row of the next forward uses its own sequence's adapter."""
        if self.adapters is None or not len(self.adapters):
            return contextlib.nullcontext()
        return self.adapters.route(adapters, rows)

    def _accept(self, seq: SequenceState, raw: Tensor) -> TokenEvent:
        """Sample one row's next token: end-of-sequence ban, hook, grammar mask, sampling, log-probabilities."""
        params, logprob = seq.params, None
        try:
            logits = raw
            if params.ignore_eos and self.stop_ids and seq.mask is None:  # a grammar decides when to end
                # In place unless log-probabilities read the raw row later: a copy of the row costs a wake-up of
                # torch's threads (~50 us), and this row of the batch's logits is read by nothing else.
                stop = torch.tensor(sorted(self.stop_ids), device=logits.device)
                logits = (
                    logits.index_fill(0, stop, -math.inf) if params.logprobs else logits.index_fill_(0, stop, -math.inf)
                )
            if seq.logits_hook is not None:
                logits = seq.logits_hook(seq, logits)
            if seq.mask is not None:
                logits = seq.mask.apply(logits)
            history = None
            if params.repetition_penalty != 1.0:
                history = torch.tensor(seq.prompt_ids + seq.output_ids, device=logits.device)
            token = sample(logits, params, seq.generator, history)
            if seq.mask is not None:
                seq.mask.accept(token)
            if params.logprobs:
                logprob = token_logprobs(raw[None], torch.tensor([token], device=raw.device), params.top_logprobs)[0]
        except Exception as exc:  # this sequence's sampling failed: it ends alone, the batch goes on
            return self._fail(seq, f"sampling failed: {type(exc).__name__}: {exc}")
        seq.output_ids.append(token)
        if token in seq.stop_ids or (seq.mask is not None and seq.mask.done):
            self.finish(seq, "stop")  # an end token, or a grammar that allows nothing more
        elif len(seq.output_ids) >= params.max_new_tokens or seq.position >= self.max_seq_len:
            self.finish(seq, "length")  # budget spent, or no room left to feed this token back
        return TokenEvent(seq, token, seq.finish_reason, logprob)

    def _fail(self, seq: SequenceState, reason: str) -> TokenEvent:
        seq.error = reason
        self.finish(seq, "error")
        return TokenEvent(seq, None, "error")

    def finish(self, seq: SequenceState, reason: str) -> None:
        """End a sequence (also from outside, e.g. a stop string or a disconnected client) and free its slot."""
        if seq.finish_reason is None:
            seq.finish_reason = reason
        if seq in self.running:
            self.running.remove(seq)
            self.cache.finish(seq.slot, keep=seq.finish_reason != "error")
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
    gen.admit(seqs)
    while gen.running:
        for ev in gen.step():
            if ev.finish_reason == "error":
                raise GenerationError(ev.seq.error)
            yield index[id(ev.seq)], ev.token_id, ev.finish_reason  # type: ignore[misc]
