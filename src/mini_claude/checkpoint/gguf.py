"""GGUF files, read with the `gguf` package.

Every tensor type it can dequantize (F32/F16/BF16, Q4_0/Q4_1/Q5_x/Q8_0, the K-quants, ...) becomes dense
weights; Q4_0/Q4_1 and Q8_0 weights can also be kept as their exact low-bit values for our kernels. llama.cpp's
converter interleaves the rows of Llama's q/k projections (its RoPE rotates adjacent pairs, HF's rotates
halves); `unpermute_qk` undoes it.
"""

from __future__ import annotations

import contextlib
import gc
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mini_claude.checkpoint.base import (
    Checkpoint,
    CheckpointError,
    Progress,
    _split_qkv,
)
from mini_claude.config import ModelConfig
from mini_claude.quantize import (
    Int4Blocks,
    Int8Blocks,
)
from mini_claude.tokenizer import Tokenizer

_GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


_GGUF_TOP_NAMES = {
    "token_embd": "embed_tokens",
    "position_embd": "embed_positions",
    "output_norm": "norm",
    "output": "lm_head",
}


GGUF_ARCHS = ("llama", "qwen2", "gpt2")


def gguf_to_ours(name: str) -> str:
    """`blk.3.attn_q.weight` -> `layers.3.self_attn.q_proj.weight` (fused `attn_qkv` is split by the caller)."""
    if m := re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name):
        layer, part, kind = m.groups()
        return f"layers.{layer}.{_GGUF_LAYER_NAMES.get(part, part)}.{kind}"
    stem, _, kind = name.rpartition(".")
    return f"{_GGUF_TOP_NAMES.get(stem, stem)}.{kind}"


def unpermute_qk(w: Tensor, n_head: int) -> Tensor:
    """Undo llama.cpp's row order for q/k: within each head, rows (0, d/2, 1, d/2+1, ...) back to (0..d/2, d/2..d).

    llama.cpp stores each head as (head_dim/2, 2) pairs; HF's rotate-half RoPE wants (2, head_dim/2).
    """
    rows = w.shape[0]
    head_dim = rows // n_head
    return w.reshape(n_head, head_dim // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_int4_blocks(data: np.ndarray, kind: str) -> Int4Blocks:
    """Q4_0 / Q4_1 blocks as int4 values with (scale, zero) per 32 weights: w = (q - 8) * scale + zero.

    A block is fp16 d [, fp16 m], then 16 bytes holding 32 nibbles: low nibbles are weights 0-15, high 16-31.
    Q4_0 means w = d * (q - 8); Q4_1 means w = d * q + m, i.e. zero = m + 8 d.
    """
    header = 2 if kind == "Q4_0" else 4
    rows = data.shape[0]
    blocks = data.reshape(rows, -1, header + 16)  # (N, K/32, bytes)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32) if kind == "Q4_1" else np.zeros_like(d)
    qs = blocks[..., header:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(rows, -1)  # (N, K)
    zeros = m + 8 * d if kind == "Q4_1" else np.zeros_like(d)
    return Int4Blocks(torch.from_numpy(q.astype(np.uint8)), torch.from_numpy(d), torch.from_numpy(zeros))


def gguf_int8_blocks(data: np.ndarray) -> Int8Blocks:
    """Q8_0 blocks (fp16 d, then 32 int8): w = d * q, as int8 values with one scale per 32 weights."""
    blocks = np.asarray(data).reshape(data.shape[0], -1, 34)
    d = blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)  # (N, K/32)
    q = blocks[..., 2:].copy().view(np.int8).reshape(data.shape[0], -1)  # (N, K)
    return Int8Blocks(torch.from_numpy(q), torch.from_numpy(d))


def _dequantize_rows(data: np.ndarray, kind: Any, path: Path, name: str) -> Tensor:
    """Dense float32 values of some rows of a GGUF tensor. Q8_0 (the usual embedding type) has a direct path;
    every other type goes through `gguf.quants.dequantize`."""
    import gguf

    if kind.name == "Q8_0":  # blocks of fp16 d + 32 int8: w = d * q
        blocks = np.asarray(data).reshape(data.shape[0], -1, 34)
        d = torch.from_numpy(blocks[..., :2].copy().view(np.float16)).float()  # (N, K/32, 1)
        q = torch.from_numpy(blocks[..., 2:].copy().view(np.int8)).float()  # (N, K/32, 32)
        return (q * d).reshape(data.shape[0], -1)
    try:
        array = gguf.quants.dequantize(data, kind)
    except NotImplementedError:
        raise CheckpointError(f"{path}: tensor {name} has type {kind.name}, which gguf cannot dequantize") from None
    return torch.from_numpy(np.array(array, dtype=np.float32))


def _dequantize(t: Any, path: Path, dtype: torch.dtype, rows_per_chunk: int = 2048) -> Tensor:
    """Dequantize a tensor a few thousand rows at a time straight into `dtype`, so the float32 temporaries
    of a large embedding never exist all at once (they would set the process's peak memory)."""
    data = t.data
    if data.ndim < 2 or data.shape[0] <= rows_per_chunk:
        return _dequantize_rows(data, t.tensor_type, path, t.name).to(dtype)
    chunks = [
        _dequantize_rows(data[r : r + rows_per_chunk], t.tensor_type, path, t.name).to(dtype)
        for r in range(0, data.shape[0], rows_per_chunk)
    ]
    return torch.cat(chunks)


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector (restored after, if it was on).

    Reading a GGUF file's metadata makes hundreds of thousands of small long-lived objects (a field and its
    numpy parts per vocabulary entry and merge) and no garbage; every few thousand of them start a
    collection, and the full ones walk everything made so far: 0.8 s of the bundled model's start-up.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def read_gguf(path: Path) -> tuple[dict[str, Any], Any]:
    import gguf

    with _collector_paused():
        try:
            reader = gguf.GGUFReader(str(path))
        except (ValueError, OSError, IndexError) as exc:  # gguf reports a short file as a failed reshape
            raise CheckpointError(f"{path} is not a readable GGUF file ({exc})") from None
        meta = {key: field.contents() for key, field in reader.fields.items()}
    return meta, reader


def _gguf_config(meta: dict[str, Any], tensor_names: set[str]) -> ModelConfig:
    arch = meta.get("general.architecture")
    if arch not in GGUF_ARCHS:
        raise CheckpointError(f"unsupported GGUF architecture {arch!r} (supported: {', '.join(GGUF_ARCHS)})")
    if "rope_freqs.weight" in tensor_names:
        raise CheckpointError(
            "GGUF files with per-frequency RoPE factors (Llama 3.1 long context) are not supported yet"
        )

    def get(key: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{key}", default)

    n_head = get("attention.head_count")
    dim = get("embedding_length")
    vocab = get("vocab_size") or len(meta["tokenizer.ggml.tokens"])
    common = dict(
        vocab_size=vocab,
        dim=dim,
        n_layer=get("block_count"),
        n_head=n_head,
        n_kv_head=get("attention.head_count_kv", n_head),
        head_dim=get("attention.key_length", dim // n_head),
        intermediate_size=get("feed_forward_length"),
        max_seq_len=get("context_length", 2048),
        tie_embeddings="output.weight" not in tensor_names,
        arch=arch,
    )
    if arch == "gpt2":
        return ModelConfig(
            **common, norm="layernorm", norm_eps=get("attention.layer_norm_epsilon", 1e-5), mlp="gelu",
            positions="learned", qkv_bias=True, out_bias=True, mlp_bias=True,
        )  # fmt: skip
    return ModelConfig(
        **common,
        norm_eps=get("attention.layer_norm_rms_epsilon", 1e-5),
        rope_base=get("rope.freq_base", 10_000.0),
        qkv_bias="blk.0.attn_q.bias" in tensor_names,
    )


def load_gguf(
    path: Path, dtype: torch.dtype = torch.float32, progress: Progress | None = None, keep_int4: bool = False
) -> Checkpoint:
    """Read a GGUF file; with `keep_int4`, also return the exact low-bit values of its Q4_0/Q4_1 weights (and of
    its Q8_0 ones, which the int8 kernels run as they are)."""
    meta, reader = read_gguf(path)
    names = {t.name for t in reader.tensors}
    config = _gguf_config(meta, names)
    try:
        tokenizer = Tokenizer.from_gguf_metadata(meta)
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot build its tokenizer ({exc})") from None
    state: dict[str, Tensor] = {}
    blocks: dict[str, Int4Blocks] = {}
    blocks8: dict[str, Int8Blocks] = {}
    total = len(reader.tensors)
    for i, t in enumerate(reader.tensors):
        kind = t.tensor_type.name
        block = gguf_int4_blocks(t.data, kind) if keep_int4 and kind in ("Q4_0", "Q4_1") else None
        w = _dequantize(t, path, dtype)
        n_head = config.n_head if ".attn_q." in t.name else config.n_kv_head
        permuted = config.arch == "llama" and re.search(r"attn_[qk]\.(weight|bias)$", t.name) is not None
        if permuted:
            w = unpermute_qk(w, n_head)  # type: ignore[arg-type]
        if block is not None and t.name.endswith(".weight") and "attn_qkv" not in t.name:
            if permuted:
                block = Int4Blocks(*(unpermute_qk(x, n_head) for x in (block.q, block.scales, block.zeros)))  # type: ignore[arg-type]
            blocks[gguf_to_ours(t.name).removesuffix(".weight")] = block
        if keep_int4 and kind == "Q8_0" and t.name.endswith(".weight") and not permuted and "attn_qkv" not in t.name:
            name = gguf_to_ours(t.name).removesuffix(".weight")
            if name == "embed_tokens":  # a lookup table, not a matmul, unless it is also the (tied) head
                name = "lm_head" if config.tie_embeddings else ""
            if name:
                blocks8[name] = gguf_int8_blocks(t.data)
        if t.name.endswith("attn_qkv.weight") or t.name.endswith("attn_qkv.bias"):
            prefix = gguf_to_ours(t.name.replace("attn_qkv", "attn_q")).rsplit(".q_proj.", 1)[0]
            kind = t.name.rsplit(".", 1)[1]
            q, k, v = _split_qkv(w, config)
            for proj, part in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
                state[f"{prefix}.{proj}.{kind}"] = part
        else:
            state[gguf_to_ours(t.name)] = w
        if progress:
            progress(i + 1, total)
    name = meta.get("general.name") or path.stem
    return Checkpoint(config, state, tokenizer, name, blocks, blocks8)
