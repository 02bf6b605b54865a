"""Weight-only quantization: int8 per channel and int4 per group of 32, swapped in for `nn.Linear`.

Why: decoding one token multiplies a vector by every weight matrix, so its speed is set by how many bytes
of weights are read, not by arithmetic. Four-bit weights are a quarter of bf16's bytes. Activations stay in
bf16; only the stored weights are small.

Design (after gpt-fast's `quantize.py`): two phases, first compute quantized tensors, then replace modules.
The matmuls are PyTorch's CPU kernels for packed low-bit weights (`_weight_int8pack_mm`,
`_weight_int4pack_mm_for_cpu`); what is ours is the numerics, written out in `quantize_int8`,
`quantize_int4` and `dequantize_int4`, and tested against the kernels.

- int8: symmetric, one scale per output row: w ~= q * s, q in [-127, 127].
- int4: asymmetric, one (scale, zero) per row and group of 32 inputs: w ~= (q - 8) * s + z, q in [0, 15].
  That is exactly GGUF's Q4_0 (z = 0) and Q4_1 (z = min + 8 s) block format, so the bundled Q4_1 model
  runs on its own quantized values, not on a re-quantization of them.
- Low-bit matmuls win when few rows multiply the weights (decode: one row per sequence). A 500-token
  prefill is compute-bound and runs far faster on dense bf16 weights (AMX/AVX512-BF16), so by default an
  int4 layer also keeps a dense bf16 copy for inputs with more than `DENSE_ROWS` rows: more memory, and
  both the first token and every next token come fast. `keep_dense=False` trades prefill speed for memory.
  The copy is made from the int4 values, not from the original weights: the layer is one model on both
  paths (a quantized model dir, which holds only the int4 values, then loads into exactly these layers).
- The low-bit values themselves (`Int4Blocks`, `Int8Rows`) are plain tensors, independent of any kernel's
  packing: `quantize_weights` computes them (phase 1), `quantize_model` builds the layers from them
  (phase 2), and `checkpoint.save_quantized_dir` stores them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mini_claude.config import ModelConfig

GROUP_SIZE = 32
DENSE_ROWS = 8  # above this many input rows, a dense bf16 matmul beats the int4 kernel on CPU
QUANT_MODES = ("none", "int8", "int4")


# ------------------------------------------------------------------------------------------ numerics


def quantize_int8(w: Tensor, rows_per_chunk: int = 4096) -> tuple[Tensor, Tensor]:
    """Per-row symmetric int8: returns (q int8 (N, K), scales float32 (N,)).

    Works through the rows in chunks so a vocabulary-sized matrix never has a float32 copy in memory.
    """
    q = torch.empty(w.shape, dtype=torch.int8)
    scales = torch.empty(w.shape[0])
    for r in range(0, w.shape[0], rows_per_chunk):
        chunk = w[r : r + rows_per_chunk].float()
        s = chunk.abs().amax(dim=1).clamp(min=1e-8) / 127.0
        q[r : r + rows_per_chunk] = torch.round(chunk / s[:, None]).clamp(-127, 127).to(torch.int8)
        scales[r : r + rows_per_chunk] = s
    return q, scales


def quantize_int4(w: Tensor, group_size: int = GROUP_SIZE) -> tuple[Tensor, Tensor, Tensor]:
    """Per-group asymmetric int4 (min/max): returns (q uint8 (N, K) in [0, 15], scales, zeros (N, K/group))."""
    N, K = w.shape
    if K % group_size:
        raise ValueError(f"input size {K} is not a multiple of the group size {group_size}")
    g = w.float().reshape(N, K // group_size, group_size)
    lo, hi = g.amin(-1), g.amax(-1)
    scales = ((hi - lo) / 15.0).clamp(min=1e-8)
    q = torch.round((g - lo[..., None]) / scales[..., None]).clamp(0, 15).to(torch.uint8)
    zeros = lo + 8 * scales  # so that w = (q - 8) * s + z, the kernel's convention
    return q.reshape(N, K), scales, zeros


def dequantize_int4(q: Tensor, scales: Tensor, zeros: Tensor) -> Tensor:
    N, K = q.shape
    groups = scales.shape[1]
    g = (q.reshape(N, groups, K // groups).float() - 8) * scales[..., None] + zeros[..., None]
    return g.reshape(N, K)


@dataclass
class Int4Blocks:
    """Already-quantized int4 values of one weight (e.g. read from GGUF Q4_0/Q4_1 blocks)."""

    q: Tensor  # (N, K) uint8 in [0, 15]
    scales: Tensor  # (N, K / group_size) float32
    zeros: Tensor  # (N, K / group_size) float32


@dataclass
class Int8Rows:
    """Already-quantized int8 values of one weight: w ~= q * scales[:, None]."""

    q: Tensor  # (N, K) int8 in [-127, 127]
    scales: Tensor  # (N,) float32


QuantizedWeight = Int4Blocks | Int8Rows


# -------------------------------------------------------------------------------------------- modules


class Int8Linear(nn.Module):
    def __init__(self, q: Tensor, scales: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = q.shape[1], q.shape[0]
        self.register_buffer("weight", q.contiguous())
        self.register_buffer("scales", scales.to(torch.bfloat16))
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(torch.bfloat16), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, rows: Int8Rows | None = None) -> Int8Linear:
        rows = rows or Int8Rows(*quantize_int8(linear.weight.detach()))
        return cls(rows.q, rows.scales, linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        y = torch._weight_int8pack_mm(x.reshape(-1, shape[-1]).to(torch.bfloat16), self.weight, self.scales)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)


class Int4Linear(nn.Module):
    def __init__(self, blocks: Int4Blocks, bias: Tensor | None, dense: Tensor | None = None) -> None:
        super().__init__()
        N, K = blocks.q.shape
        self.in_features, self.out_features = K, N
        self.group_size = K // blocks.scales.shape[1]
        # The kernel wants (K/group, N, 2) bf16 [scale, zero] pairs and its own packed nibble layout.
        scales_and_zeros = torch.stack([blocks.scales.t(), blocks.zeros.t()], dim=-1).to(torch.bfloat16)
        self.register_buffer("scales_and_zeros", scales_and_zeros.contiguous())
        self.register_buffer("packed", torch._convert_weight_to_int4pack_for_cpu(blocks.q.to(torch.int32), 8))
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(torch.bfloat16), requires_grad=False)
        self.dense = None if dense is None else dense.detach().to(torch.bfloat16)

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocks: Int4Blocks | None = None, keep_dense: bool = True) -> Int4Linear:
        blocks = blocks or Int4Blocks(*quantize_int4(linear.weight.detach()))
        dense = dequantize_int4(blocks.q, blocks.scales, blocks.zeros) if keep_dense else None
        return cls(blocks, linear.bias, dense)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(torch.bfloat16)
        if self.dense is not None and x2.shape[0] > DENSE_ROWS:
            y = F.linear(x2, self.dense, self.bias)
        else:
            y = torch._weight_int4pack_mm_for_cpu(x2, self.packed, self.group_size, self.scales_and_zeros)
            if self.bias is not None:
                y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)


# ----------------------------------------------------------------------------------------- whole model


def _quantized_layers(
    model: nn.Module, mode: str, given: Mapping[str, QuantizedWeight] | None, skip: tuple[str, ...]
) -> Iterator[tuple[str, nn.Linear, QuantizedWeight]]:
    """Each `nn.Linear` that `mode` replaces, with its low-bit values: taken from `given` when it holds values of
    the kind the layer gets, computed otherwise. One layer at a time, so only one layer's values are new in memory.

    In int4 mode the vocabulary projection (`lm_head`) becomes int8: its rows are read for every token, and it is
    the tensor most sensitive to error (it ranks all next tokens); so does any layer whose input size is not a
    multiple of the group size.
    """
    if mode not in QUANT_MODES:
        raise ValueError(f"unknown quantization {mode!r} (choose from {', '.join(QUANT_MODES)})")
    if mode == "none":
        return
    given = given or {}
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or name in skip:
            continue
        if ".lora_" in name or name.endswith(".base_layer"):  # LoRA-wrapped layers: merge or remove LoRA first
            raise ValueError(f"{name} carries a LoRA adapter: merge it (lora.merge_lora) before quantizing")
        value = given.get(name)
        if mode == "int8" or name == "lm_head" or module.in_features % GROUP_SIZE:
            if not isinstance(value, Int8Rows):
                value = Int8Rows(*quantize_int8(module.weight.detach()))
        elif not isinstance(value, Int4Blocks):
            value = Int4Blocks(*quantize_int4(module.weight.detach()))
        yield name, module, value


def quantize_weights(
    model: nn.Module,
    mode: str,
    given: Mapping[str, QuantizedWeight] | None = None,
    skip: tuple[str, ...] = (),
) -> dict[str, QuantizedWeight]:
    """Phase 1: the low-bit values of every layer `quantize_model(model, mode)` would replace, by module name.

    The model is not changed. `given` supplies exact values (e.g. GGUF Q4_1 blocks), used as they are.
    """
    return {name: value for name, _, value in _quantized_layers(model, mode, given, skip)}


def quantize_model(
    model: nn.Module,
    mode: str,
    blocks: Mapping[str, QuantizedWeight] | None = None,
    keep_dense: bool = True,
    skip: tuple[str, ...] = (),
) -> nn.Module:
    """Phase 2: replace every `nn.Linear` (except names in `skip`) in place; returns the model.

    `blocks` supplies exact low-bit values by module name (GGUF Q4_1 blocks, or the `Int4Blocks` / `Int8Rows`
    of a quantized model dir): a layer given values of the kind it gets is built from them and nothing is
    re-quantized. Embedding lookups stay dense.
    """
    for name, module, value in _quantized_layers(model, mode, blocks, skip):
        if isinstance(value, Int8Rows):
            new: nn.Module = Int8Linear.from_linear(module, value)
        else:
            new = Int4Linear.from_linear(module, value, keep_dense)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    if mode != "none" and isinstance(getattr(model, "config", None), ModelConfig):
        model.config = model.config.replace(quantization={"mode": mode, "group_size": GROUP_SIZE})  # type: ignore[union-attr]
    return model
