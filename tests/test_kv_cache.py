"""The paged KV cache (`kv_cache.py`) against the contiguous cache and uncached forwards.

References used here:
- `decode_attention` (the PyTorch reference of the C++ kernel's interface) equals the written-out
  `model.attention()` over the same keys laid out contiguously;
- a forward through the paged cache (prefill, then decode, also prefill chunks mixed with decode rows in one
  forward) gives the logits of the same forward through the contiguous `KVCache`;
- prefix caching: a prompt whose prefix came from the cache gives exactly the greedy tokens of the same prompt
  computed from scratch, on the dense fp32 path (tiny random model and the bundled SmolLM2);
- bookkeeping: blocks are shared by reference count, freed when sequences end, cached prefixes bounded and
  evicted least recently used first, pages given back to the operating system.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mini_claude.config import PRESETS
from mini_claude.generate import BatchGenerator, SamplingParams, SequenceState
from mini_claude.kv_cache import CacheFullError, PagedKVCache, decode_attention
from mini_claude.model import Transformer, attention

pytestmark = pytest.mark.one_thread

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=12, ignore_eos=True)


def tiny_model(max_seq_len: int = 256) -> Transformer:
    model = Transformer(PRESETS["tiny-llama"].replace(max_seq_len=max_seq_len))
    model.init_weights(std=1.0, generator=torch.Generator().manual_seed(0))
    return model.eval()


@pytest.fixture(scope="module")
def model() -> Transformer:
    return tiny_model()


def prompt(length: int, seed: int) -> list[int]:
    return torch.randint(0, 512, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def run(gen: BatchGenerator, seqs: list[SequenceState]) -> list[list[int]]:
    gen.admit(seqs)
    while gen.running:
        gen.step()
    return [s.output_ids for s in seqs]


def alone(model: Transformer, p: list[int], params: SamplingParams = GREEDY) -> list[int]:
    gen = BatchGenerator(model)
    return run(gen, [gen.new_sequence(p, params)])[0]


# ------------------------------------------------------------------------------------ attention


def test_decode_attention_equals_written_out_attention_over_contiguous_keys() -> None:
    g = torch.Generator().manual_seed(0)
    n_blocks, n_kv, bs, hd, H = 12, 2, 4, 8, 6
    k_pool, v_pool = torch.randn(n_blocks, n_kv, bs, hd, generator=g), torch.randn(n_blocks, n_kv, bs, hd, generator=g)
    tables = torch.tensor([[3, 7, 1], [0, 11, 5], [9, 0, 0]], dtype=torch.int32)  # rows use any blocks, in any order
    lengths = torch.tensor([10, 12, 3], dtype=torch.int32)
    q = torch.randn(3, H, hd, generator=g)
    got = decode_attention(q, k_pool, v_pool, tables, lengths, hd**-0.5)
    for b in range(3):
        keys = torch.cat([k_pool[i] for i in tables[b].tolist()], dim=1)[None, :, : lengths[b]]  # (1, n_kv, S, hd)
        values = torch.cat([v_pool[i] for i in tables[b].tolist()], dim=1)[None, :, : lengths[b]]
        want = attention(q[b][None, :, None], keys, values)[0, :, 0]  # type: ignore[index]
        torch.testing.assert_close(got[b], want, rtol=1e-5, atol=1e-5)


@torch.inference_mode()
def test_paged_forward_equals_the_contiguous_cache(model: Transformer) -> None:
    """Prefill two prompts, then decode them together and add a third prompt's chunk to the same forward."""
    prompts = [prompt(21, 1), prompt(9, 2)]
    third = prompt(13, 3)
    ref = model.new_cache(3)
    paged = PagedKVCache(model.config, 3, block_size=4)
    outs = []
    for cache in (ref, paged):
        logits = []
        for slot, p in enumerate(prompts):
            if cache is paged:
                paged.start(slot, p)
                paged.extend(slot, len(p))
            logits.append(model(torch.tensor([p]), cache=cache, slots=torch.tensor([slot]))[0, -1])
        # one forward: a decode row for each prompt, then the third prompt's first 7 tokens (one row each)
        rows = [prompts[0][-1], prompts[1][-1], *third[:7]]
        positions = [len(prompts[0]), len(prompts[1]), *range(7)]
        slots = [0, 1, *[2] * 7]
        if cache is paged:
            paged.start(2, third)
            for s, n in ((0, len(prompts[0]) + 1), (1, len(prompts[1]) + 1), (2, 7)):
                paged.extend(s, n)
            out = model(torch.tensor(rows)[:, None], torch.tensor(positions)[:, None], paged, torch.tensor(slots))
        else:  # the contiguous cache: the same tokens as three separate forwards
            a = model(torch.tensor([[rows[0]], [rows[1]]]), torch.tensor([[positions[0]], [positions[1]]]), ref,
                       torch.tensor([0, 1]))  # fmt: skip
            b = model(torch.tensor([third[:7]]), torch.tensor([list(range(7))]), ref, torch.tensor([2]))
            out = torch.cat([a[:, 0], b[0]])[:, None]
        logits += list(out[:, 0])
        outs.append(torch.stack(logits))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-4)


# -------------------------------------------------------------------------------- the generator


def test_a_long_prompt_is_prefilled_in_chunks_while_others_decode(model: Transformer) -> None:
    gen = BatchGenerator(model, n_slots=3, prefill_chunk=8)
    short = [gen.new_sequence(prompt(5, 10), GREEDY), gen.new_sequence(prompt(3, 11), GREEDY)]
    gen.admit(short)
    gen.step()
    long = gen.new_sequence(prompt(50, 12), GREEDY)
    gen.admit([long])
    steps_while_prefilling = 0
    while long.prefilling:
        before = [len(s.output_ids) for s in short]
        gen.step()
        steps_while_prefilling += 1
        assert [len(s.output_ids) for s in short] == [b + 1 for b in before], "a running sequence missed a step"
    assert steps_while_prefilling == 50 // 8 + 1
    while gen.running:
        gen.step()
    for s in [*short, long]:
        assert s.output_ids == alone(model, s.prompt_ids)


def test_cached_and_uncached_prefills_give_the_same_greedy_tokens(model: Transformer) -> None:
    system = prompt(40, 20)  # a shared "system prompt": two and a half blocks of 16
    gen = BatchGenerator(model, n_slots=2, prefix_cache_tokens=1024)
    first = gen.new_sequence(system + prompt(7, 21), GREEDY)
    run(gen, [first])
    assert gen.cache.stats.reused_tokens == 0
    second = gen.new_sequence(system + prompt(5, 22), GREEDY)
    run(gen, [second])
    assert second.n_cached == 32  # the two full blocks of the shared system prompt
    assert second.output_ids == alone(model, second.prompt_ids)
    # the next turn of the first conversation: its prompt is the whole first exchange and a new message
    turn2 = gen.new_sequence(first.prompt_ids + first.output_ids + prompt(6, 23), GREEDY)
    run(gen, [turn2])
    assert turn2.n_cached == (len(first.prompt_ids) + len(first.output_ids) - 1) // 16 * 16
    assert turn2.output_ids == alone(model, turn2.prompt_ids)
    stats = gen.cache.stats
    assert (stats.lookups, stats.hits) == (3, 2)
    assert stats.reused_tokens == 32 + turn2.n_cached


def test_bundled_model_cached_prefix_gives_the_same_greedy_tokens(ours_bundled_fp32) -> None:
    """The dense fp32 path of SmolLM2 itself: the chat template's system prompt is the shared prefix."""
    engine = ours_bundled_fp32
    questions = ["What is the capital of France?", "Name three colours.", "Why is the sky blue?"]
    prompts = [engine.encode_chat([{"role": "user", "content": q}]) for q in questions]
    params = SamplingParams(temperature=0.0, max_new_tokens=16)
    gen = BatchGenerator(engine.model, 1, engine.tokenizer.stop_ids, prefix_cache_tokens=4096)
    cached = []
    for p in prompts:
        seq = gen.new_sequence(p, params)
        cached.append(run(gen, [seq])[0])
    assert gen.cache.stats.hits == 2 and gen.cache.stats.reused_tokens >= 2 * 16
    for p, ids in zip(prompts, cached, strict=True):
        fresh = BatchGenerator(engine.model, 1, engine.tokenizer.stop_ids)
        assert run(fresh, [fresh.new_sequence(p, params)])[0] == ids


def test_adapters_and_the_base_model_never_share_cached_blocks(model: Transformer) -> None:
    cache = PagedKVCache(model.config, 2, block_size=4, prefix_cache_blocks=16)
    tokens = prompt(13, 30)
    cache.start(0, tokens, b"adapter-1")
    cache.extend(0, 13)
    cache.commit(0, tokens, 13, b"adapter-1")
    cache.finish(0)
    assert cache.start(1, tokens, b"") == 0  # the base model's keys differ: nothing to reuse
    cache.finish(1)
    assert cache.start(0, tokens, b"adapter-1") == 12


# --------------------------------------------------------------------------------- bookkeeping


def test_blocks_are_shared_by_reference_and_freed_when_sequences_end(model: Transformer) -> None:
    cache = PagedKVCache(model.config, 3, block_size=4, prefix_cache_blocks=4)
    tokens = prompt(10, 40)
    cache.start(0, tokens)
    cache.extend(0, 10)
    cache.commit(0, tokens, 10)  # two full blocks registered; the third holds 2 of 4 positions
    assert cache.start(1, tokens) == 8  # while the first still runs
    assert cache.tables[1] == cache.tables[0][:2] and cache.ref[cache.tables[0][0]] == 2
    cache.extend(1, 10)
    assert cache.tables[1][2] != cache.tables[0][2], "new positions go to the sequence's own block"
    cache.finish(0)
    assert cache.used_blocks == 3 and cache.cached_blocks == 0  # the shared two and slot 1's own one
    cache.finish(1)
    assert cache.used_blocks == 0 and cache.cached_blocks == 2  # only full blocks stay cached


def test_idle_cached_blocks_are_bounded_and_evicted_least_recently_used_first(model: Transformer) -> None:
    cache = PagedKVCache(model.config, 1, block_size=4, n_blocks=6, prefix_cache_blocks=4)
    a, b = prompt(9, 50), prompt(9, 51)
    for tokens in (a, b):  # each leaves two full blocks cached
        cache.start(0, tokens)
        cache.extend(0, 9)
        cache.commit(0, tokens, 9)
        cache.finish(0)
    assert cache.cached_blocks == 4
    assert cache.start(0, a) == 8  # a is now the most recently used
    cache.finish(0)
    c = prompt(21, 52)  # needs 6 blocks: the pool's 2 free ones, then b's cached blocks, then a's
    cache.start(0, c)
    cache.extend(0, 21)
    assert cache.stats.evicted_blocks == 4
    with pytest.raises(CacheFullError):
        cache.extend(0, 25)
    cache.finish(0)
    assert cache.start(0, b) == 0


def test_freed_blocks_give_their_pages_back(model: Transformer) -> None:
    config = model.config.replace(n_layer=8, head_dim=64, n_kv_head=2, n_head=4, dim=256, max_seq_len=4096)
    cache = PagedKVCache(config, 1, block_size=16, warm_blocks=0)
    assert cache.block_bytes % 4096 == 0
    rss = Path("/proc/self/status")

    def resident_kb() -> int:
        return next(int(line.split()[1]) for line in rss.read_text().splitlines() if line.startswith("VmRSS"))

    before = resident_kb()
    cache.start(0, list(range(4000)))
    cache.extend(0, 4000)
    cache.pool[cache.tables[0]] = 1.0  # write every block, as a prefill would
    grown = resident_kb() - before
    assert grown * 1024 >= 0.9 * 250 * cache.block_bytes
    assert cache.resident_bytes == 250 * cache.block_bytes
    cache.finish(0)
    assert cache.resident_bytes == 0
    assert resident_kb() - before < 0.1 * grown


def test_a_prompt_longer_than_a_chunk_alone(model: Transformer) -> None:
    """Steps that only prefill (nothing to sample yet) come before the first token."""
    gen = BatchGenerator(model, prefill_chunk=16)
    seq = gen.new_sequence(prompt(70, 60), GREEDY)
    assert run(gen, [seq])[0] == alone(model, seq.prompt_ids)


@torch.inference_mode()
def test_short_prompt_chunks_go_through_the_decode_kernels_and_match_the_module_path(
    model: Transformer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A forward of decode rows plus short prompt chunks runs on the decode kernels (each prompt token a query of
    its own); its logits equal those of the module path (SDPA per chunk), which longer chunks still take."""
    from mini_claude import model as model_module

    if model_module.fast_ops() is None:
        pytest.skip("the C++ kernels are not built")
    calls: list[int] = []
    real = Transformer._decode_step

    def counted(self, x, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(x.shape[0])
        return real(self, x, *args, **kwargs)

    monkeypatch.setattr(Transformer, "_decode_step", counted)

    def mixed_step_logits() -> torch.Tensor:
        gen = BatchGenerator(model, n_slots=5)
        running = [gen.new_sequence(prompt(n, 60 + n), GREEDY) for n in (6, 11)]
        assert len(gen.add(running)) == 2
        new = [gen.new_sequence(prompt(n, 70 + n), GREEDY) for n in (5, 9, 3)]
        gen.admit(new)
        rows: list[torch.Tensor] = []
        accept = gen._accept
        gen._accept = lambda seq, raw: (rows.append(raw.clone()), accept(seq, raw))[1]  # type: ignore[method-assign]
        events = gen.step()
        assert [e.seq for e in events] == [*running, *new]  # every prompt prefilled in this one step
        return torch.stack(rows)

    calls.clear()
    fast = mixed_step_logits()
    assert 2 + 5 + 9 + 3 in calls  # the mixed step: 2 decode rows and 17 prompt rows in one kernel call
    monkeypatch.setattr(model_module, "DECODE_KERNEL_PROMPT_KEYS", 0)
    calls.clear()
    slow = mixed_step_logits()
    assert 19 not in calls  # over the limit: the module path
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-4)
    assert (fast.argmax(-1) == slow.argmax(-1)).all()


def test_requests_admitted_together_are_prefilled_in_one_step_with_the_tokens_of_each_alone(
    model: Transformer,
) -> None:
    prompts = [prompt(n, 80 + n) for n in (7, 12, 4, 9, 15, 2, 10, 5)]
    gen = BatchGenerator(model, n_slots=8)
    seqs = [gen.new_sequence(p, GREEDY) for p in prompts]
    gen.admit(seqs)
    first = gen.step()
    assert sorted(id(e.seq) for e in first) == sorted(id(s) for s in seqs)  # all eight got their first token
    while gen.running:
        gen.step()
    assert [s.output_ids for s in seqs] == [alone(model, p) for p in prompts]
