"""Continuous batching: many concurrent requests share one model, one KV cache and one decode loop.

A single background thread owns a `BatchGenerator` (the model is not thread-safe, and one forward for all
running sequences is what makes concurrent decoding cheap). Callers on any thread or event loop `submit()`
a prompt and get a `RequestHandle`, an iterator (sync or async) of the same `TextChunk`s `Engine.stream`
produces. Between two steps the loop admits waiting requests into free cache slots (their prompts start from
the longest cached prefix and are prefilled in the same forwards as the running sequences' next tokens),
applies cancellations, and hands each new token to its request's `TextAssembler`. A slow consumer never
blocks the loop: chunks wait in its own queue, and a consumer that falls behind gets what is ready in one
chunk (fewer, larger SSE events; no text is dropped or held back). A sequence that fails on its own (its
sampler, NaN logits, a removed adapter) ends its request with an error; the others go on. With nothing to
do, the loop sleeps on a condition variable until a request arrives: no polling. Other work on the model (a
prompt to score, `Engine.score`) goes through `call()`, which runs it on the loop's thread between two steps.

Nothing here knows about HTTP; the server's streaming routes, WebSocket and web UI all read handles.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from mini_claude.engine import Engine, TextAssembler, TextChunk, release_heap
from mini_claude.generate import BatchGenerator, SamplingParams, SequenceState
from mini_claude.kv_cache import CacheStats, kv_bytes_per_token

log = logging.getLogger(__name__)

_DONE = object()
TRIM_SECONDS = 10.0  # while busy, the heap's free pages go back this often (see Scheduler)
GATHER_GAP_SECONDS = 0.004  # an idle loop woken by a request waits this long for the next one (see Scheduler)
GATHER_MAX_SECONDS = 0.030  # and at most this long in all


class RequestHandle:
    """One submitted generation: iterate it for chunks; `cancel()` ends it at the next step."""

    def __init__(self, request_id: int, loop: asyncio.AbstractEventLoop | None) -> None:
        self.id = request_id
        self.submitted_at = time.perf_counter()
        self._loop = loop
        self._sync: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._async: asyncio.Queue[object] | None = asyncio.Queue() if loop is not None else None
        self._cancelled = threading.Event()
        self.error: str | None = None
        self.final: TextChunk | None = None
        self.adapter: str | None = None

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        self._cancelled.set()

    # called from the scheduler thread
    def _put(self, item: object) -> None:
        if self._async is not None and self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._async.put_nowait, item)
            except RuntimeError:  # the consumer's event loop is closed: nobody is listening any more
                self._cancelled.set()
        else:
            self._sync.put(item)

    def __iter__(self) -> Iterator[TextChunk]:
        if self._async is not None:
            raise RuntimeError("this handle was submitted from an event loop: use `async for`")
        while (item := self._sync.get()) is not _DONE:
            yield item  # type: ignore[misc]
        if self.error:
            raise RuntimeError(self.error)

    async def __aiter__(self) -> AsyncIterator[TextChunk]:
        if self._async is None:
            raise RuntimeError("this handle was submitted without an event loop: use `for`")
        done = False
        try:
            while not done and (item := await self._async.get()) is not _DONE:
                while not self._async.empty():  # tokens that arrived meanwhile leave as one chunk
                    more = self._async.get_nowait()
                    if more is _DONE:
                        done = True
                        break
                    item = _joined(item, more)  # type: ignore[arg-type]
                yield item  # type: ignore[misc]
        finally:  # the consumer stopped early (client disconnected): stop generating for it
            if self.final is None:
                self.cancel()
        if self.error:
            raise RuntimeError(self.error)


def _joined(first: TextChunk, second: TextChunk) -> TextChunk:
    """Two consecutive chunks of one sequence as one (the second may be its final chunk)."""
    return TextChunk(first.index, first.text + second.text, first.token_ids + second.token_ids,
                     second.finish_reason, second.completion, first.logprobs + second.logprobs)  # fmt: skip


@dataclass
class _Pending:
    handle: RequestHandle
    prompt_ids: list[int]
    params: SamplingParams
    stop: Sequence[str]
    truncated: int
    adapter: str | None


@dataclass
class SchedulerStats:
    waiting: int = 0
    running: int = 0
    finished: int = 0
    cancelled: int = 0
    failed: int = 0  # sequences that ended with an error of their own (the rest of their batch went on)
    steps: int = 0
    tokens: int = 0
    batch_sizes: dict[int, int] = field(default_factory=dict)  # sequences per step -> number of steps
    cache: CacheStats = field(default_factory=CacheStats)  # the prefix cache's counters
    kv_bytes: int = 0  # KV-cache memory resident now (blocks in use, cached or warm)
    kv_used_bytes: int = 0  # of which, blocks that running sequences hold
    kv_cached_bytes: int = 0  # of which, blocks kept only for the prefix cache
    gathered: int = 0  # idle wake-ups that waited for the requests following the first (see Scheduler)
    heap_trims: int = 0  # times the loop gave the heap's free pages back (idle, or busy for `trim_seconds`)


class Scheduler:
    def __init__(
        self, engine: Engine, max_batch: int = 8, prefix_cache_tokens: int | None = None, prefix_cache_mb: float = 64.0,
        trim_seconds: float = TRIM_SECONDS, gather_gap: float = GATHER_GAP_SECONDS,
        gather_max: float = GATHER_MAX_SECONDS,
    ) -> None:  # fmt: skip
        """The prefix cache holds `prefix_cache_tokens` positions, or by default what `prefix_cache_mb` MiB
        hold: a budget in bytes keeps memory the same whatever the model's dtype and shape (a float32 cache
        costs twice a bfloat16 one per token).

        The heap's free pages go back to the system when the loop goes idle, and also every `trim_seconds`
        while it stays busy: a server under constant load is never idle, and the prefills of ever new prompt
        lengths would otherwise leave it holding hundreds of MB of freed heap (the soak benchmark measured it).
        A trim takes up to tens of ms on a large fragmented heap (23 ms measured on ~0.4 GB): every 10 s, it
        costs under 0.3% of the time.

        An idle loop woken by a request gathers the requests that follow it before its first step: it waits
        while each next one comes within `gather_gap` seconds (at most `gather_max` in all, and never once the
        free slots are taken). Clients that start together (a burst of users, an evaluation harness) then
        share one prefill step instead of a first step for whoever came first and a second for the rest, which
        wait for the first to finish: with 8 clients the second group held the median first-token time. The
        waiting also leaves both cores to the server's event loop, which is what parses the burst. One lone
        request pays one `gather_gap` (4 ms) of first-token time; a busy loop never waits, as its next step
        admits whoever came meanwhile (0 disables the gathering)."""
        self.trim_seconds = trim_seconds
        self.gather_gap, self.gather_max = gather_gap, gather_max
        self.engine = engine
        self.max_batch = max_batch
        if prefix_cache_tokens is None:
            per_token = kv_bytes_per_token(engine.model.config, engine.model.embed_tokens.weight.dtype)
            prefix_cache_tokens = int(prefix_cache_mb * 2**20) // per_token
        self.prefix_cache_tokens = prefix_cache_tokens
        self.stats = SchedulerStats()
        # OpenMP keeps its thread count per calling thread: torch.set_num_threads in the thread that loaded the
        # model does not reach this loop's own thread, which would then compute on one core. Carried over in _run.
        self._threads = torch.get_num_threads()
        self._ids = itertools.count(1)
        self._pending: deque[_Pending] = deque()
        self._users: dict[str, int] = {}  # adapter -> requests queued or running with it (see `users`)
        self._calls: deque[tuple[Callable[[], Any], Future[Any]]] = deque()
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="mini-claude-scheduler", daemon=True)
        self._thread.start()

    def submit(
        self,
        prompt_ids: list[int],
        params: SamplingParams = SamplingParams(),
        stop: Sequence[str] = (),
        truncate: bool = False,
        loop: asyncio.AbstractEventLoop | None = None,
        adapter: str | None = None,
    ) -> RequestHandle:
        """Queue a prompt (for the LoRA adapter named `adapter`, or the base model); raises at once (in the
        caller) if it cannot fit the context window or names no loaded adapter."""
        if self._closed:
            raise RuntimeError("the scheduler is closed")
        self.engine.adapters.check(adapter)
        ids, truncated = self.engine.fit_prompt(list(prompt_ids), truncate)
        if not ids:
            raise ValueError("the prompt is empty")
        handle = RequestHandle(next(self._ids), loop)
        handle.adapter = adapter
        with self._wake:
            if adapter is not None:
                self._users[adapter] = self._users.get(adapter, 0) + 1
            self._pending.append(_Pending(handle, ids, params, stop, truncated, adapter))
            self.stats.waiting = len(self._pending)
            self._wake.notify()
        return handle

    def users(self, adapter: str) -> int:
        """Requests queued or running with `adapter`: one that is being removed waits until this is 0."""
        with self._wake:
            return self._users.get(adapter, 0)

    def _end(self, handle: RequestHandle) -> None:
        """The last item of every handle, whichever way it ended."""
        if handle.adapter is not None:
            with self._wake:
                left = self._users.get(handle.adapter, 1) - 1
                if left > 0:
                    self._users[handle.adapter] = left
                else:
                    self._users.pop(handle.adapter, None)
        handle._put(_DONE)

    def call(self, fn: Callable[[], Any]) -> Future[Any]:
        """Run `fn()` on the loop's thread between two steps (the model is not thread-safe); its result or
        exception comes back through the future (`asyncio.wrap_future` to await it)."""
        future: Future[Any] = Future()
        with self._wake:
            if self._closed:
                raise RuntimeError("the scheduler is closed")
            self._calls.append((fn, future))
            self._wake.notify()
        return future

    @property
    def alive(self) -> bool:
        """Whether the decode loop is running (health checks)."""
        return self._thread.is_alive() and not self._closed

    def close(self, timeout: float = 5.0) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout)

    # ------------------------------------------------------------------------------ the loop (one thread)
    def _run(self) -> None:
        torch.set_num_threads(self._threads)
        gen = self._generator()
        active: dict[int, tuple[SequenceState, RequestHandle, TextAssembler]] = {}
        trimmed, last_trim = True, time.monotonic()
        while True:
            busy_too_long = gen.running and time.monotonic() - last_trim >= self.trim_seconds
            if (not gen.running and not trimmed) or busy_too_long:  # what finished requests' temporaries held
                release_heap()
                trimmed, last_trim = True, time.monotonic()
                self.stats.heap_trims += 1
            with self._wake:
                while not self._closed and not self._pending and not self._calls and not gen.running:
                    self._wake.wait()
                if self._pending and not gen.running:
                    self._gather(gen.n_free)
                if self._closed:
                    break
                trimmed = False
                calls = list(self._calls)
                self._calls.clear()
                admitted = [self._pending.popleft() for _ in range(min(gen.n_free, len(self._pending)))]
                self.stats.waiting = len(self._pending)
            for fn, future in calls:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn())
                    except Exception as exc:
                        future.set_exception(exc)
            for p in [p for p in admitted if p.handle.cancelled]:  # gave up while waiting: no prefill for it
                admitted.remove(p)
                self._end(p.handle)
                self.stats.cancelled += 1
            try:
                self._cancel(gen, active)
                new = []
                for p in admitted:
                    try:
                        seq = gen.new_sequence(p.prompt_ids, p.params, p.adapter)
                    except ValueError as exc:  # e.g. its adapter was removed while it waited: this one alone fails
                        self._fail(p.handle, str(exc))
                        continue
                    text = TextAssembler(self.engine.tokenizer, 0, p.stop, p.truncated, p.handle.submitted_at)
                    active[id(seq)] = (seq, p.handle, text)
                    new.append(seq)
                gen.admit(new)
                if gen.running:
                    self.stats.batch_sizes[len(gen.running)] = self.stats.batch_sizes.get(len(gen.running), 0) + 1
                    events = gen.step()
                    self.stats.steps += 1  # before its tokens are handed out: a client that has them sees it
                    self._dispatch(events, gen, active)
            except Exception as exc:  # a bug or resource failure of the whole step: fail its requests, go on
                log.exception("generation failed")
                for seq, handle, _ in active.values():
                    self._fail(handle, str(exc))
                    gen.finish(seq, "error")
                active.clear()
                gen = self._generator()
            self._observe(gen)
        for _seq, handle, _ in active.values():
            handle.error = "the server is shutting down"
            self._end(handle)
        for _fn, future in self._calls:
            future.set_exception(RuntimeError("the scheduler is closed"))

    def _gather(self, free: int) -> None:
        """Wait (holding `_wake`, which `wait` gives up meanwhile) for the requests that follow the first."""
        if self.gather_gap <= 0:
            return
        deadline = time.monotonic() + self.gather_max
        while not self._closed and len(self._pending) < free:
            waiting, left = len(self._pending), deadline - time.monotonic()
            if left <= 0:
                break
            self._wake.wait(min(self.gather_gap, left))
            if len(self._pending) == waiting:  # none came within the gap (or a call() woke us): go
                break
        self.stats.gathered += 1

    def _generator(self) -> BatchGenerator:
        engine = self.engine
        return BatchGenerator(
            engine.model, self.max_batch, engine.tokenizer.stop_ids, engine.adapters, self.prefix_cache_tokens,
            masks=engine.grammars.mask,
        )  # fmt: skip

    def _observe(self, gen: BatchGenerator) -> None:
        """Publish the loop's state for health checks and /metrics (read from other threads)."""
        cache, stats = gen.cache, self.stats
        stats.running = len(gen.running)
        stats.cache = cache.stats
        stats.kv_bytes = cache.resident_bytes
        stats.kv_used_bytes = cache.used_blocks * cache.block_bytes
        stats.kv_cached_bytes = cache.cached_blocks * cache.block_bytes

    def _fail(self, handle: RequestHandle, reason: str) -> None:
        handle.error = f"generation failed: {reason}"
        self._end(handle)
        self.stats.failed += 1

    def _cancel(
        self, gen: BatchGenerator, active: dict[int, tuple[SequenceState, RequestHandle, TextAssembler]]
    ) -> None:
        for key, (seq, handle, text) in list(active.items()):
            if handle.cancelled:
                gen.finish(seq, "cancelled")
                handle.final = TextChunk(0, "", [], "cancelled", text.completion(seq))
                handle._put(handle.final)
                self._end(handle)
                del active[key]
                self.stats.finished += 1
                self.stats.cancelled += 1

    def _dispatch(self, events: list, gen: BatchGenerator, active: dict) -> None:  # type: ignore[type-arg]
        for ev in events:
            seq, handle, text = active[id(ev.seq)]
            if ev.finish_reason == "error":  # this sequence alone failed; the others of its step go on
                log.warning("request %d failed: %s", handle.id, seq.error)
                self._fail(handle, seq.error or "unknown error")
                del active[id(seq)]
                continue
            chunk = text.on_event(ev, gen)
            self.stats.tokens += 1
            handle._put(chunk)
            if chunk.finish_reason is not None:
                handle.final = chunk
                self._end(handle)
                del active[id(seq)]
                self.stats.finished += 1
