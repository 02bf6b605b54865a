"""Hugging Face model dirs (Llama, Qwen2, GPT-2 families): config.json + safetensors, mapped to our names."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mini_claude.checkpoint.base import (
    Checkpoint,
    CheckpointError,
    Progress,
    _load_tokenizer_dir,
    _read_safetensors,
    _safetensors_files,
    _split_qkv,
)
from mini_claude.config import ModelConfig


def _hf_config(cfg: dict[str, Any]) -> ModelConfig:
    kind = cfg.get("model_type")
    if kind == "gpt2":
        dim = cfg["n_embd"]
        return ModelConfig(
            vocab_size=cfg["vocab_size"], dim=dim, n_layer=cfg["n_layer"], n_head=cfg["n_head"],
            intermediate_size=cfg.get("n_inner") or 4 * dim, max_seq_len=cfg.get("n_positions", 1024),
            norm="layernorm", norm_eps=cfg.get("layer_norm_epsilon", 1e-5), mlp="gelu", positions="learned",
            qkv_bias=True, out_bias=True, mlp_bias=True, tie_embeddings=cfg.get("tie_word_embeddings", True),
            arch="gpt2",
        )  # fmt: skip
    if kind not in ("llama", "mistral", "qwen2"):
        raise CheckpointError(f"unsupported model_type {kind!r} (supported: llama, mistral, qwen2, gpt2)")
    if cfg.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"unsupported activation {cfg['hidden_act']!r}")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise CheckpointError(f"unsupported RoPE scaling {rope_type!r}")
    scaling = None
    if rope_type == "llama3":
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        scaling = {k: float(rope[k]) for k in keys}
    return ModelConfig(
        vocab_size=cfg["vocab_size"],
        dim=cfg["hidden_size"],
        n_layer=cfg["num_hidden_layers"],
        n_head=cfg["num_attention_heads"],
        n_kv_head=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"],
        intermediate_size=cfg["intermediate_size"],
        max_seq_len=cfg.get("max_position_embeddings", 2048),
        norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_base=float(rope.get("rope_theta", cfg.get("rope_theta", 10_000.0))),
        rope_scaling=scaling,
        qkv_bias=kind == "qwen2" or bool(cfg.get("attention_bias", False)),
        out_bias=kind != "qwen2" and bool(cfg.get("attention_bias", False)),
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        arch=kind,
    )


_GPT2_NAMES = {
    "wte": "embed_tokens",
    "wpe": "embed_positions",
    "ln_f": "norm",
    "ln_1": "input_layernorm",
    "ln_2": "post_attention_layernorm",
    "attn.c_proj": "self_attn.o_proj",
    "mlp.c_fc": "mlp.up_proj",
    "mlp.c_proj": "mlp.down_proj",
}


def hf_to_ours(name: str, arch: str) -> str | None:
    """Map one HF parameter name to ours; None for tensors we do not keep (e.g. GPT-2's causal-mask buffers)."""
    if arch != "gpt2":
        return name.removeprefix("model.")
    name = name.removeprefix("transformer.")
    if name.endswith((".attn.bias", ".attn.masked_bias")):  # causal-mask buffers of old checkpoints
        return None
    if m := re.fullmatch(r"h\.(\d+)\.(.+)\.(weight|bias)", name):
        layer, part, kind = m.groups()
        return f"layers.{layer}.{_GPT2_NAMES.get(part, part)}.{kind}"
    stem, _, kind = name.rpartition(".")
    return f"{_GPT2_NAMES.get(stem, stem)}.{kind}"


def load_hf_dir(path: Path, dtype: torch.dtype = torch.float32, progress: Progress | None = None) -> Checkpoint:
    cfg = json.loads((path / "config.json").read_text())
    config = _hf_config(cfg)
    state: dict[str, Tensor] = {}
    files = _safetensors_files(path)
    for i, (key, t) in enumerate(_read_safetensors(files)):
        name = hf_to_ours(key, config.arch)
        if name is None:
            continue
        if config.arch == "gpt2" and re.search(r"attn\.c_attn\.(weight|bias)$", name):
            t = t.t() if t.ndim == 2 else t  # GPT-2's Conv1D stores (in, out)
            prefix = name.rsplit(".attn.c_attn.", 1)[0]
            kind = name.rsplit(".", 1)[1]
            for proj, part in zip(("q_proj", "k_proj", "v_proj"), _split_qkv(t, config), strict=True):
                state[f"{prefix}.self_attn.{proj}.{kind}"] = part.to(dtype)
            continue
        if (
            config.arch == "gpt2"
            and t.ndim == 2
            and re.search(r"(c_proj|c_fc|o_proj|up_proj|down_proj)\.weight$", name)
        ):
            t = t.t()
        state[name] = t.to(dtype)
        if progress:
            progress(i + 1, 0)
    return Checkpoint(config, state, _load_tokenizer_dir(path), cfg.get("_name_or_path") or path.name)
