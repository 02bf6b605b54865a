"""Continuous batching: concurrent requests through one scheduler give what each would get alone."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer as BPETokenizer

from helpers import TINY_VOCAB, tiny_tokenizer
from mini_claude.config import PRESETS
from mini_claude.engine import Engine
from mini_claude.generate import ContextOverflowError, SamplingParams
from mini_claude.model import Transformer
from mini_claude.scheduler import Scheduler
from mini_claude.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def engine() -> Engine:
    config = PRESETS["tiny-llama"].replace(vocab_size=TINY_VOCAB, max_seq_len=128)
    model = Transformer(config)
    model.init_weights(std=0.8, generator=torch.Generator().manual_seed(0))
    backend: BPETokenizer = tiny_tokenizer()
    return Engine(model.eval(), Tokenizer(backend, eos_token="<|im_end|>"), "tiny")


PROMPTS = ["hello there", "a", "the quick brown fox jumps", "12345", "zzz", "Once upon a time", "x y", "emoji 🎉"]


def alone(engine: Engine, prompt: str, params: SamplingParams) -> str:
    return engine.complete(engine.encode_text(prompt), params).text


def test_concurrent_threads_get_what_they_would_get_alone(engine: Engine) -> None:
    params = [SamplingParams(temperature=0, max_new_tokens=5 + 3 * i) for i in range(len(PROMPTS))]
    params[3] = SamplingParams(temperature=1.0, seed=7, max_new_tokens=12)  # sampled and seeded
    expected = [alone(engine, p, sp) for p, sp in zip(PROMPTS, params, strict=True)]
    scheduler = Scheduler(engine, max_batch=4)  # fewer slots than requests: some must wait their turn
    results: dict[int, str] = {}

    def client(i: int) -> None:
        handle = scheduler.submit(engine.encode_text(PROMPTS[i]), params[i])
        results[i] = "".join(chunk.text for chunk in handle)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    scheduler.close()
    assert [results[i] for i in range(len(PROMPTS))] == expected
    assert max(scheduler.stats.batch_sizes) > 1, "requests were never decoded together"


def test_async_clients_and_cancellation(engine: Engine) -> None:
    scheduler = Scheduler(engine, max_batch=8)

    async def main() -> tuple[list[str], str | None]:
        loop = asyncio.get_running_loop()
        params = SamplingParams(temperature=0, max_new_tokens=20, ignore_eos=True)

        async def collect(prompt: str) -> str:
            handle = scheduler.submit(engine.encode_text(prompt), params, loop=loop)
            return "".join([c.text async for c in handle])

        long = scheduler.submit(engine.encode_text("cancel me"), SamplingParams(max_new_tokens=100), loop=loop)
        async for _ in long:
            long.cancel()
        texts = await asyncio.gather(*(collect(p) for p in PROMPTS[:4]))
        return texts, long.final.finish_reason if long.final else None

    texts, reason = asyncio.run(main())
    scheduler.close()
    params = SamplingParams(temperature=0, max_new_tokens=20, ignore_eos=True)
    assert texts == [alone(engine, p, params) for p in PROMPTS[:4]]
    assert reason == "cancelled"


def test_a_prompt_that_cannot_fit_is_refused_at_submit(engine: Engine) -> None:
    scheduler = Scheduler(engine)
    with pytest.raises(ContextOverflowError):
        scheduler.submit(list(range(10)) * 20)
    handle = scheduler.submit(list(range(10)) * 20, SamplingParams(max_new_tokens=3), truncate=True)
    final = [c for c in handle][-1]
    scheduler.close()
    assert final.completion is not None and final.completion.truncated_prompt_tokens == 200 - 127


def thread_cpu_seconds(native_id: int) -> float:
    """User + system CPU time of one thread of this process, from /proc (clock ticks of 1/100 s)."""
    fields = Path(f"/proc/self/task/{native_id}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_an_idle_scheduler_sleeps_instead_of_polling(engine: Engine) -> None:
    scheduler = Scheduler(engine)
    try:
        handle = scheduler.submit(engine.encode_text("wake up"), SamplingParams(max_new_tokens=4))
        list(handle)
        native_id = scheduler._thread.native_id
        assert native_id is not None
        before = thread_cpu_seconds(native_id)
        time.sleep(1.5)
        assert thread_cpu_seconds(native_id) - before <= 0.02, "the loop used CPU with nothing to do"
        handle = scheduler.submit(engine.encode_text("and again"), SamplingParams(max_new_tokens=4))
        assert [c for c in handle][-1].finish_reason is not None  # a request wakes it at once
    finally:
        scheduler.close()


def test_prefix_cache_and_kv_memory_are_reported(engine: Engine) -> None:
    scheduler = Scheduler(engine, max_batch=2, prefix_cache_tokens=256)
    shared = engine.encode_text("a system prompt that every request of this test starts with, " * 2)
    params = SamplingParams(temperature=0, max_new_tokens=8, ignore_eos=True)
    try:
        texts = ["".join(c.text for c in scheduler.submit(shared + engine.encode_text(q), params)) for q in "ab"]
    finally:
        scheduler.close()
    stats = scheduler.stats
    assert stats.cache.lookups == 2 and stats.cache.hits == 1
    assert stats.cache.reused_tokens == len(shared) // 16 * 16
    assert stats.kv_used_bytes == 0 and 0 < stats.kv_cached_bytes <= stats.kv_bytes
    assert texts == [engine.complete(shared + engine.encode_text(q), params).text for q in "ab"]


def test_the_loop_computes_on_as_many_threads_as_its_creator(engine: Engine) -> None:
    """OpenMP's thread count is per calling thread; the scheduler's own thread must get the creator's."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        scheduler = Scheduler(engine)
        seen: list[int] = []
        hook = engine.model.register_forward_pre_hook(lambda *_: seen.append(torch.get_num_threads()))
        list(scheduler.submit(engine.encode_text("threads"), SamplingParams(max_new_tokens=2)))
        scheduler.close()
        hook.remove()
    finally:
        torch.set_num_threads(before)
    assert seen and set(seen) == {2}


def test_the_prefix_cache_budget_is_memory_by_default(engine: Engine) -> None:
    """64 MiB hold twice as many bfloat16 positions as float32 ones; a token count, when given, wins."""
    from mini_claude.kv_cache import kv_bytes_per_token

    config, dtype = engine.model.config, engine.model.embed_tokens.weight.dtype
    per_token = config.n_layer * 2 * config.n_kv_head * config.head_dim * dtype.itemsize
    assert kv_bytes_per_token(config, dtype) == per_token
    assert kv_bytes_per_token(config, torch.float32) == 2 * kv_bytes_per_token(config, torch.bfloat16)
    by_memory = Scheduler(engine, max_batch=1, prefix_cache_mb=16)
    by_tokens = Scheduler(engine, max_batch=1, prefix_cache_tokens=300, prefix_cache_mb=16)
    try:
        assert by_memory.prefix_cache_tokens == 16 * 2**20 // per_token
        assert by_tokens.prefix_cache_tokens == 300
    finally:
        by_memory.close()
        by_tokens.close()


def test_a_busy_loop_still_gives_the_heap_back(engine: Engine) -> None:
    """A server under constant load never goes idle; it must return freed heap all the same."""
    busy = Scheduler(engine, max_batch=2, trim_seconds=0.0)  # every step
    never = Scheduler(engine, max_batch=2, trim_seconds=1e9)  # only when idle
    for scheduler in (busy, never):
        handles = [scheduler.submit(engine.encode_text(p), SamplingParams(temperature=0, max_new_tokens=12))
                   for p in PROMPTS[:2]]  # fmt: skip
        for handle in handles:
            "".join(chunk.text for chunk in handle)
        scheduler.close()
    assert busy.stats.steps >= 12 and busy.stats.heap_trims >= busy.stats.steps
    assert never.stats.heap_trims <= 2  # before the first request and after the last, never in between


def test_an_idle_loop_gathers_a_burst_into_one_first_step(engine: Engine) -> None:
    """Clients that arrive together share their prefill step instead of the later ones waiting for the first's."""
    params = SamplingParams(temperature=0, max_new_tokens=6)
    runs: dict[float, tuple[list[str], dict[int, int]]] = {}
    for gap in (0.0, 0.2):
        scheduler = Scheduler(engine, max_batch=8, gather_gap=gap, gather_max=2.0)
        handles = []
        for prompt in PROMPTS[:4]:
            handles.append(scheduler.submit(engine.encode_text(prompt), params))
            time.sleep(0.03)  # a burst as a server's event loop hands it over, a few ms apart
        texts = ["".join(chunk.text for chunk in handle) for handle in handles]
        scheduler.close()
        runs[gap] = (texts, dict(scheduler.stats.batch_sizes))
    assert runs[0.2][0] == runs[0.0][0] == [alone(engine, p, params) for p in PROMPTS[:4]]
    assert set(runs[0.2][1]) == {4}, "every step should have run all four"
    assert 1 in runs[0.0][1], "without gathering the first request starts alone"
