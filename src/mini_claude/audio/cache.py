"""An on-disk cache of synthesized audio, bounded in bytes, least recently used evicted first.

Design choices:
- The key is a SHA-256 of what determines the audio: engine, voice, the spoken text, speed and format (and a
  version, bumped when the pipeline's output changes). Engines are deterministic here (hibari is seeded), so
  a hit is the file a fresh synthesis would give. Open WebUI caches by a hash the same way.
- One file per entry, written to a temporary name and renamed, so a reader never sees half a file and a
  crash leaves no corrupt entry. Recency is the file's mtime (touched on every hit), so the LRU order
  survives restarts; an in-memory index (an `OrderedDict`) keeps lookups and eviction O(1) per entry.
- Counters (hits, misses, evictions) live here; the server exports them to Prometheus.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

VERSION = 1


def cache_key(engine: str, voice: str, text: str, speed: float, fmt: str) -> str:
    payload = json.dumps([VERSION, engine, voice, text, round(speed, 4), fmt], ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0


class AudioCache:
    """Files under `directory`, at most `max_bytes` in all (an entry larger than that is not kept)."""

    def __init__(self, directory: str | os.PathLike[str], max_bytes: int) -> None:
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.stats = CacheStats()
        self._lock = threading.Lock()
        self._index: OrderedDict[str, int] = OrderedDict()  # key -> size, least recently used first
        entries = []
        for path in self.directory.glob("*.audio"):  # the directory is made by the first `put`
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            entries.append((stat.st_mtime, path.stem, stat.st_size))
        for _, key, size in sorted(entries):
            self._index[key] = size
        with self._lock:
            self._evict()

    @property
    def size(self) -> int:
        """Bytes held."""
        return sum(self._index.values())

    def __len__(self) -> int:
        return len(self._index)

    def _path(self, key: str) -> Path:
        return self.directory / f"{key}.audio"

    def get(self, key: str) -> bytes | None:
        """The entry's bytes (and it becomes the most recently used), or None."""
        with self._lock:
            if key in self._index:
                try:
                    data = self._path(key).read_bytes()
                    os.utime(self._path(key))
                except FileNotFoundError:  # removed behind our back
                    del self._index[key]
                else:
                    self._index.move_to_end(key)
                    self.stats.hits += 1
                    return data
            self.stats.misses += 1
            return None

    def put(self, key: str, data: bytes) -> int:
        """Store an entry, evicting the least recently used ones past `max_bytes`; returns how many went."""
        if len(data) > self.max_bytes:
            return 0
        with self._lock:
            self.directory.mkdir(parents=True, exist_ok=True)
            tmp = self.directory / f".{key}.{threading.get_ident()}.tmp"
            tmp.write_bytes(data)
            os.replace(tmp, self._path(key))
            self._index[key] = len(data)
            self._index.move_to_end(key)
            return self._evict()

    def _evict(self) -> int:
        evicted, total = 0, sum(self._index.values())
        while total > self.max_bytes and self._index:
            key, size = self._index.popitem(last=False)
            self._path(key).unlink(missing_ok=True)
            total -= size
            evicted += 1
        self.stats.evictions += evicted
        return evicted
