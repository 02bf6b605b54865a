"""Near-duplicate detection: character shingles, their Jaccard index, and MinHash signatures banded for LSH.

MinHash + LSH (Broder, 1997; Leskovec et al., "Mining of Massive Datasets", ch. 3) finds the pairs of texts
whose shingle sets are similar without comparing all pairs: texts that share a band of their signature become
candidates, and the exact Jaccard index decides. `train.data.deduplicate` and `train.augment` both use it.
"""

from __future__ import annotations

import zlib

import numpy as np


def shingles(text: str, k: int = 5) -> set[str]:
    """Character k-grams of the lowercased, whitespace-collapsed text (the whole text if shorter than k)."""
    t = " ".join(text.lower().split())
    return {t[i : i + k] for i in range(len(t) - k + 1)} or {t}


def jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


class MinHashLSH:
    """MinHash signatures over 32-bit shingle hashes, bucketed by band for candidate lookup.

    h_i(x) = (a_i * x + b_i) mod p with p = 2^32 - 5 (prime); with x, a_i, b_i < 2^32 the product fits in
    uint64, so numpy computes all permutations of all shingles in one vectorised step.
    """

    PRIME = np.uint64(4294967291)

    def __init__(self, num_perm: int = 128, bands: int = 16, seed: int = 0) -> None:
        if num_perm % bands:
            raise ValueError(f"num_perm={num_perm} must be divisible by bands={bands}")
        rng = np.random.default_rng(seed)
        self.a = rng.integers(1, int(self.PRIME), num_perm, dtype=np.uint64)
        self.b = rng.integers(0, int(self.PRIME), num_perm, dtype=np.uint64)
        self.bands, self.rows = bands, num_perm // bands
        self.buckets: list[dict[bytes, list[int]]] = [{} for _ in range(bands)]

    def signature(self, grams: set[str]) -> np.ndarray:
        x = np.fromiter((zlib.crc32(g.encode()) for g in grams), dtype=np.uint64, count=len(grams))
        return ((x[:, None] * self.a + self.b) % self.PRIME).min(axis=0)  # (S, P) -> (P,)

    def candidates(self, sig: np.ndarray) -> set[int]:
        found: set[int] = set()
        for band, table in enumerate(self.buckets):
            found.update(table.get(sig[band * self.rows : (band + 1) * self.rows].tobytes(), ()))
        return found

    def insert(self, key: int, sig: np.ndarray) -> None:
        for band, table in enumerate(self.buckets):
            table.setdefault(sig[band * self.rows : (band + 1) * self.rows].tobytes(), []).append(key)
