"""The audio cache: bounded in bytes, least recently used evicted first, recency kept across restarts."""

from __future__ import annotations

import os
from pathlib import Path

from mini_claude.audio.cache import AudioCache, cache_key


def test_key_depends_on_everything_that_changes_the_audio() -> None:
    base = ("hibari", "hibari:heart", "Hello.", 1.0, "mp3")
    keys = {cache_key(*base)}
    for i, other in enumerate(("espeak-ng", "hibari:emma", "Hello!", 1.25, "wav")):
        changed = list(base)
        changed[i] = other
        keys.add(cache_key(*changed))  # type: ignore[arg-type]
    assert len(keys) == 6
    assert cache_key(*base) == cache_key(*base)


def test_least_recently_used_entries_go_first(tmp_path: Path) -> None:
    cache = AudioCache(tmp_path / "audio", max_bytes=300)
    assert cache.get("a") is None
    for key in "abc":
        assert cache.put(key, key.encode() * 100) == 0
    assert cache.get("a") == b"a" * 100  # now "b" is the least recently used
    assert cache.put("d", b"d" * 100) == 1
    assert cache.get("b") is None
    assert [cache.get(k) is not None for k in "acd"] == [True, True, True]
    assert cache.size == 300 and len(cache) == 3
    assert (cache.stats.hits, cache.stats.misses, cache.stats.evictions) == (4, 2, 1)
    assert sorted(p.name for p in (tmp_path / "audio").iterdir()) == ["a.audio", "c.audio", "d.audio"]


def test_an_entry_larger_than_the_cache_is_not_kept(tmp_path: Path) -> None:
    cache = AudioCache(tmp_path, max_bytes=10)
    cache.put("big", b"x" * 11)
    assert cache.get("big") is None and cache.size == 0


def test_a_restarted_cache_keeps_its_entries_and_their_order(tmp_path: Path) -> None:
    cache = AudioCache(tmp_path, max_bytes=1000)
    for i, key in enumerate("abc"):
        cache.put(key, b"x" * 100)
        os.utime(tmp_path / f"{key}.audio", (1_000_000 + i, 1_000_000 + i))  # distinct mtimes, a < b < c
    os.utime(tmp_path / "a.audio", (2_000_000, 2_000_000))  # "a" was read last
    again = AudioCache(tmp_path, max_bytes=250)  # smaller now: the two oldest by use must go
    assert len(again) == 2 and again.stats.evictions == 1
    assert again.get("b") is None and again.get("a") is not None and again.get("c") is not None
