"""Sampling and the token loop (`generate.py`) against references.

References used here:
- greedy decoding is checked against an uncached forward of the whole sequence at every step (argmax of
  the last position's logits), so the KV cache, prefill/decode split and batching must all agree with the
  plain model;
- `process_logits` is compared with `transformers`' own logits processors on random logits;
- batched and continuously-batched generation is compared with generating each sequence alone, token for
  token (atol=0 on ids).

The model is a tiny random Llama with large weights (std=1.0): its logits are peaked, so the gap between
the best and second-best token is far above float rounding and greedy ties cannot flip a token.
"""

from __future__ import annotations

from collections.abc import Collection

import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from mini_claude.config import PRESETS
from mini_claude.generate import (
    BatchGenerator,
    ContextOverflowError,
    SamplingParams,
    SequenceState,
    generate_tokens,
    process_logits,
    sample,
)
from mini_claude.model import Transformer

pytestmark = pytest.mark.one_thread  # tiny models: a second thread only adds barrier waits

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=12)


def tiny_model(max_seq_len: int = 256, seed: int = 0) -> Transformer:
    model = Transformer(PRESETS["tiny-llama"].replace(max_seq_len=max_seq_len))
    model.init_weights(std=1.0, generator=torch.Generator().manual_seed(seed))
    return model.eval()


@pytest.fixture(scope="module")
def model() -> Transformer:
    return tiny_model()


def prompt(length: int, seed: int) -> list[int]:
    """A random prompt of `length` ids in the tiny vocabulary."""
    return torch.randint(0, 512, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.inference_mode()
def reference_greedy(
    model: Transformer, prompt_ids: list[int], n: int, stop_ids: Collection[int] = (), banned: Collection[int] = ()
) -> list[int]:
    """Greedy decoding with no cache at all: re-run the full sequence and take the last position's argmax.

    `banned` ids get a logit of -inf (what `ignore_eos` does to end-of-sequence ids).
    """
    ids, out = list(prompt_ids), []
    for _ in range(n):
        logits = model(torch.tensor([ids]))[0, -1]  # (V,)
        logits[list(banned)] = float("-inf")
        token = int(logits.argmax())
        out.append(token)
        ids.append(token)
        if token in stop_ids:
            break
    return out


def run_alone(
    model: Transformer, prompt_ids: list[int], params: SamplingParams, stop_ids: set[int] = frozenset()
) -> tuple[list[int], str | None]:
    """Generate one sequence by itself: (token ids, finish reason)."""
    ids, reason = [], None
    for _, token, finish in generate_tokens(model, [prompt_ids], params, stop_ids):
        ids.append(token)
        reason = finish or reason
    return ids, reason


def run_batch(
    model: Transformer, prompts: list[list[int]], params: SamplingParams | list[SamplingParams], stop_ids=()
) -> tuple[list[list[int]], list[str | None]]:
    outs: list[list[int]] = [[] for _ in prompts]
    reasons: list[str | None] = [None] * len(prompts)
    for i, token, finish in generate_tokens(model, prompts, params, stop_ids):
        assert reasons[i] is None, "a sequence produced a token after it finished"
        outs[i].append(token)
        reasons[i] = finish
    return outs, reasons


# ------------------------------------------------------------------------------------------ greedy


def test_greedy_is_argmax_of_uncached_forward(model: Transformer) -> None:
    p = prompt(7, seed=1)
    ids, reason = run_alone(model, p, GREEDY)
    assert ids == reference_greedy(model, p, GREEDY.max_new_tokens)
    assert reason == "length"


def test_sample_temperature_zero_is_argmax() -> None:
    logits = torch.randn(100, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(0)
    assert sample(logits, SamplingParams(temperature=0.0), gen) == int(logits.argmax())


def test_sampling_follows_torch_multinomial_on_processed_logits() -> None:
    """With a seeded generator, `sample` draws exactly what multinomial on softmax(processed logits) draws."""
    logits = torch.randn(64, generator=torch.Generator().manual_seed(3))
    params = SamplingParams(temperature=0.8, top_k=20, top_p=0.9)
    ours_gen = torch.Generator().manual_seed(5)
    ours = [sample(logits, params, ours_gen) for _ in range(20)]
    g = torch.Generator().manual_seed(5)
    probs = process_logits(logits, params).softmax(-1)
    ref = [int(torch.multinomial(probs, 1, generator=g)) for _ in range(20)]
    assert ours == ref
    assert all(probs[t] > 0 for t in ours)  # never a token that top-k/top-p removed


def test_same_seed_same_tokens_different_seeds_differ(model: Transformer) -> None:
    p = prompt(5, seed=2)

    def sampled(seed: int) -> list[int]:
        return run_alone(model, p, SamplingParams(temperature=1.0, max_new_tokens=24, seed=seed))[0]

    first = sampled(11)
    assert sampled(11) == first
    others = [sampled(s) for s in (12, 13, 14)]
    assert all(o != first for o in others)


def test_greedy_with_repetition_penalty_matches_transformers_loop(model: Transformer) -> None:
    """Penalized greedy decoding equals an uncached loop that applies HF's processor over prompt + reply."""
    p = prompt(6, seed=4)
    params = SamplingParams(temperature=0.0, repetition_penalty=3.0, max_new_tokens=40)
    ids, _ = run_alone(model, p, params)
    processor = RepetitionPenaltyLogitsProcessor(penalty=3.0)
    seq, ref = list(p), []
    with torch.inference_mode():
        for _ in range(params.max_new_tokens):
            logits = model(torch.tensor([seq]))[:, -1]  # (1, V)
            token = int(processor(torch.tensor([seq]), logits).argmax())
            ref.append(token)
            seq.append(token)
    assert ids == ref
    assert ids != reference_greedy(model, p, 40), "the penalty should change this greedy run (else the test is void)"


# ------------------------------------------------------------------------- logits processors vs HF


def random_logits(seed: int, vocab: int = 300) -> torch.Tensor:
    return torch.randn(vocab, generator=torch.Generator().manual_seed(seed)) * 3


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("top_k", [1, 5, 50, 299])
def test_top_k_matches_transformers(seed: int, top_k: int) -> None:
    logits = random_logits(seed)
    ours = process_logits(logits, SamplingParams(temperature=1.0, top_k=top_k))
    ref = TopKLogitsWarper(top_k)(None, logits[None])[0]
    assert torch.equal(torch.isfinite(ours), torch.isfinite(ref))
    assert int(torch.isfinite(ours).sum()) == top_k
    torch.testing.assert_close(ours[torch.isfinite(ours)], ref[torch.isfinite(ref)], atol=0, rtol=0)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.5, 0.9, 0.99])
def test_top_p_matches_transformers(seed: int, top_p: float) -> None:
    logits = random_logits(seed)
    ours = process_logits(logits, SamplingParams(temperature=1.0, top_p=top_p))
    ref = TopPLogitsWarper(top_p)(None, logits[None])[0]
    kept = torch.isfinite(ours)
    assert torch.equal(kept, torch.isfinite(ref))
    assert kept.sum() >= 1
    torch.testing.assert_close(ours[kept], ref[kept], atol=0, rtol=0)


@pytest.mark.parametrize("temperature", [0.1, 0.7, 1.0, 2.5])
def test_temperature_matches_transformers(temperature: float) -> None:
    logits = random_logits(7)
    ours = process_logits(logits, SamplingParams(temperature=temperature))
    ref = TemperatureLogitsWarper(temperature)(None, logits[None])[0]
    torch.testing.assert_close(ours, ref)


@pytest.mark.parametrize("penalty", [0.5, 1.3, 2.0])
def test_repetition_penalty_matches_transformers(penalty: float) -> None:
    logits = random_logits(8)
    history = torch.tensor([3, 17, 17, 42, 299, 0, 3, 150])  # repeats on purpose: a token is penalized once
    ours = process_logits(logits, SamplingParams(temperature=0.0, repetition_penalty=penalty), history)
    ref = RepetitionPenaltyLogitsProcessor(penalty)(history[None], logits[None].clone())[0]
    torch.testing.assert_close(ours, ref, atol=0, rtol=0)
    untouched = torch.ones(300, dtype=torch.bool).index_fill(0, history, False)
    assert torch.equal(ours[untouched], logits[untouched])


@pytest.mark.parametrize("seed", range(4))
def test_all_processors_together_match_transformers_chain(seed: int) -> None:
    """HF's order in `generate`: repetition penalty, temperature, top-k, top-p."""
    logits = random_logits(seed)
    history = torch.randint(0, 300, (20,), generator=torch.Generator().manual_seed(100 + seed))
    params = SamplingParams(temperature=0.7, top_k=40, top_p=0.8, repetition_penalty=1.2)
    chain = LogitsProcessorList(
        [
            RepetitionPenaltyLogitsProcessor(1.2),
            TemperatureLogitsWarper(0.7),
            TopKLogitsWarper(40),
            TopPLogitsWarper(0.8),
        ]
    )
    ours = process_logits(logits, params, history)
    ref = chain(history[None], logits[None].clone())[0]
    kept = torch.isfinite(ours)
    assert torch.equal(kept, torch.isfinite(ref))
    torch.testing.assert_close(ours[kept], ref[kept])


# ------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": 100.5}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.01}, "top_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"repetition_penalty": 10.5}, "repetition_penalty"),
    ],
)
def test_sampling_params_reject_bad_values(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_sampling_params_accept_boundaries() -> None:
    SamplingParams(max_new_tokens=1, temperature=0.0, top_k=1, top_p=1.0, repetition_penalty=10.0)
    SamplingParams(temperature=100.0, top_p=1e-6, repetition_penalty=1e-3)


# -------------------------------------------------------------------------------- how sequences end


def first_new_token(ids: list[int]) -> int:
    """Index of the first token in `ids` that did not occur before it, after position 0 (so EOS ends mid-run)."""
    return next(k for k in range(1, len(ids)) if ids[k] not in ids[:k])


def test_eos_ends_sequence_with_stop(model: Transformer) -> None:
    p = prompt(8, seed=5)
    free = reference_greedy(model, p, 20)
    k = first_new_token(free)
    eos = free[k]
    ids, reason = run_alone(model, p, SamplingParams(temperature=0.0, max_new_tokens=20), {eos})
    assert ids == free[: k + 1]  # the EOS id is the last event, nothing after it
    assert reason == "stop"


def test_ignore_eos_masks_eos_and_runs_to_the_token_budget(model: Transformer) -> None:
    p = prompt(8, seed=5)
    free = reference_greedy(model, p, 20)
    eos = free[first_new_token(free)]
    ids, reason = run_alone(model, p, SamplingParams(temperature=0.0, max_new_tokens=20, ignore_eos=True), {eos})
    assert ids == reference_greedy(model, p, 20, banned={eos})
    assert eos not in ids
    assert reason == "length"


@pytest.mark.parametrize("n", [1, 2, 9])
def test_max_new_tokens_gives_length(model: Transformer, n: int) -> None:
    ids, reason = run_alone(model, prompt(4, seed=6), SamplingParams(temperature=0.0, max_new_tokens=n))
    assert len(ids) == n
    assert reason == "length"


def test_prompt_that_does_not_fit_raises() -> None:
    small = tiny_model(max_seq_len=16)
    gen = BatchGenerator(small)
    with pytest.raises(ContextOverflowError) as info:
        gen.new_sequence(prompt(16, seed=7), GREEDY)
    assert (info.value.n_tokens, info.value.limit) == (16, 16)
    with pytest.raises(ContextOverflowError):
        list(generate_tokens(small, [prompt(40, seed=7)], GREEDY))
    with pytest.raises(ValueError, match="empty"):
        gen.new_sequence([], GREEDY)


@pytest.mark.parametrize("prompt_len", [5, 15])
def test_generation_that_reaches_the_context_window_ends_with_length(prompt_len: int) -> None:
    """Every fed token has a position < max_seq_len and the window is used to its last position."""
    small = tiny_model(max_seq_len=16)
    p = prompt(prompt_len, seed=8)
    ids, reason = run_alone(small, p, SamplingParams(temperature=0.0, max_new_tokens=100))
    assert reason == "length"
    fed = len(p) + len(ids) - 1  # the last sampled token is never fed back
    assert fed == small.config.max_seq_len
    assert ids == reference_greedy(small, p, len(ids))  # the uncached reference runs on all 16 positions


# ------------------------------------------------------------------------------------------ batching


def test_batched_greedy_equals_each_alone(model: Transformer) -> None:
    prompts = [prompt(n, seed=20 + n) for n in (3, 11, 6, 1, 17)]
    batch, reasons = run_batch(model, prompts, GREEDY)
    for p, ids in zip(prompts, batch, strict=True):
        assert ids == run_alone(model, p, GREEDY)[0]
        assert ids == reference_greedy(model, p, GREEDY.max_new_tokens)
    assert reasons == ["length"] * len(prompts)


def test_batched_sequences_finishing_at_different_steps(model: Transformer) -> None:
    prompts = [prompt(n, seed=30 + n) for n in (9, 4, 13, 2)]
    budgets = [3, 15, 1, 8]
    params = [SamplingParams(temperature=0.0, max_new_tokens=b) for b in budgets]
    # One sequence also meets an end-of-sequence id part way through.
    free = reference_greedy(model, prompts[1], 15)
    eos = free[first_new_token(free)]
    batch, reasons = run_batch(model, prompts, params, stop_ids={eos})
    for p, sp, ids, reason in zip(prompts, params, batch, reasons, strict=True):
        alone, alone_reason = run_alone(model, p, sp, {eos})
        assert ids == alone
        assert reason == alone_reason
    assert len({len(ids) for ids in batch}) > 2  # they really did finish at different steps
    assert "stop" in reasons


def test_continuous_batching_equals_running_alone(model: Transformer) -> None:
    """Sequences join between steps, including into freed, non-contiguous slots, several at once."""
    gen = BatchGenerator(model, n_slots=3)

    def new(length: int, seed: int, budget: int) -> SequenceState:
        return gen.new_sequence(prompt(length, seed), SamplingParams(temperature=0.0, max_new_tokens=budget))

    a, b, c = new(5, 40, 2), new(9, 41, 30), new(3, 42, 4)
    d, e, f = new(7, 43, 10), new(4, 44, 3), new(12, 45, 5)
    schedule = {0: [a, b, c], 5: [d, e], 9: [f]}  # step index -> sequences to add before that step
    seen_non_contiguous = False
    all_seqs: list[SequenceState] = []
    step = 0
    while gen.running or any(k >= step for k in schedule):
        if step in schedule:
            assert gen.n_free >= len(schedule[step])
            gen.add(schedule[step])
            all_seqs.extend(schedule[step])
        slots = [s.slot for s in gen.running]
        seen_non_contiguous |= slots != list(range(len(slots)))
        gen.step()
        step += 1
    assert seen_non_contiguous, "the schedule should exercise slots out of order"
    assert gen.n_free == 3
    for s in all_seqs:
        assert s.finish_reason == "length"
        assert s.output_ids == run_alone(model, s.prompt_ids, s.params)[0]


def test_seeded_sampling_is_the_same_alone_and_in_a_batch(model: Transformer) -> None:
    p = prompt(6, seed=50)
    params = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=16, seed=1234)
    alone, _ = run_alone(model, p, params)
    others = [prompt(n, seed=51 + n) for n in (2, 10)]
    other_params = [SamplingParams(temperature=1.0, max_new_tokens=n, seed=s) for n, s in ((5, 1), (20, 2))]
    batch, _ = run_batch(model, [others[0], p, others[1]], [other_params[0], params, other_params[1]])
    assert batch[1] == alone


def test_finish_from_outside_frees_the_slot(model: Transformer) -> None:
    gen = BatchGenerator(model, n_slots=2)
    s1, s2 = (gen.new_sequence(prompt(4, seed), GREEDY) for seed in (60, 61))
    gen.add([s1, s2])
    with pytest.raises(RuntimeError, match="free slots"):
        gen.add([gen.new_sequence(prompt(3, 62), GREEDY)])
    gen.finish(s1, "cancelled")
    assert s1.finish_reason == "cancelled" and s1 not in gen.running and gen.n_free == 1
    events = gen.step()
    assert [ev.seq for ev in events] == [s2]
    # The freed slot takes a new sequence, which still decodes exactly as if alone.
    s3 = gen.new_sequence(prompt(5, 63), GREEDY)
    gen.add([s3])
    assert s3.slot == s1.slot
    while gen.running:
        gen.step()
    assert s3.output_ids == reference_greedy(model, s3.prompt_ids, GREEDY.max_new_tokens)
    assert s2.output_ids == reference_greedy(model, s2.prompt_ids, GREEDY.max_new_tokens)


def test_a_sampler_that_raises_ends_its_sequence_alone(model: Transformer) -> None:
    gen = BatchGenerator(model, n_slots=3)
    seqs = [gen.new_sequence(prompt(n, 70 + n), GREEDY) for n in (4, 6, 3)]
    calls = 0

    def flaky(seq: SequenceState, logits: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise ValueError("grammar has no allowed token")
        return logits

    seqs[1].logits_hook = flaky  # a per-sequence sampling step (a grammar's mask) that fails on its 3rd call
    gen.add(seqs)
    while gen.running:
        gen.step()
    assert seqs[1].finish_reason == "error" and len(seqs[1].output_ids) == 2
    assert seqs[1].error == "sampling failed: ValueError: grammar has no allowed token"
    for s in (seqs[0], seqs[2]):
        assert s.finish_reason == "length" and s.output_ids == reference_greedy(model, s.prompt_ids, 12)
