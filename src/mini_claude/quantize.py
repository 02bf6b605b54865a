"""Weight-only quantization: int8 per channel and int4 per group of 32, swapped in for `nn.Linear`.

Why: decoding one token multiplies a vector by every weight matrix, so its speed is set by how many bytes
of weights are read, not by arithmetic. Four-bit weights are a quarter of bf16's bytes. Activations stay in
bf16; only the stored weights are small.

Design (after gpt-fast's `quantize.py`): two phases, first compute quantized tensors, then replace modules.
The matmuls are our C++ kernels (`kernels/`: integer dot products per block of 32 on int16 activations),
whose tile layout `pack_int4` / `pack_int8` make at load time; without them, PyTorch's CPU kernels for packed
low-bit weights (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`). The numerics are written out in
`quantize_int8`, `quantize_int4` and `dequantize_int4`/`dequantize_int8`, and tested against the kernels.

- int8: symmetric, w ~= q * s, q in [-127, 127], one scale per output row (made here) or per block of 32 (the
  file's Q8_0, kept exactly: `Int8Blocks`).
- int4: asymmetric, one (scale, zero) per row and group of 32 inputs: w ~= (q - 8) * s + z, q in [0, 15].
  That is exactly GGUF's Q4_0 (z = 0) and Q4_1 (z = min + 8 s) block format, so the bundled Q4_1 model
  runs on its own quantized values, not on a re-quantization of them.
- Low-bit matmuls win when few rows multiply the weights (decode: one row per sequence). A 500-token
  prefill is compute-bound and runs far faster on dense bf16 weights where the CPU multiplies bf16 natively
  (AMX/AVX512-BF16), so there an int4 layer also keeps a dense bf16 copy for inputs with more than
  `DENSE_ROWS` rows: more memory, and both the first token and every next token come fast. Elsewhere (AVX2)
  the copy would be float32 and is not kept (`keeps_dense_copy`). `keep_dense=False` trades prefill speed
  for memory. The copy is made from the int4 values, not from the original weights: the layer is one model on both
  paths (a quantized model dir, which holds only the int4 values, then loads into exactly these layers).
- The low-bit values themselves (`Int4Blocks`, `Int8Blocks`) are plain tensors, independent of any kernel's
  packing: `quantize_weights` computes them (phase 1), `quantize_model` builds the layers from them
  (phase 2), and `checkpoint.save_quantized_dir` stores them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mini_claude import kernels
from mini_claude.config import ModelConfig

GROUP_SIZE = 32
DENSE_ROWS = 8  # above this many input rows, a dense matmul beats the int4 kernel on CPU


def dense_dtype() -> torch.dtype:
    """The dtype of an int4 layer's dense prefill copy: bf16 where the CPU multiplies it natively, else float32
    (emulated bf16 matmuls would make prefill slower than the int4 kernel itself)."""
    return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32


def keeps_dense_copy() -> bool:
    """Whether int4 layers keep a dense copy for prefill unless told otherwise.

    Yes where the CPU multiplies bf16 natively: a bf16 GEMM beats the int4 kernel from `DENSE_ROWS` rows on.
    Without that the copy would be float32, twice bf16's bytes (about 425 MB for SmolLM2-135M, which broke the
    1.5 GB budget of eight 1,000-token conversations), and on an AVX2-only EPYC (Zen 3, 2 threads) our int4
    kernel was 2x faster than float32 GEMM at 32 rows, as fast at 128, and 1.4x slower only at 512. So with our
    kernels the copy is dropped there; without them PyTorch's int4 kernel is far slower than a dense one."""
    return dense_dtype() == torch.bfloat16 or kernels.load() is None


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


def dequantize_int8(blocks: Int8Blocks) -> Tensor:
    N, K = blocks.q.shape
    groups = blocks.scales.shape[1]
    return (blocks.q.reshape(N, groups, K // groups).float() * blocks.scales.float()[..., None]).reshape(N, K)


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
class Int8Blocks:
    """Already-quantized int8 values of one weight: w = q * scale, one scale per group of K / G inputs.

    GGUF's Q8_0 (the usual type of a tied embedding) is G = K / 32; `quantize_int8`'s per-row scales are G = 1.
    """

    q: Tensor  # (N, K) int8
    scales: Tensor  # (N, G) float32


QuantizedWeight = Int4Blocks | Int8Blocks


# ---------------------------------------------------------------------------------- kernel layouts
# Our kernels (kernels/csrc/lowbit.cpp) read weights in tiles of 4 output rows and pairs of 32-weight blocks
# along K. Inside a pair, byte j of a row holds weight 4t+e of block b in its low nibble and weight 4t+2+e in
# its high nibble (j = 4t + 2b + e); the kernel's comment explains why. Rows and blocks are zero-padded.

TILE = 4
_SLOT = torch.arange(32)
LO_SRC = (_SLOT // 2 % 2) * 32 + 4 * (_SLOT // 4) + _SLOT % 2  # pair-local weight index in slot j (low nibble)
HI_SRC = LO_SRC + 2


def _pad(t: Tensor, rows: int, cols: int) -> Tensor:
    return F.pad(t, (0, cols - t.shape[1], 0, rows - t.shape[0]))


def _exact_dtype(*tensors: Tensor) -> torch.dtype:
    """float16 if every value survives the round trip (GGUF's scales do: they are stored as fp16), else float32."""
    exact = all(torch.equal(t.to(torch.float16).float(), t.float()) for t in tensors)
    return torch.float16 if exact else torch.float32


def _tile_scales(s: Tensor, n_rows: int, pairs: int, dtype: torch.dtype) -> Tensor:
    """(N, G) per-block values -> (tiles, pairs, 4, 2), the order the kernel reads them."""
    s = _pad(s.float(), n_rows, 2 * pairs).to(dtype)
    return s.view(n_rows // TILE, TILE, pairs, 2).transpose(1, 2).contiguous()


def pack_int4(blocks: Int4Blocks) -> dict[str, Tensor]:
    """Int4Blocks (w = (q - 8) s + z) -> the kernel's qweight (T, P, 4, 32) uint8, scales d = s and mins
    m = z - 8 s, as w = d q + m: (T, P, 4, 2) and (T, 4, 2P)."""
    q, d = blocks.q, blocks.scales.float()
    m = blocks.zeros.float() - 8 * d
    N, K = q.shape
    if K % GROUP_SIZE or d.shape[1] != K // GROUP_SIZE:
        raise ValueError("the kernels need blocks of 32 weights")
    pairs, n_rows = (K // GROUP_SIZE + 1) // 2, -(-N // TILE) * TILE
    qp = _pad(q, n_rows, 64 * pairs).view(n_rows, pairs, 64)
    nibbles = qp[..., LO_SRC] | (qp[..., HI_SRC] << 4)  # (N', P, 32)
    dtype = _exact_dtype(d, m)
    mins = _pad(m, n_rows, 2 * pairs).to(dtype).view(n_rows // TILE, TILE, 2 * pairs).contiguous()
    return {
        "qweight": nibbles.view(n_rows // TILE, TILE, pairs, 32).transpose(1, 2).contiguous(),
        "scales": _tile_scales(d, n_rows, pairs, dtype),
        "mins": mins,
    }


def pack_int8(blocks: Int8Blocks) -> dict[str, Tensor]:
    """Int8Blocks -> the kernel's qweight (T, P, 4, 64) int8 and per-block scales (T, P, 4, 2)."""
    q, s = blocks.q, blocks.scales.float()
    N, K = q.shape
    if K % GROUP_SIZE or (K // GROUP_SIZE) % s.shape[1]:
        raise ValueError("the kernels need scales per block of 32 weights or coarser")
    s = s.repeat_interleave(K // GROUP_SIZE // s.shape[1], dim=1)  # one scale per block of 32
    pairs, n_rows = (K // GROUP_SIZE + 1) // 2, -(-N // TILE) * TILE
    qp = _pad(q, n_rows, 64 * pairs).view(n_rows, pairs, 64)
    both = torch.cat([qp[..., LO_SRC], qp[..., HI_SRC]], dim=-1)  # (N', P, 64)
    return {
        "qweight": both.view(n_rows // TILE, TILE, pairs, 64).transpose(1, 2).contiguous(),
        "scales": _tile_scales(s, n_rows, pairs, _exact_dtype(s)),
    }


# -------------------------------------------------------------------------------------------- modules


class _LowBitLinear(nn.Module):
    """What the int8 and int4 layers share: our kernel's packed buffers, cut into row views for fused layers."""

    in_features: int
    out_features: int
    float_out = False  # return float32 whatever the input dtype (the vocabulary head: logits rank tokens)

    def _set_packed(self, packed: dict[str, Tensor], bias: Tensor | None) -> None:
        for name, t in packed.items():
            self.register_buffer(name, t)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().contiguous(), requires_grad=False)

    def _like(self, out_features: int, buffers: dict[str, Tensor], bias: Tensor | None) -> _LowBitLinear:
        """A layer of this class and settings over other packed buffers (no packing, no copies)."""
        layer = type(self).__new__(type(self))
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = self.in_features, out_features
        for name in self._settings:
            setattr(layer, name, getattr(self, name))
        for name, t in buffers.items():
            layer.register_buffer(name, t)
        layer.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        return layer

    _settings: tuple[str, ...] = ("kernel", "float_out")

    def rows(self, start: int, stop: int) -> _LowBitLinear:
        """The layer of output rows [start, stop), as views of this layer's buffers (both multiples of 4).

        A fused q/k/v layer runs one matmul; its q_proj, k_proj and v_proj stay real layers (LoRA adapters wrap
        them) whose weights are these views, so fusing costs no memory.
        """
        if start % TILE or stop % TILE or not self.kernel:
            raise ValueError("row views need our kernel's layout and multiples of 4 rows")
        buffers = {name: t[start // TILE : stop // TILE] for name, t in self.named_buffers(recurse=False)}
        layer = self._like(stop - start, buffers, None if self.bias is None else self.bias[start:stop])
        if getattr(self, "dense", None) is not None:
            layer.dense = self.dense[start:stop]  # type: ignore[index]
        return layer

    def to_stack(self, ops: ModuleType) -> Any | None:
        """This layer as one linear of the kernels' `DecodeStack` (the same call `forward` makes on the decode
        path), or None when `forward` would not call our kernel."""
        return None

    @staticmethod
    def fusable(layers: list[nn.Module]) -> bool:
        """Whether `layers` can become one matmul: same class and input, our layout, whole tiles of rows."""
        first = layers[0]
        return (
            isinstance(first, _LowBitLinear)
            and all(type(m) is type(first) for m in layers)
            and all(getattr(m, "kernel", False) and m.in_features == first.in_features for m in layers)  # type: ignore[union-attr]
            and all(m.out_features % TILE == 0 and m.float_out == first.float_out for m in layers)  # type: ignore[union-attr]
            and len({getattr(m, "dense", None) is None for m in layers}) == 1
        )

    @staticmethod
    def concat(layers: list[_LowBitLinear]) -> _LowBitLinear:
        """One layer that computes all of `layers` (same input) in one matmul, outputs side by side."""
        if not _LowBitLinear.fusable(layers):  # type: ignore[arg-type]
            raise ValueError("these layers cannot be fused")
        first = layers[0]
        buffers = {}
        for name, t in first.named_buffers(recurse=False):
            parts = [dict(m.named_buffers(recurse=False))[name] for m in layers]
            dtype = torch.float32 if any(p.dtype == torch.float32 for p in parts) else t.dtype  # fp16 or fp32 scales
            buffers[name] = torch.cat([p.to(dtype) for p in parts])
        biases = [m.bias for m in layers]
        bias = None
        if any(b is not None for b in biases):
            zeros = [torch.zeros(m.out_features) for m in layers]
            bias = torch.cat([b if b is not None else z for b, z in zip(biases, zeros, strict=True)])
        fused = first._like(sum(m.out_features for m in layers), buffers, bias)
        if getattr(first, "dense", None) is not None:
            fused.dense = torch.cat([m.dense for m in layers])  # type: ignore[misc]
        return fused


class Int8Linear(_LowBitLinear):
    """int8 weights: our kernel on per-block scales when it is available, else PyTorch's per-row kernel."""

    def __init__(self, blocks: Int8Blocks, bias: Tensor | None, float_out: bool = False) -> None:
        super().__init__()
        self.out_features, self.in_features = blocks.q.shape
        self.float_out = float_out
        self.kernel = kernels.load() is not None and self.in_features % GROUP_SIZE == 0
        if self.kernel:
            self._set_packed(pack_int8(blocks), bias)
            return
        q, scales = blocks.q, blocks.scales
        if scales.shape[1] != 1:  # PyTorch's kernel has one scale per row: re-quantize the dequantized rows
            q, scales = quantize_int8(dequantize_int8(blocks))
        self.register_buffer("weight", q.contiguous())
        self.register_buffer("scales", scales.reshape(-1).to(torch.bfloat16))
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(torch.bfloat16), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocks: Int8Blocks | None = None, float_out: bool = False) -> Int8Linear:
        if blocks is None:
            q, s = quantize_int8(linear.weight.detach())
            blocks = Int8Blocks(q, s[:, None])
        return cls(blocks, linear.bias, float_out)

    def to_stack(self, ops: ModuleType) -> Any | None:
        if not self.kernel or self.float_out:
            return None
        return ops.StackLinear(
            2, self.qweight, self.scales, None, self.bias, None, self.in_features, self.out_features
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        if self.kernel:
            ops = kernels.load()
            return ops.q8_linear(x, self.qweight, self.scales, self.bias, self.out_features, self.float_out)  # type: ignore[union-attr]
        shape = x.shape
        y = torch._weight_int8pack_mm(x.reshape(-1, shape[-1]).to(torch.bfloat16), self.weight, self.scales)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features).to(torch.float32 if self.float_out else x.dtype)


class Int4Linear(_LowBitLinear):
    """int4 weights in groups of 32, plus (where `keeps_dense_copy()`) a dense bf16 copy for many-row inputs."""

    _settings = ("kernel", "float_out", "group_size")
    dense: Tensor | None = None  # the dense prefill copy, where one is kept (row views and fused layers too)

    def __init__(self, blocks: Int4Blocks, bias: Tensor | None, dense: Tensor | None = None) -> None:
        super().__init__()
        N, K = blocks.q.shape
        self.in_features, self.out_features = K, N
        self.group_size = K // blocks.scales.shape[1]
        self.dense = None if dense is None else dense.detach().to(dense_dtype())
        self.kernel = kernels.load() is not None and self.group_size == GROUP_SIZE
        if self.kernel:
            self._set_packed(pack_int4(blocks), bias)
            return
        # PyTorch's kernel wants (K/group, N, 2) bf16 [scale, zero] pairs and its own packed nibble layout.
        scales_and_zeros = torch.stack([blocks.scales.t(), blocks.zeros.t()], dim=-1).to(torch.bfloat16)
        self.register_buffer("scales_and_zeros", scales_and_zeros.contiguous())
        self.register_buffer("packed", torch._convert_weight_to_int4pack_for_cpu(blocks.q.to(torch.int32), 8))
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(torch.bfloat16), requires_grad=False)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, blocks: Int4Blocks | None = None, keep_dense: bool | None = None
    ) -> Int4Linear:
        """`keep_dense` None: as `keeps_dense_copy()` says for this CPU."""
        blocks = blocks or Int4Blocks(*quantize_int4(linear.weight.detach()))
        keep = keeps_dense_copy() if keep_dense is None else keep_dense
        dense = dequantize_int4(blocks.q, blocks.scales, blocks.zeros) if keep else None
        return cls(blocks, linear.bias, dense)

    def to_stack(self, ops: ModuleType) -> Any | None:
        if not self.kernel:
            return None
        return ops.StackLinear(
            1, self.qweight, self.scales, self.mins, self.bias, self.dense, self.in_features, self.out_features,
            DENSE_ROWS,
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        if self.dense is not None and x.numel() > DENSE_ROWS * self.in_features:
            bias = None if self.bias is None else self.bias.to(self.dense.dtype)
            return F.linear(x.to(self.dense.dtype), self.dense, bias).to(x.dtype)
        if self.kernel:
            ops = kernels.load()
            return ops.q4_linear(x, self.qweight, self.scales, self.mins, self.bias, self.out_features, False)  # type: ignore[union-attr]
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(torch.bfloat16)
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
    multiple of the group size. Given int8 values (GGUF's Q8_0 blocks, e.g. a tied embedding's under `lm_head`)
    stay int8 in either mode.
    """
    if mode not in QUANT_MODES:
        raise ValueError(f"unknown quantization {mode!r} (choose from {', '.join(QUANT_MODES)})")
    if mode == "none":
        return
    given = given or {}
    # Names, not modules: a list of the modules would keep every replaced layer's dense weight alive until the
    # last one is done, so a load would hold the model's dense weights twice at its peak.
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear) and name not in skip]
    for name in names:
        module = model.get_submodule(name)
        if ".lora_" in name or name.endswith(".base_layer"):  # LoRA-wrapped layers: merge or remove LoRA first
            raise ValueError(f"{name} carries a LoRA adapter: merge it (lora.merge_lora) before quantizing")
        value = given.get(name)
        if isinstance(value, Int8Blocks):
            pass
        elif mode == "int8" or name == "lm_head" or module.in_features % GROUP_SIZE:
            q, s = quantize_int8(module.weight.detach())
            value = Int8Blocks(q, s[:, None])
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
    keep_dense: bool | None = None,
    skip: tuple[str, ...] = (),
) -> nn.Module:
    """Phase 2: replace every `nn.Linear` (except names in `skip`) in place; returns the model.

    `blocks` supplies exact low-bit values by module name (GGUF Q4_0/Q4_1 blocks as `Int4Blocks`, Q8_0 blocks as
    `Int8Blocks`, or a quantized model dir's values): a layer given values of the kind it gets is built from them
    and nothing is re-quantized. int4 layers keep a dense prefill copy if `keep_dense` (None: where
    `keeps_dense_copy()`). The vocabulary head returns float32 logits. Embedding lookups stay dense. With
    our kernels, q/k/v and gate/up then become one matmul each (`fuse_projections`).
    """
    for name, module, value in _quantized_layers(model, mode, blocks, skip):
        if isinstance(value, Int8Blocks):
            new: nn.Module = Int8Linear(value, module.bias, float_out=name == "lm_head")
        else:
            new = Int4Linear.from_linear(module, value, keep_dense)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    if mode == "none":
        return model
    fuse_projections(model)
    if isinstance(getattr(model, "config", None), ModelConfig):
        model.config = model.config.replace(quantization={"mode": mode, "group_size": GROUP_SIZE})  # type: ignore[union-attr]
    return model


# fused layer -> (attribute that remembers its parts, the parts), as `model.Attention` and `model.MLP` name them
FUSIONS = {
    "qkv_proj": ("qkv_parts", ("q_proj", "k_proj", "v_proj")),
    "gate_up_proj": ("gate_up_parts", ("gate_proj", "up_proj")),
}


def fuse_projections(model: nn.Module) -> None:
    """Give every attention and MLP whose projections are our low-bit layers one fused layer per input.

    The parts become row views of the fused layer and stay in place under their own names, so a LoRA adapter
    can still wrap `q_proj`; the model runs the fused layer only while the parts are the very layers recorded
    in `<...>_parts` (an adapter's wrapper is another module, so that layer goes back to separate matmuls).
    """
    for module in model.modules():
        for fused_name, (record, part_names) in FUSIONS.items():
            parts = [getattr(module, n, None) for n in part_names]
            if None in parts or not _LowBitLinear.fusable(parts):  # type: ignore[arg-type]
                continue
            fused = _LowBitLinear.concat(parts)  # type: ignore[arg-type]
            views, start = [], 0
            for n, part in zip(part_names, parts, strict=True):
                views.append(fused.rows(start, start + part.out_features))  # type: ignore[union-attr]
                setattr(module, n, views[-1])
                start += part.out_features  # type: ignore[union-attr]
            setattr(module, fused_name, fused)
            setattr(module, record, tuple(views))
