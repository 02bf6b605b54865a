"""Continuous batching: many concurrent requests share one model, one KV cache and one decode loop.

A single background thread owns a `BatchGenerator` (the model is not thread-safe, and one forward for all
running sequences is what makes concurrent decoding cheap). Callers on any thread or event loop `submit()`
a prompt and get a `RequestHandle`, an iterator (sync or async) of the same `TextChunk`s `Engine.stream`
produces. Between two decode steps the loop admits waiting requests into free cache slots (prefilling them
together in one forward), applies cancellations, and hands each new token to its request's
`TextAssembler`. A slow consumer never blocks the loop: chunks wait in its own queue.

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
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field

from mini_claude.engine import Engine, TextAssembler, TextChunk
from mini_claude.generate import BatchGenerator, SamplingParams, SequenceState

log = logging.getLogger(__name__)

_DONE = object()


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
        try:
            while (item := await self._async.get()) is not _DONE:
                yield item  # type: ignore[misc]
        finally:  # the consumer stopped early (client disconnected): stop generating for it
            if self.final is None:
                self.cancel()
        if self.error:
            raise RuntimeError(self.error)


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
    steps: int = 0
    tokens: int = 0
    batch_sizes: dict[int, int] = field(default_factory=dict)  # decode batch size -> number of steps


class Scheduler:
    def __init__(self, engine: Engine, max_batch: int = 8) -> None:
        self.engine = engine
        self.max_batch = max_batch
        self.stats = SchedulerStats()
        self._ids = itertools.count(1)
        self._pending: deque[_Pending] = deque()
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
        with self._wake:
            self._pending.append(_Pending(handle, ids, params, stop, truncated, adapter))
            self.stats.waiting = len(self._pending)
            self._wake.notify()
        return handle

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
        gen = self._generator()
        active: dict[int, tuple[SequenceState, RequestHandle, TextAssembler]] = {}
        while True:
            with self._wake:
                while not self._closed and not self._pending and not gen.running:
                    self._wake.wait()
                if self._closed:
                    break
                admitted = [self._pending.popleft() for _ in range(min(gen.n_free, len(self._pending)))]
                self.stats.waiting = len(self._pending)
            for p in [p for p in admitted if p.handle.cancelled]:  # gave up while waiting: no prefill for it
                admitted.remove(p)
                p.handle._put(_DONE)
                self.stats.cancelled += 1
            try:
                self._cancel(gen, active)
                new = []
                for p in admitted:
                    seq = gen.new_sequence(p.prompt_ids, p.params, p.adapter)
                    text = TextAssembler(self.engine.tokenizer, 0, p.stop, p.truncated, p.handle.submitted_at)
                    active[id(seq)] = (seq, p.handle, text)
                    new.append(seq)
                if new:
                    self._dispatch(gen.add(new), gen, active)
                if gen.running:
                    self.stats.batch_sizes[len(gen.running)] = self.stats.batch_sizes.get(len(gen.running), 0) + 1
                    self._dispatch(gen.step(), gen, active)
                    self.stats.steps += 1
            except Exception as exc:  # a bug or resource failure: fail these requests, keep serving others
                log.exception("generation failed")
                for seq, handle, _ in active.values():
                    handle.error = f"generation failed: {exc}"
                    handle._put(_DONE)
                    gen.finish(seq, "error")
                active.clear()
                gen = self._generator()
            self.stats.running = len(gen.running)
        for _seq, handle, _ in active.values():
            handle.error = "the server is shutting down"
            handle._put(_DONE)

    def _generator(self) -> BatchGenerator:
        return BatchGenerator(self.engine.model, self.max_batch, self.engine.tokenizer.stop_ids, self.engine.adapters)

    def _cancel(
        self, gen: BatchGenerator, active: dict[int, tuple[SequenceState, RequestHandle, TextAssembler]]
    ) -> None:
        for key, (seq, handle, text) in list(active.items()):
            if handle.cancelled:
                gen.finish(seq, "cancelled")
                handle.final = TextChunk(0, "", [], "cancelled", text.completion(seq))
                handle._put(handle.final)
                handle._put(_DONE)
                del active[key]
                self.stats.finished += 1
                self.stats.cancelled += 1

    def _dispatch(self, events: list, gen: BatchGenerator, active: dict) -> None:  # type: ignore[type-arg]
        for ev in events:
            seq, handle, text = active[id(ev.seq)]
            chunk = text.on_event(ev, gen)
            self.stats.tokens += 1
            handle._put(chunk)
            if chunk.finish_reason is not None:
                handle.final = chunk
                handle._put(_DONE)
                del active[id(seq)]
                self.stats.finished += 1
