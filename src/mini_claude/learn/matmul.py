"""Matrix multiplication three ways: pure Python, the same loops compiled by numba, and numpy's BLAS.

C = A B with A (n, k) and B (k, m): C[i, j] = Σ_p A[i, p] · B[p, j], 2·n·k·m floating-point operations.

Design choices:

- **The same loop nest, i-p-j.** The textbook i-j-p order walks B down a column, one cache line per
  element; i-p-j instead scales row p of B by A[i, p] and adds it to row i of C, so the innermost loop
  reads and writes contiguous memory. Both implementations here use it, so the only difference between
  them is the interpreter.
- **Pure Python** works on lists of lists: every `+=` is a bytecode dispatch, a float object allocated and
  two reference counts changed, roughly 50–100 ns per multiply-add.
- **numba** (`@njit`, LLVM) compiles the identical loops to machine code on the first call with those
  argument types; the inner loop becomes a vectorised fused multiply-add over a contiguous row. The first
  call pays the compilation (benchmarks leave it out). `fastmath` stays off so the sums are done in the
  written order, like Python's.
- **numpy's `@`** calls the BLAS `dgemm` (OpenBLAS here), which adds what our loops lack: cache blocking
  (tiles of A and B that stay in L1/L2), register tiling in hand-written assembly kernels, and threads.
  `bench/bench_matmul.py` measures the gap.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numba import njit


def matmul_python(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]]) -> list[list[float]]:
    """A (n, k) @ B (k, m) on lists of lists, in pure Python (i-p-j loop order)."""
    k, m = len(b), len(b[0]) if b else 0
    if any(len(row) != k for row in a):
        raise ValueError(f"inner dimensions differ: A has rows of length {len(a[0]) if a else 0}, B has {k} rows")
    out = []
    for row in a:  # row i of A
        c_row = [0.0] * m
        for a_ip, b_row in zip(row, b, strict=True):  # A[i, p] and row p of B
            for j in range(m):
                c_row[j] += a_ip * b_row[j]
        out.append(c_row)
    return out


@njit(cache=False, fastmath=False)
def _matmul_numba(a: np.ndarray, b: np.ndarray, out: np.ndarray) -> None:
    n, k = a.shape
    m = b.shape[1]
    for i in range(n):
        for p in range(k):
            a_ip = a[i, p]
            for j in range(m):
                out[i, j] += a_ip * b[p, j]


def matmul_numba(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """A (n, k) @ B (k, m) with the i-p-j loops compiled by numba (float64, C-contiguous copies)."""
    a = np.ascontiguousarray(a, dtype=np.float64)
    b = np.ascontiguousarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"cannot multiply {a.shape} by {b.shape}")
    out = np.zeros((a.shape[0], b.shape[1]))  # (n, m)
    _matmul_numba(a, b, out)
    return out


def matmul_numpy(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """A @ B through numpy, i.e. the BLAS dgemm numpy links against."""
    return np.asarray(a, dtype=np.float64) @ np.asarray(b, dtype=np.float64)
