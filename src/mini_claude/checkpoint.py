"""Checkpoint formats: GGUF files, Hugging Face model dirs, and our own self-describing dir.

Every format ends up as (ModelConfig, state dict in our parameter names, Tokenizer). Our names are Hugging
Face's Llama names without the `model.` prefix, so the HF Llama map is nearly the identity and GGUF and
GPT-2 each need one explicit dict.

- GGUF is read with the `gguf` package; every tensor type it can dequantize (F32/F16/BF16, Q4_0/Q4_1/Q5_x/
  Q8_0, the K-quants, ...) is turned into dense weights. llama.cpp's converter interleaves the rows of Llama's
  q/k projections (its RoPE rotates adjacent pairs, HF's rotates halves); `unpermute_qk` undoes it.
- Models are built on the `meta` device and then receive their tensors with `load_state_dict(assign=True)`,
  so weights are materialised once, already in the requested dtype.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mini_claude.config import ModelConfig
from mini_claude.model import Transformer
from mini_claude.quantize import Int4Blocks, Int8Blocks, quantize_model
from mini_claude.tokenizer import Tokenizer

FORMAT_NAME = "mini-claude"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A model file or dir that is missing, damaged or of a kind we cannot load."""


@dataclass
class Checkpoint:
    config: ModelConfig
    state_dict: dict[str, Tensor]
    tokenizer: Tokenizer
    name: str
    # Exact int4 values of weights the file stores as Q4_0/Q4_1, by module name, for int4 inference.
    int4_blocks: dict[str, Int4Blocks] = field(default_factory=dict)
    # Exact int8 values of weights stored as Q8_0 (a tied embedding's appear as `lm_head`: the head reads them).
    int8_blocks: dict[str, Int8Blocks] = field(default_factory=dict)


Progress = Callable[[int, int], None]  # (done, total) callback for long loads

# --------------------------------------------------------------------------------------------- GGUF

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


def read_gguf(path: Path) -> tuple[dict[str, Any], Any]:
    import gguf

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


def _split_qkv(w: Tensor, config: ModelConfig) -> tuple[Tensor, Tensor, Tensor]:
    q = config.n_head * config.head_dim  # type: ignore[operator]
    kv = config.n_kv_head * config.head_dim  # type: ignore[operator]
    return w[:q], w[q : q + kv], w[q + kv :]


# --------------------------------------------------------------------------------- Hugging Face dirs


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


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / s for s in shards]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path} has no *.safetensors weights")
    return files


def _read_safetensors(files: list[Path]) -> Iterator[tuple[str, Tensor]]:
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                for key in st.keys():  # noqa: SIM118 (safe_open is not a dict)
                    yield key, st.get_tensor(key)
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{f} is not a readable safetensors file ({exc})") from None


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


def _load_tokenizer_dir(path: Path) -> Tokenizer:
    if not (path / "tokenizer.json").exists():
        raise CheckpointError(f"{path} has no tokenizer.json")
    try:
        return Tokenizer.from_dir(path)
    except Exception as exc:  # the tokenizers library raises plain Exceptions on bad JSON
        raise CheckpointError(f"{path}/tokenizer.json cannot be loaded ({exc})") from None


# ----------------------------------------------------------------------------------------- our own dir


def save_model_dir(path: str | Path, model: Transformer, tokenizer: Tokenizer, name: str = "") -> Path:
    """Write `config.json` + `model.safetensors` + tokenizer files: a dir that describes itself."""
    from safetensors.torch import save_file

    if model.config.quantization:
        # Packed low-bit layouts are kernel-specific; low-bit weights are made at load time (`quantize=`).
        raise ValueError("save the dense model: quantization is applied when a model is loaded, not stored")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "name": name,
        "model": model.config.to_dict(),
    }
    (path / "config.json").write_text(json.dumps(meta, indent=2))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)  # stored once; re-tied on load
    save_file(state, str(path / "model.safetensors"), metadata={"format": FORMAT_NAME})
    tokenizer.save(path)
    return path


def load_own_dir(path: Path, dtype: torch.dtype, progress: Progress | None = None) -> Checkpoint:
    meta = json.loads((path / "config.json").read_text())
    config = ModelConfig.from_dict(meta["model"])
    state = {k: t.to(dtype) for k, t in _read_safetensors(_safetensors_files(path))}
    return Checkpoint(config, state, _load_tokenizer_dir(path), meta.get("name") or path.name)


# ------------------------------------------------------------------------------------------ front door


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
    weights (so nothing is lost), int8 otherwise (near-lossless), and dense when the CPU has no native bf16, which
    the low-bit kernels compute in.
    """
    if quantize == "auto" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        quantize = "none"
    ckpt = load_checkpoint(path, dtype, progress, keep_int4=quantize in ("int4", "auto"))
    if quantize == "auto":
        quantize = "int4" if ckpt.int4_blocks else "int8"
    model = build_model(ckpt.config, ckpt.state_dict)
    quantize_model(model, quantize, {**ckpt.int8_blocks, **ckpt.int4_blocks})
    return model, ckpt.tokenizer, ckpt.name
