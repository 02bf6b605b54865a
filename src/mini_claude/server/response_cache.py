"""A bounded in-memory cache of deterministic replies: the same request gets the same answer without the model.

Design choices:
- Opt-in (`Settings.response_cache_size`, entries; 0 turns it off): a cache changes what "ask again" means,
  which is a decision for whoever runs the server.
- Only deterministic jobs are cached: every choice greedy (temperature 0) or seeded. The key is everything
  that decides the tokens: the model id the client named (base or adapter), the prompt ids and the sampling
  parameters of every choice (a frozen dataclass: the token budget, the seed, the penalties, `ignore_eos`),
  and the stop strings. Requests that differ in anything else (user, metadata, stream or not) share entries.
- A hit replays the chunks the original generation produced, in order, through the same path as a live
  generation (`generation.py` reads a `CachedReply` exactly as it reads a scheduler's `RequestHandle`): the
  stream looks like a real one, the reply is stored in its conversation, and usage is the same.
- Dropped whenever the models change: the adapters' `version` is part of every lookup, and a new version
  empties the cache (a re-trained adapter loaded under an old name must not answer with the old weights).
- Least recently used entries go first when the cache is full.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Hashable, Sequence
from dataclasses import dataclass

from mini_claude.engine import TextChunk
from mini_claude.generate import SamplingParams


@dataclass
class ResponseCacheStats:
    hits: int = 0
    misses: int = 0
    entries: int = 0


def cacheable(params: Sequence[SamplingParams]) -> bool:
    """Whether every choice gives the same tokens each time it runs."""
    return bool(params) and all(p.temperature == 0 or p.seed is not None for p in params)


class CachedReply:
    """One choice of a cached answer, read like a `RequestHandle`: `async for` gives its chunks."""

    def __init__(self, chunks: list[TextChunk]) -> None:
        self.chunks = chunks
        self.final: TextChunk | None = None
        self.error: str | None = None

    def cancel(self) -> None:
        """Nothing runs for a cached answer."""

    async def __aiter__(self) -> AsyncIterator[TextChunk]:
        for chunk in self.chunks:
            yield chunk
        self.final = self.chunks[-1]


class ResponseCache:
    def __init__(self, size: int) -> None:
        self.size = size
        self.stats = ResponseCacheStats()
        self._entries: OrderedDict[Hashable, list[list[TextChunk]]] = OrderedDict()
        self._version: object = None
        self._lock = threading.Lock()  # the web UI may call from worker threads

    @property
    def enabled(self) -> bool:
        return self.size > 0

    def key(
        self, version: object, model: str, prompts: Sequence[list[int]], params: Sequence[SamplingParams],
        stop: Sequence[str],
    ) -> Hashable | None:  # fmt: skip
        """The lookup key of a job, or None when it must not be cached (off, or not deterministic)."""
        if not self.enabled or not cacheable(params):
            return None
        return (version, model, tuple(tuple(p) for p in prompts), tuple(params), tuple(stop))

    def get(self, key: Hashable) -> list[CachedReply] | None:
        """The cached choices of `key` (counting a hit or a miss)."""
        with self._lock:
            self._check_version(key)
            choices = self._entries.get(key)
            if choices is None:
                self.stats.misses += 1
                return None
            self._entries.move_to_end(key)
            self.stats.hits += 1
            return [CachedReply(chunks) for chunks in choices]

    def put(self, key: Hashable, choices: list[list[TextChunk]]) -> None:
        """Keep a finished job's chunks, per choice; a cancelled or failed job is never stored."""
        if not all(choices) or any(c[-1].completion is None for c in choices):
            return
        with self._lock:
            self._check_version(key)
            self._entries[key] = choices
            self._entries.move_to_end(key)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
            self.stats.entries = len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.stats.entries = 0

    def _check_version(self, key: Hashable) -> None:
        version = key[0]  # type: ignore[index]
        if version != self._version:  # the models changed: nothing cached before may answer now
            self._entries.clear()
            self._version = version
            self.stats.entries = 0
