"""Shared helpers of the learn/ tests: relative error and central finite differences."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def rel_error(ours: np.ndarray, ref: np.ndarray) -> float:
    """‖ours − ref‖ / ‖ref‖ over the whole array (0 when both are zero)."""
    diff, scale = np.linalg.norm(np.asarray(ours) - np.asarray(ref)), np.linalg.norm(ref)
    return float(diff / scale) if scale else float(diff)


def numeric_grad(loss: Callable[[], float], x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """∂loss/∂x by central differences, perturbing `x` in place one element at a time (and restoring it)."""
    grad = np.zeros_like(x)
    flat, g = x.reshape(-1), grad.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + eps
        up = loss()
        flat[i] = old - eps
        down = loss()
        flat[i] = old
        g[i] = (up - down) / (2 * eps)
    return grad
