"""Our own self-describing dir: config.json (format, version, model config, quantization mode) +
model.safetensors + tokenizer files; a quantized dir stores each low-bit layer's values, not its packing."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from mini_claude.checkpoint.base import (
    FORMAT_NAME,
    FORMAT_VERSION,
    Checkpoint,
    CheckpointError,
    Progress,
    _load_tokenizer_dir,
    _read_safetensors,
    _safetensors_files,
)
from mini_claude.config import ModelConfig
from mini_claude.model import Transformer
from mini_claude.quantize import (
    GROUP_SIZE,
    Int4Blocks,
    Int8Blocks,
    QuantizedWeight,
    dequantize_int4,
    dequantize_int8,
)
from mini_claude.tokenizer import Tokenizer


def save_model_dir(path: str | Path, model: Transformer, tokenizer: Tokenizer, name: str = "") -> Path:
    """Write `config.json` + `model.safetensors` + tokenizer files: a dir that describes itself."""
    if model.config.quantization:
        # The layers hold kernel-specific packings; `save_quantized_dir` stores the values they were built from.
        raise ValueError("save the dense model (or write a quantized dir with `mini-claude quantize`)")
    state = model.state_dict()
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)  # stored once; re-tied on load
    return _write_own_dir(Path(path), model.config, state, tokenizer, name)


def save_quantized_dir(
    path: str | Path, model: Transformer, tokenizer: Tokenizer, mode: str, weights: dict[str, QuantizedWeight],
    name: str = "",
) -> Path:  # fmt: skip
    """Write a dense `model` with the low-bit values of its layers (`quantize.quantize_weights(model, mode)`).

    For each quantized layer the file holds, instead of `NAME.weight`: `NAME.weight_int4` (uint8 (N, K/2), two
    values in [0, 15] per byte, the even column in the low nibble), `NAME.scales` and `NAME.zeros` (float32
    (N, K/group)), meaning w = (q - 8) * scale + zero; or `NAME.weight_int8` (int8 (N, K)) and `NAME.scales`
    (float32 (N, G), one scale per K/G inputs: G = 1 per row, G = K/32 for GGUF's Q8_0), meaning w = q * scale.
    Everything else (embeddings, norms, biases) is stored as the model holds it. config.json records the mode
    and the dtype the weights were read in before quantizing.
    """
    state = model.state_dict()
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    for layer, value in weights.items():
        state.pop(f"{layer}.weight", None)
        if isinstance(value, Int4Blocks):
            q = value.q.to(torch.uint8)
            state[f"{layer}.weight_int4"] = q[:, 0::2] | (q[:, 1::2] << 4)
            state[f"{layer}.zeros"] = value.zeros.float()
        else:
            state[f"{layer}.weight_int8"] = value.q.to(torch.int8)
        state[f"{layer}.scales"] = value.scales.float()
    dtype = str(model.embed_tokens.weight.dtype).removeprefix("torch.")
    config = model.config.replace(quantization={"mode": mode, "group_size": GROUP_SIZE, "dtype": dtype})
    return _write_own_dir(Path(path), config, state, tokenizer, name)


def _write_own_dir(path: Path, config: ModelConfig, state: dict[str, Tensor], tokenizer: Tokenizer, name: str) -> Path:
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "name": name, "model": config.to_dict()}
    (path / "config.json").write_text(json.dumps(meta, indent=2))
    save_file({k: v.contiguous() for k, v in state.items()}, str(path / "model.safetensors"),
              metadata={"format": FORMAT_NAME})  # fmt: skip
    tokenizer.save(path)
    return path


def _split_low_bit(path: Path, tensors: dict[str, Tensor]) -> tuple[dict[str, Int4Blocks], dict[str, Int8Blocks]]:
    """Take a quantized dir's low-bit values out of `tensors` (see `save_quantized_dir`)."""
    blocks: dict[str, Int4Blocks] = {}
    rows: dict[str, Int8Blocks] = {}
    for key in [k for k in tensors if k.endswith((".weight_int4", ".weight_int8"))]:
        layer, _, kind = key.rpartition(".")
        try:
            q, scales = tensors.pop(key), tensors.pop(f"{layer}.scales")
            if kind == "weight_int8":
                if (
                    q.dtype != torch.int8
                    or scales.ndim != 2
                    or scales.shape[0] != q.shape[0]
                    or q.shape[1] % scales.shape[1]
                ):
                    raise ValueError(f"int8 {tuple(q.shape)} with scales {tuple(scales.shape)}")
                # A copy: tensors read from safetensors may sit at any byte offset, and PyTorch's int8 kernel
                # reads its weight with aligned vector loads (a view straight from the file crashed it).
                rows[layer] = Int8Blocks(q.clone(), scales.float())
                continue
            zeros = tensors.pop(f"{layer}.zeros")
            unpacked = torch.stack([q & 0x0F, q >> 4], dim=-1).reshape(q.shape[0], -1)  # (N, K) uint8
            if q.dtype != torch.uint8 or scales.shape != zeros.shape or unpacked.shape[1] % scales.shape[1]:
                raise ValueError(f"int4 {tuple(unpacked.shape)} with scales {tuple(scales.shape)}")
            blocks[layer] = Int4Blocks(unpacked, scales.float(), zeros.float())
        except (KeyError, ValueError, IndexError) as exc:
            raise CheckpointError(f"{path}: the low-bit values of {layer} are damaged ({exc})") from None
    return blocks, rows


def load_own_dir(path: Path, dtype: torch.dtype, progress: Progress | None = None) -> Checkpoint:
    meta = json.loads((path / "config.json").read_text())
    config = ModelConfig.from_dict(meta["model"])
    tensors = dict(_read_safetensors(_safetensors_files(path)))
    blocks, rows = _split_low_bit(path, tensors) if config.quantization else ({}, {})
    state = {k: t.to(dtype) for k, t in tensors.items()}
    # The dense weight of a low-bit layer is what its values mean: `quantize="none"` runs on it, and the layers
    # are rebuilt from the values themselves.
    for layer, b in blocks.items():
        state[f"{layer}.weight"] = dequantize_int4(b.q, b.scales, b.zeros).to(dtype)
    for layer, r in rows.items():
        if not (layer == "lm_head" and config.tie_embeddings):  # a tied head is the embedding, stored dense
            state[f"{layer}.weight"] = dequantize_int8(r).to(dtype)
    return Checkpoint(config, state, _load_tokenizer_dir(path), meta.get("name") or path.name, blocks, rows)
