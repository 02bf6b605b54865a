"""One description of a decoder-only transformer, for both families we run.

The Llama family (SmolLM2, TinyLlama, Llama 2/3, Mistral, Qwen2) and the GPT-2 family differ in a handful of
choices: the norm, the MLP, how positions enter, and where biases live. Those choices are fields here, so
`model.py` branches on data in one place instead of keeping a copy of the network per family.

Field names are one vocabulary used everywhere (checkpoints, CLI, docs): `n_layer, n_head, n_kv_head, dim,
head_dim, intermediate_size, vocab_size, max_seq_len, rope_base, norm_eps`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

NormKind = Literal["rmsnorm", "layernorm"]
MLPKind = Literal["swiglu", "gelu"]
PositionKind = Literal["rope", "learned", "sinusoidal"]


@dataclass(frozen=True)
class ModelConfig:
    """Shape and architecture of a model; everything `model.py` needs to build it."""

    vocab_size: int
    dim: int
    n_layer: int
    n_head: int
    intermediate_size: int
    # Grouped-query attention: several query heads share one key/value head. None means n_head (plain MHA).
    n_kv_head: int | None = None
    # Usually dim // n_head, but some models (e.g. Gemma, Qwen3) decouple the two, so it is stored.
    head_dim: int | None = None
    max_seq_len: int = 2048
    norm: NormKind = "rmsnorm"
    # 1e-5 is Llama's default; GPT-2 uses 1e-5 as well, Qwen2 1e-6. Checkpoints always override it.
    norm_eps: float = 1e-5
    mlp: MLPKind = "swiglu"
    positions: PositionKind = "rope"
    rope_base: float = 10_000.0
    # Llama 3.1-style frequency scaling: {"factor", "low_freq_factor", "high_freq_factor",
    # "original_max_position_embeddings"}; None for plain RoPE.
    rope_scaling: dict[str, float] | None = None
    qkv_bias: bool = False  # Qwen2 and GPT-2 have biases on q/k/v
    out_bias: bool = False  # GPT-2 only: biases on o_proj and the MLP
    mlp_bias: bool = False
    tie_embeddings: bool = False  # the LM head reuses the token embedding (SmolLM2, GPT-2)
    arch: str = "llama"  # informational: the family the weights came from
    # Weight-only quantization the checkpoint stores, e.g. {"mode": "int8"}; None for dense weights.
    quantization: dict[str, Any] | None = field(default=None)

    def __post_init__(self) -> None:
        if self.n_kv_head is None:
            object.__setattr__(self, "n_kv_head", self.n_head)
        if self.head_dim is None:
            if self.dim % self.n_head:
                raise ValueError(f"dim={self.dim} is not divisible by n_head={self.n_head}")
            object.__setattr__(self, "head_dim", self.dim // self.n_head)
        if self.n_head % self.n_kv_head:  # type: ignore[operator]
            raise ValueError(f"n_head={self.n_head} must be a multiple of n_kv_head={self.n_kv_head}")
        if self.positions == "rope" and self.head_dim % 2:  # type: ignore[operator]
            raise ValueError("RoPE needs an even head_dim")

    @property
    def n_params(self) -> int:
        """Parameter count computed from the shapes (tied embeddings counted once)."""
        hd, kv = self.head_dim, self.n_kv_head
        assert hd is not None and kv is not None
        attn = self.dim * hd * (self.n_head * 2 + kv * 2)
        if self.qkv_bias:
            attn += hd * (self.n_head + 2 * kv)
        if self.out_bias:
            attn += self.dim
        n_mats = 3 if self.mlp == "swiglu" else 2
        mlp = n_mats * self.dim * self.intermediate_size
        if self.mlp_bias:
            mlp += self.intermediate_size * (n_mats - 1) + self.dim
        norm = self.dim * (2 if self.norm == "layernorm" else 1)
        total = self.n_layer * (attn + mlp + 2 * norm) + norm + self.vocab_size * self.dim
        if not self.tie_embeddings:
            total += self.vocab_size * self.dim
        if self.positions == "learned":
            total += self.max_seq_len * self.dim
        return total

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Build from a dict, ignoring keys this version does not know (forward compatibility)."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)


# Presets name architectures we test and teach with. Real checkpoints carry their own config; these are for
# building random models (tests, from-scratch training) and for documentation.
PRESETS: dict[str, ModelConfig] = {
    "smollm2-135m": ModelConfig(
        vocab_size=49152, dim=576, n_layer=30, n_head=9, n_kv_head=3, intermediate_size=1536,
        max_seq_len=8192, rope_base=100_000.0, tie_embeddings=True, arch="llama",
    ),
    "tiny-llama": ModelConfig(
        vocab_size=512, dim=64, n_layer=2, n_head=4, n_kv_head=2, intermediate_size=128, max_seq_len=256,
    ),
    "tiny-qwen2": ModelConfig(
        vocab_size=512, dim=64, n_layer=2, n_head=4, n_kv_head=2, intermediate_size=128, max_seq_len=256,
        qkv_bias=True, norm_eps=1e-6, rope_base=1_000_000.0, arch="qwen2",
    ),
    "tiny-gpt2": ModelConfig(
        vocab_size=512, dim=64, n_layer=2, n_head=4, intermediate_size=256, max_seq_len=256,
        norm="layernorm", mlp="gelu", positions="learned", qkv_bias=True, out_bias=True, mlp_bias=True,
        tie_embeddings=True, arch="gpt2",
    ),
    "gpt2": ModelConfig(
        vocab_size=50257, dim=768, n_layer=12, n_head=12, intermediate_size=3072, max_seq_len=1024,
        norm="layernorm", mlp="gelu", positions="learned", qkv_bias=True, out_bias=True, mlp_bias=True,
        tie_embeddings=True, arch="gpt2",
    ),
}  # fmt: skip
