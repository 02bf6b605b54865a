"""2-D convolution, from scratch in numpy: one channel first, then a layer with many, forward and backward.

What deep-learning libraries call convolution is *cross-correlation*: the kernel slides over the image
without being flipped (`torch.nn.functional.conv2d` does exactly this). For one channel, a kh × kw kernel
k, stride s and zero padding p:

    out[y, x] = Σ_{i<kh, j<kw} k[i, j] · x_pad[s·y + i, s·x + j],     H_out = ⌊(H + 2p − kh) / s⌋ + 1

Design choices:

- **One primitive, `conv2d_single`.** Instead of sliding the kernel pixel by pixel it loops over the kh·kw
  kernel *taps*: for tap (i, j) the pixels it touches across all outputs form a strided view
  x_pad[i : : s, j : : s], so the whole output is Σ_taps k[i, j] · view — kh·kw vectorised multiply-adds and
  no im2col copy. Leading axes broadcast, so one call convolves a whole batch of single-channel images.
- **Backward is the same walk, reversed.** Each tap contributed k[i, j] · view to the output, so
  ∂L/∂k[i, j] = Σ d_out · view, and ∂L/∂x_pad gets k[i, j] · d_out added back into the same strided view;
  cropping the padding gives ∂L/∂x. (Pixels that a stride or the right edge never reaches get zero.)
- **`Conv2D` is a double loop over `conv2d_single`.** Output channel f is Σ_c x[:, c] ⋆ w[f, c] + bias[f]:
  F·C single-channel convolutions. That is slow next to a GEMM-based kernel, and it is the definition.
- Shapes follow torch: x (N, C, H, W), weight (F, C, kh, kw), bias (F,), out (N, F, H_out, W_out), so
  weights copy across to `F.conv2d` one to one.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

Pair = int | tuple[int, int]


def _pair(v: Pair) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _out_size(size: int, k: int, s: int, p: int) -> int:
    n = (size + 2 * p - k) // s + 1
    if n < 1:
        raise ValueError(f"kernel {k} with padding {p} does not fit an input of size {size}")
    return n


def _taps(
    xp: np.ndarray, kh: int, kw: int, out_hw: tuple[int, int], stride: tuple[int, int]
) -> Iterator[tuple[int, int, tuple[Any, slice, slice]]]:
    """(i, j, view) for each kernel tap: the strided window of `xp` (..., Hp, Wp) that tap (i, j) multiplies."""
    (ho, wo), (sh, sw) = out_hw, stride
    for i in range(kh):
        for j in range(kw):
            yield i, j, (..., slice(i, i + sh * (ho - 1) + 1, sh), slice(j, j + sw * (wo - 1) + 1, sw))


def _pad(x: np.ndarray, padding: tuple[int, int]) -> np.ndarray:
    ph, pw = padding
    return np.pad(x, [(0, 0)] * (x.ndim - 2) + [(ph, ph), (pw, pw)])


def conv2d_single(x: np.ndarray, kernel: np.ndarray, stride: Pair = 1, padding: Pair = 0) -> np.ndarray:
    """Cross-correlate single-channel images with one kernel.

    Args:
        x: (..., H, W); leading axes (e.g. a batch) are carried through.
        kernel: (kh, kw).
        stride, padding: an int or (vertical, horizontal); padding is with zeros on both sides.

    Returns:
        (..., H_out, W_out).
    """
    kh, kw = kernel.shape
    s, p = _pair(stride), _pair(padding)
    out_hw = (_out_size(x.shape[-2], kh, s[0], p[0]), _out_size(x.shape[-1], kw, s[1], p[1]))
    xp = _pad(x, p)  # (..., H + 2ph, W + 2pw)
    out = np.zeros((*x.shape[:-2], *out_hw), dtype=np.result_type(x, kernel))  # (..., H_out, W_out)
    for i, j, view in _taps(xp, kh, kw, out_hw, s):
        out += kernel[i, j] * xp[view]
    return out


def conv2d_single_backward(
    x: np.ndarray, kernel: np.ndarray, d_out: np.ndarray, stride: Pair = 1, padding: Pair = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Gradients of `conv2d_single`: (∂L/∂x with x's shape, ∂L/∂kernel (kh, kw), summed over leading axes)."""
    kh, kw = kernel.shape
    s, p = _pair(stride), _pair(padding)
    xp = _pad(x, p)
    dxp = np.zeros_like(xp, dtype=np.result_type(x, kernel))  # (..., Hp, Wp)
    dk = np.zeros_like(kernel, dtype=np.result_type(x, kernel))  # (kh, kw)
    for i, j, view in _taps(xp, kh, kw, d_out.shape[-2:], s):
        dk[i, j] = (d_out * xp[view]).sum()
        dxp[view] += kernel[i, j] * d_out
    H, W = x.shape[-2:]
    return dxp[..., p[0] : p[0] + H, p[1] : p[1] + W], dk


class Conv2D:
    """A convolution layer: `in_channels` → `out_channels`, kernel, stride, zero padding, optional bias."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Pair,
        stride: Pair = 1,
        padding: Pair = 0,
        bias: bool = True,
        seed: int = 0,
        dtype: type = np.float64,
    ) -> None:
        kh, kw = _pair(kernel_size)
        self.stride, self.padding = _pair(stride), _pair(padding)
        rng = np.random.default_rng(seed)
        bound = 1.0 / np.sqrt(in_channels * kh * kw)  # torch's default: U(−1/√fan_in, 1/√fan_in)
        self.params = {"weight": rng.uniform(-bound, bound, (out_channels, in_channels, kh, kw)).astype(dtype)}
        if bias:
            self.params["bias"] = rng.uniform(-bound, bound, out_channels).astype(dtype)
        self.grads = {k: np.zeros_like(v) for k, v in self.params.items()}
        self._x: np.ndarray | None = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        """(N, C, H, W) -> (N, F, H_out, W_out)."""
        w = self.params["weight"]  # (F, C, kh, kw)
        F_, C = w.shape[:2]
        if x.shape[1] != C:
            raise ValueError(f"expected {C} input channels, got {x.shape[1]}")
        self._x = x
        out = np.stack(
            [sum(conv2d_single(x[:, c], w[f, c], self.stride, self.padding) for c in range(C)) for f in range(F_)],
            axis=1,
        )  # (N, F, H_out, W_out)
        if "bias" in self.params:
            out = out + self.params["bias"][None, :, None, None]
        return out

    def backward(self, d_out: np.ndarray) -> np.ndarray:
        """∂L/∂x for the last `forward`, given ∂L/∂out (N, F, H_out, W_out); sets `grads`."""
        if self._x is None:
            raise RuntimeError("backward needs a forward pass first")
        x, w = self._x, self.params["weight"]
        F_, C = w.shape[:2]
        dx = np.zeros_like(x, dtype=np.result_type(x, w))  # (N, C, H, W)
        dw = np.zeros_like(w)  # (F, C, kh, kw)
        for f in range(F_):
            for c in range(C):
                dxc, dw[f, c] = conv2d_single_backward(x[:, c], w[f, c], d_out[:, f], self.stride, self.padding)
                dx[:, c] += dxc
        self.grads["weight"] = dw
        if "bias" in self.params:
            self.grads["bias"] = d_out.sum(axis=(0, 2, 3))  # (F,)
        return dx
