"""Checkpoint formats: GGUF files, Hugging Face model dirs, and our own self-describing dir.

Every format ends up as (ModelConfig, state dict in our parameter names, Tokenizer). Our names are Hugging
Face's Llama names without the `model.` prefix, so the HF Llama map is nearly the identity and GGUF and
GPT-2 each need one explicit dict.

- GGUF is read with the `gguf` package; every tensor type it can dequantize (F32/F16/BF16, Q4_0/Q4_1/Q5_x/
  Q8_0, the K-quants, ...) is turned into dense weights. llama.cpp's converter interleaves the rows of Llama's
  q/k projections (its RoPE rotates adjacent pairs, HF's rotates halves); `unpermute_qk` undoes it.
- Models are built on the `meta` device and then receive their tensors with `load_state_dict(assign=True)`,
  so weights are materialised once, already in the requested dtype.
- A quantized model dir (`mini-claude quantize`) is our dir whose config records the mode and whose
  safetensors hold each low-bit layer's values in a kernel-independent form (`save_quantized_dir`). It loads
  by building the layers from those values through `quantize_model`: nothing is quantized again, so it gives
  exactly the model that quantizing its source at load time (at the same dtype) gives.

One module per format (`gguf`, `hf`, `own`); this front door picks one by what the path holds.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from mini_claude import kernels
from mini_claude.checkpoint.base import FORMAT_NAME, FORMAT_VERSION, Checkpoint, CheckpointError, Progress
from mini_claude.checkpoint.gguf import GGUF_ARCHS, gguf_to_ours, load_gguf, read_gguf, unpermute_qk
from mini_claude.checkpoint.hf import hf_to_ours, load_hf_dir
from mini_claude.checkpoint.own import load_own_dir, save_model_dir, save_quantized_dir
from mini_claude.config import ModelConfig
from mini_claude.model import Transformer
from mini_claude.quantize import QuantizedWeight, quantize_model, quantize_weights
from mini_claude.tokenizer import Tokenizer

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "GGUF_ARCHS",
    "Checkpoint",
    "CheckpointError",
    "Progress",
    "build_model",
    "gguf_to_ours",
    "hf_to_ours",
    "load_checkpoint",
    "load_gguf",
    "load_hf_dir",
    "load_model",
    "load_own_dir",
    "quantize_checkpoint",
    "read_gguf",
    "save_model_dir",
    "save_quantized_dir",
    "unpermute_qk",
]


def quantize_checkpoint(
    source: str | Path, out: str | Path, mode: str, dtype: torch.dtype = torch.float32,
    progress: Progress | None = None,
) -> Path:  # fmt: skip
    """Read any checkpoint in `dtype`, quantize it as `load_model(source, dtype, quantize=mode)` would, and write
    the result as a quantized model dir. From a GGUF file, int4 keeps the file's own Q4_0/Q4_1 values."""
    ckpt = load_checkpoint(source, dtype, progress, keep_int4=mode == "int4")
    if ckpt.config.quantization:
        raise CheckpointError(
            f"{source} is already quantized ({ckpt.config.quantization['mode']}): quantize its source"
        )
    model = build_model(ckpt.config, ckpt.state_dict)
    try:
        weights = quantize_weights(model, mode, {**ckpt.int8_blocks, **ckpt.int4_blocks})
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None
    return save_quantized_dir(out, model, ckpt.tokenizer, mode, weights, ckpt.name)


def load_checkpoint(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    progress: Progress | None = None,
    keep_int4: bool = False,
) -> Checkpoint:
    """Read any supported checkpoint: a `.gguf` file, our dir, or a Hugging Face dir."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"model not found: {path}")
    if path.is_file():
        with path.open("rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise CheckpointError(f"{path} is not a GGUF file (a model is a .gguf file or a model dir)")
        return load_gguf(path, dtype, progress, keep_int4)
    config_file = path / "config.json"
    if not config_file.exists():
        raise CheckpointError(f"{path} has no config.json: not a model dir")
    try:
        meta = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{config_file} is not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{config_file} is not a JSON object")
    if meta.get("format") == FORMAT_NAME:
        return load_own_dir(path, dtype, progress)
    return load_hf_dir(path, dtype, progress)


def build_model(config: ModelConfig, state_dict: dict[str, Tensor]) -> Transformer:
    """Build on the meta device, then adopt the tensors as parameters (no second copy, no random init).

    Every weight is made contiguous first. Converters hand over views (GPT-2's transposed Conv1D weights,
    rows split out of a fused qkv), and a matmul on a strided view runs a different kernel, with a different
    summation order, than on the same values stored densely: the logits of one model would then depend on
    which file it was read from, by a rounding error that differs from CPU to CPU.
    """
    with torch.device("meta"):
        model = Transformer(config)
    state = {name: t.contiguous() for name, t in state_dict.items()}
    if config.tie_embeddings:
        state.setdefault("lm_head.weight", state["embed_tokens.weight"])
    expected = set(model.state_dict())
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint does not fit the model: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    model.load_state_dict(state, assign=True, strict=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model.eval()


def load_model(
    path: str | Path, dtype: torch.dtype = torch.float32, progress: Progress | None = None, quantize: str = "none"
) -> tuple[Transformer, Tokenizer, str]:
    """Load a checkpoint into a ready model.

    `quantize` is "none", "int8", "int4" (see `quantize.py`) or "auto": int4 when the file already stores 4-bit
    weights (so nothing is lost), int8 otherwise (near-lossless), and dense when neither our vector kernels
    (AVX-512 or AVX2) nor PyTorch's bf16 low-bit kernels can run. A quantized model dir loads in its own mode
    ("auto" or that mode) or as the dense weights its values stand for ("none"); it cannot be turned into the
    other low-bit mode.
    """
    if quantize == "auto" and not (kernels.vectorized() or torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        quantize = "none"  # neither our vector kernels nor PyTorch's bf16 ones: dense weights run fastest
    ckpt = load_checkpoint(path, dtype, progress, keep_int4=quantize in ("int4", "auto"))
    stored = (ckpt.config.quantization or {}).get("mode")
    if stored and quantize not in ("auto", "none", stored):
        raise CheckpointError(f"{path} stores {stored} weights: load it as {stored} (or auto), or none for dense")
    if quantize == "auto":
        quantize = stored or ("int4" if ckpt.int4_blocks else "int8")
    model = build_model(ckpt.config.replace(quantization=None), ckpt.state_dict)
    ckpt.state_dict.clear()  # the model owns its weights now: each dense layer goes as it is quantized
    given: dict[str, QuantizedWeight] = {**ckpt.int8_blocks, **ckpt.int4_blocks}
    if stored and quantize == stored:
        # Every layer must come with its stored values: a missing one would be quietly quantized again.
        planned = quantize_weights(model, quantize, given)
        missing = sorted(name for name, value in planned.items() if value is not given.get(name))
        if missing:
            raise CheckpointError(f"{path} is damaged: no stored {stored} values for {', '.join(missing[:3])}")
        given = planned
    quantize_model(model, quantize, given)
    return model, ckpt.tokenizer, ckpt.name
