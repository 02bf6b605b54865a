"""The transformer, from scratch: norms, attention, MLP, block, KV cache (positions: `positions.py`).

This is the network that answers in `mini-claude chat`, not a simplified copy of it. Design choices:

- Pre-norm residual blocks (GPT-2, Llama): `x + attn(norm(x))`, then `x + mlp(norm(x))`.
- Grouped-query attention (Ainslie et al., 2023): `n_kv_head` key/value heads are shared by
  `n_head // n_kv_head` query heads each; `n_kv_head == n_head` is ordinary multi-head attention.
- Rotary position embeddings (Su et al., 2021), sinusoidal or learned absolute positions, per the config
  (`positions.py` holds the encodings; this module picks one and applies it).
- Two attention paths that agree (a test proves it): `attention()` spells out softmax(QK^T/sqrt(d) + mask)V
  and can return its weights for study; the default path calls `F.scaled_dot_product_attention`, which fuses
  the same computation.
- The KV cache is preallocated per layer and indexed by *slot* (a batch row) and *position*. Each sequence
  owns a slot and writes its keys at its own positions, so sequences of different lengths decode together
  with no padding inside the cache: a key is visible to a query iff its position is <= the query's.
  That one rule is the causal mask, the batching mask and the "ignore stale slots" mask at once.
  The cache object decides the layout: the serving loop passes a `kv_cache.PagedKVCache` (blocks, shared
  prefixes) instead, which then computes each sequence's attention over its own blocks (`attend`).
- Norms compute in float32 and cast back, as the reference implementations do, so bf16 weights stay stable.
- The fast path (inference, our C++ kernels built: `kernels/`) runs the same modules with fewer, fatter ops:
  one fused matmul for q/k/v and one for gate/up when the weights are quantized (`quantize.fuse_projections`),
  RMSNorm and silu(gate)*up as one call each, and, for decode (one new token per sequence, and short prompt
  chunks mixed into the same step, each prompt token a row), RoPE plus the cache write as one call and
  `decode_attention`, which reads a sequence's keys through its block table.
  Each of those kernels is tested against the PyTorch code it replaces, which stays here and runs whenever
  autograd is on or the kernels are missing.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mini_claude import kernels
from mini_claude.config import ModelConfig
from mini_claude.positions import apply_rope, rope_tables, sinusoidal_positions

FAST_DTYPES = (torch.float32, torch.bfloat16)  # what the C++ kernels compute on


# Keys that a forward's prompt rows may read through the decode kernels (see `_decode_kernels_fit`): ~128
# prompt tokens from position 0, or 16 after 1,000 positions of context.
DECODE_KERNEL_PROMPT_KEYS = 16_384


def _decode_kernels_fit(positions: Tensor, slots: Tensor | None) -> bool:
    """Whether a one-token-per-row forward (B, 1) runs through the decode kernels (and the decode stack).

    Every row its own sequence is a decode step. Rows sharing a slot are a prompt chunk (the generator's layout):
    through the kernels each prompt token is a query of its own over its sequence's keys up to its position
    (written by the same call before any row attends), which is exact causal attention. That costs O(T^2) work
    in a single-query kernel, so a long chunk goes to the module path, where the cache attends over each chunk
    with one SDPA call; a short one (a chat's new turn after its cached prefix, several arrivals together) is
    far cheaper in one call than through ~30 nn.Module calls and an SDPA call per chunk per block, and keeps
    the running sequences' decode rows on the stack.
    """
    if slots is None or slots.numel() < 2:
        return True
    rows = slots.tolist()
    counts = Counter(rows)
    if len(counts) == len(rows):
        return True
    keys = sum(p + 1 for slot, p in zip(rows, positions[:, 0].tolist(), strict=True) if counts[slot] > 1)
    return keys <= DECODE_KERNEL_PROMPT_KEYS


def fast_ops() -> ModuleType | None:
    """Our C++ kernels, when they may run this call: built, and no autograd graph to record (they have no
    backward). None means: run the PyTorch code."""
    return None if torch.is_grad_enabled() else kernels.load()


# --------------------------------------------------------------------------------------------- norms


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight (Zhang & Sennrich, 2019): LayerNorm without centring or bias."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == self.weight.dtype and x.dtype in FAST_DTYPES and (ops := fast_ops()) is not None:
            return ops.rms_norm(x, self.weight, self.eps)  # the same arithmetic in one call
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class LayerNorm(nn.Module):
    """(x - mean) / sqrt(var + eps) * weight + bias (Ba et al., 2016), the GPT-2 family's norm."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        h = x.float()
        mean = h.mean(-1, keepdim=True)
        var = (h - mean).pow(2).mean(-1, keepdim=True)  # biased variance, as in the paper and torch
        h = (h - mean) * torch.rsqrt(var + self.eps)
        return (h * self.weight.float() + self.bias.float()).to(x.dtype)


def make_norm(config: ModelConfig) -> nn.Module:
    cls = RMSNorm if config.norm == "rmsnorm" else LayerNorm
    return cls(config.dim, config.norm_eps)


# ------------------------------------------------------------------------------------------ attention


def causal_mask(n_queries: int, n_keys: int | None = None) -> Tensor:
    """Additive mask, 0 where a query may look and -inf where it may not: (T, S).

    With a cache, queries are the last `n_queries` of `n_keys` positions, so the diagonal shifts right.
    """
    n_keys = n_queries if n_keys is None else n_keys
    allowed = visible_keys(torch.arange(n_keys - n_queries, n_keys)[None], n_keys)[0]
    return torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))


def visible_keys(positions: Tensor, n_keys: int) -> Tensor:
    """Boolean (B, T, S): key position s is visible to the query at positions[b, t] iff s <= that position."""
    return torch.arange(n_keys, device=positions.device) <= positions[..., None]


def attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, return_weights: bool = False
) -> Tensor | tuple[Tensor, Tensor]:
    """softmax(q k^T / sqrt(d) + mask) v, written out (Vaswani et al., 2017).

    q: (B, H, T, d); k, v: (B, H_kv, S, d) with H a multiple of H_kv (grouped-query attention);
    mask: additive (0 / -inf), broadcastable to (B, H, T, S), or boolean with True = may attend.
    """
    groups = q.shape[1] // k.shape[1]
    if groups > 1:  # each key/value head serves `groups` consecutive query heads
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, H, T, S)
    if mask is not None:
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=scores.dtype, device=mask.device).masked_fill(~mask, -math.inf)
        scores = scores + mask
    weights = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    out = weights @ v  # (B, H, T, d)
    return (out, weights) if return_weights else out


class KVCache:
    """Keys and values of past positions, per layer, in preallocated (slots, n_kv_head, capacity, head_dim) buffers.

    Capacity grows by doubling up to `max_seq_len`, so a short chat does not pay for an 8k-token context.
    """

    def __init__(
        self,
        config: ModelConfig,
        n_slots: int = 1,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        capacity: int = 256,
    ) -> None:
        self.max_seq_len = config.max_seq_len
        self.capacity = min(capacity, self.max_seq_len)
        shape = (n_slots, config.n_kv_head, self.capacity, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layer)]

    @property
    def n_slots(self) -> int:
        return self.k[0].shape[0]

    def reserve(self, length: int) -> None:
        """Make room for positions [0, length)."""
        if length > self.max_seq_len:
            raise ValueError(f"position {length - 1} is past the context window of {self.max_seq_len} tokens")
        if length <= self.capacity:
            return
        new_cap = min(self.max_seq_len, max(length, 2 * self.capacity))
        for buffers in (self.k, self.v):
            for i, old in enumerate(buffers):
                new = old.new_zeros(*old.shape[:2], new_cap, old.shape[3])
                new[:, :, : self.capacity] = old
                buffers[i] = new
        self.capacity = new_cap

    def update(
        self, layer: int, k: Tensor, v: Tensor, positions: Tensor, slots: Tensor | None, n_keys: int
    ) -> tuple[Tensor, Tensor]:
        """Store k, v (B, H_kv, T, d) at `positions` (B, T) of `slots` (B,); return keys [0, n_keys) of those slots."""
        kc, vc = self.k[layer], self.v[layer]
        if slots is None and k.shape[0] == 1:  # one sequence in slot 0: contiguous writes, views on read
            kc[:1].index_copy_(2, positions[0], k)
            vc[:1].index_copy_(2, positions[0], v)
            return kc[:1, :, :n_keys], vc[:1, :, :n_keys]
        rows = torch.arange(k.shape[0]) if slots is None else slots
        # Advanced indices separated by a slice put their broadcast dims (B, T) first: value is (B, T, H_kv, d).
        kc[rows[:, None], :, positions] = k.transpose(1, 2)
        vc[rows[:, None], :, positions] = v.transpose(1, 2)
        if slots is None:
            return kc[: k.shape[0], :, :n_keys], vc[: k.shape[0], :, :n_keys]
        return kc[slots, :, :n_keys], vc[slots, :, :n_keys]

    def pools(self, layer: int) -> tuple[Tensor, Tensor]:
        """One layer's keys and values as block pools (n_blocks, n_kv_head, block_size, head_dim), the form
        `kernels.decode_attention` reads: here each slot is one block holding its whole capacity."""
        return self.k[layer], self.v[layer]

    def all_pools(self) -> tuple[list[Tensor], list[Tensor]]:
        """Every layer's `pools` at once (what the kernels' `DecodeStack` takes)."""
        return self.k, self.v

    def block_tables(self, slots: Tensor | None, batch: int) -> Tensor:
        """(B, max_blocks) int32: the blocks of each row's sequence, in order; here just its slot."""
        rows = torch.arange(batch) if slots is None else slots
        return rows.to(torch.int32).view(-1, 1)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        q_out, kv_out = config.n_head * config.head_dim, config.n_kv_head * config.head_dim  # type: ignore[operator]
        self.q_proj = nn.Linear(config.dim, q_out, bias=config.qkv_bias)
        self.k_proj = nn.Linear(config.dim, kv_out, bias=config.qkv_bias)
        self.v_proj = nn.Linear(config.dim, kv_out, bias=config.qkv_bias)
        self.o_proj = nn.Linear(q_out, config.dim, bias=config.out_bias)
        # Set to True to run the written-out attention and keep its weights in `last_weights` for study.
        self.record_weights = False
        self.last_weights: Tensor | None = None
        # quantize.fuse_projections may add one matmul for all three (qkv_proj) over views of their weights.
        self.qkv_proj: nn.Module | None = None
        self.qkv_parts: tuple[nn.Module, ...] = ()

    def _fused_qkv(self, x: Tensor) -> Tensor | None:
        """q, k, v side by side from the fused matmul, if there is one and its parts are still the layers here
        (a LoRA adapter wraps a part in another module: then each projection runs on its own)."""
        p = self.qkv_parts
        if p and self.q_proj is p[0] and self.k_proj is p[1] and self.v_proj is p[2]:
            return self.qkv_proj(x)  # type: ignore[misc]
        return None

    def forward(self, x: Tensor, ctx: ForwardContext) -> Tensor:
        B, T, _ = x.shape
        qkv = self._fused_qkv(x)  # (B, T, (nh + 2 nkv) hd) or None
        if ctx.decode and not self.record_weights:
            return self._decode(x, qkv, ctx)
        if qkv is not None:
            kv = self.n_kv_head * self.head_dim
            q, k, v = qkv.split([self.n_head * self.head_dim, kv, kv], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if ctx.cos is not None:
            q, k = apply_rope(q, ctx.cos, ctx.sin), apply_rope(k, ctx.cos, ctx.sin)
        if getattr(ctx.cache, "paged", False):  # blocks (kv_cache.py): the cache attends over each sequence's own
            y = ctx.cache.attend(self.layer_idx, q, k, v, ctx.positions, ctx.slots)  # type: ignore[union-attr]
            return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))
        if ctx.cache is not None:
            k, v = ctx.cache.update(self.layer_idx, k, v, ctx.positions, ctx.slots, ctx.n_keys)  # (B, nkv, S, hd)
        if self.record_weights:
            mask = ctx.mask if ctx.mask is not None else visible_keys(ctx.positions, k.shape[2])[:, None]
            y, self.last_weights = attention(q, k, v, mask, return_weights=True)  # type: ignore[misc]
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=ctx.mask, is_causal=ctx.is_causal, enable_gqa=self.n_head != self.n_kv_head
            )
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, nh*hd)
        return self.o_proj(y)

    def _decode(self, x: Tensor, qkv: Tensor | None, ctx: ForwardContext) -> Tensor:
        """One new token per row with our kernels: the same RoPE, cache write and attention as `forward`."""
        B = x.shape[0]
        if qkv is None:
            qkv = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)
        ops = kernels.load()
        k_pool, v_pool = ctx.cache.pools(self.layer_idx)  # type: ignore[union-attr]
        q = ops.rope_kv_write(  # type: ignore[union-attr]
            qkv, ctx.positions, ctx.cos, ctx.sin, k_pool, v_pool, ctx.block_tables, self.n_head, self.n_kv_head
        )  # (B, 1, nh, hd), rotated; k rotated and v written at each row's position
        y = ops.decode_attention(  # type: ignore[union-attr]
            q.view(B, self.n_head, self.head_dim), k_pool, v_pool, ctx.block_tables, ctx.lengths, self.head_dim**-0.5
        )  # (B, nh, hd)
        return self.o_proj(y.view(B, 1, self.n_head * self.head_dim))


# ------------------------------------------------------------------------------------------------ MLP


class MLP(nn.Module):
    """SwiGLU (Shazeer, 2020): down(silu(gate(x)) * up(x)); or GPT-2's down(gelu(up(x)))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.kind = config.mlp
        if self.kind == "swiglu":
            self.gate_proj = nn.Linear(config.dim, config.intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.dim, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.dim, bias=config.mlp_bias)
        # quantize.fuse_projections may add one matmul for gate and up (see Attention.qkv_proj).
        self.gate_up_proj: nn.Module | None = None
        self.gate_up_parts: tuple[nn.Module, ...] = ()

    def forward(self, x: Tensor) -> Tensor:
        p = self.gate_up_parts
        if p and self.gate_proj is p[0] and self.up_proj is p[1]:
            gate_up = self.gate_up_proj(x)  # type: ignore[misc]  # (B, T, 2 * intermediate)
            if gate_up.dtype in FAST_DTYPES and (ops := fast_ops()) is not None:
                return self.down_proj(ops.silu_mul(gate_up))
            gate, up = gate_up.chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        if self.kind == "swiglu":
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(F.gelu(self.up_proj(x), approximate="tanh"))  # GPT-2's "gelu_new"


# ---------------------------------------------------------------------------------------------- block


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = make_norm(config)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, ctx: ForwardContext) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


class ForwardContext:
    """What every layer of one forward pass shares: positions, their RoPE angles, the mask, the cache."""

    # decode: one new token per row through our kernels, which read `block_tables` and `lengths` (the number of
    # keys each row sees); cos/sin are then the whole RoPE tables, not this call's rows of them.
    __slots__ = (
        "block_tables", "cache", "cos", "decode", "is_causal", "lengths", "mask", "n_keys", "positions", "sin",
        "slots",
    )  # fmt: skip

    def __init__(self, **kwargs: object) -> None:
        for name in self.__slots__:
            setattr(self, name, kwargs.get(name))


# ------------------------------------------------------------------------------------------ the model


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        if config.positions == "learned":
            self.embed_positions = nn.Embedding(config.max_seq_len, config.dim)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm = make_norm(config)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self._tables: dict[str, Tensor] = {}  # RoPE / sinusoidal tables, built lazily (works on the meta device)
        # The kernels' one-call decode step (see `decode_stack`), and the modules it was made from.
        # MINI_CLAUDE_DECODE_STACK=0 keeps the module loop (benchmarks compare the two).
        stack_setting = os.environ.get("MINI_CLAUDE_DECODE_STACK", "1").lower()
        self.use_decode_stack = stack_setting not in ("0", "false", "off", "no")
        self._stack: tuple[object | None, list[tuple[object, ...]]] | None = None

    # Positions tables are derived data, never saved, and built on first use on the weights' device.
    def _table(self, name: str, device: torch.device) -> Tensor:
        if name not in self._tables or self._tables[name].device != device:
            c = self.config
            if name in ("cos", "sin"):
                cos, sin = rope_tables(c.head_dim, c.max_seq_len, c.rope_base, c.rope_scaling)  # type: ignore[arg-type]
                self._tables["cos"], self._tables["sin"] = cos.to(device), sin.to(device)
            else:
                self._tables[name] = sinusoidal_positions(c.max_seq_len, c.dim).to(device)
        return self._tables[name]

    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None) -> None:
        """GPT-2-style random init: N(0, std) matrices, zero biases, unit norms."""
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif "norm" in name:
                nn.init.ones_(p)
            else:
                nn.init.normal_(p, 0.0, std, generator=generator)

    def forward(
        self,
        idx: Tensor,
        positions: Tensor | None = None,
        cache: KVCache | None = None,
        slots: Tensor | None = None,
        logits_at: Tensor | None = None,
        logits_rows: Tensor | None = None,
        logits_from: int = 0,
    ) -> Tensor:
        """Logits for token ids `idx` (B, T).

        Args:
            positions: (B, T) position of each token in its own sequence; default 0..T-1 for every row.
            cache: keys/values of earlier positions; this call's keys are written into it.
            slots: (B,) cache row of each sequence; default rows 0..B-1.
            logits_at: (B,) the one index per row whose logits are wanted (prefill needs only the last),
                which skips the vocabulary projection for every other position.
            logits_rows: (K,) only these rows' logits are wanted (a batch that mixes prefill chunks, one token
                per row, with decode rows needs the last token of each chunk and every decode row).
            logits_from: only positions from this one on get logits (scoring a continuation of a prompt).

        Returns:
            (B, T - logits_from, vocab_size) logits, or (B, 1, vocab_size) with `logits_at`; K rows with
            `logits_rows`.
        """
        B, T = idx.shape
        device = idx.device
        default_positions = positions is None
        if positions is None:
            positions = torch.arange(T, device=device).expand(B, T)
        if cache is not None:
            n_keys = int(positions.max()) + 1  # keys are cache positions 0..n_keys-1
            cache.reserve(n_keys)
        else:
            n_keys = T  # keys are this call's tokens
            if self.config.max_seq_len < T or int(positions.max()) >= self.config.max_seq_len:
                raise ValueError(f"{T} tokens exceed the context window of {self.config.max_seq_len}")
        x = self.embed_tokens(idx)  # (B, T, dim)
        if (
            T == 1
            and cache is not None
            and x.dtype in FAST_DTYPES
            and fast_ops() is not None
            and _decode_kernels_fit(positions, slots)
        ):
            return self._decode_step(x, positions, cache, slots, logits_rows)
        is_causal, mask = False, None  # a paged cache masks each sequence itself
        if not getattr(cache, "paged", False):
            is_causal, mask = self._mask(positions, n_keys, default_positions, with_cache=cache is not None)
        cos = sin = None
        if self.config.positions == "rope":
            cos = self._table("cos", device)[positions][:, None].to(x.dtype)  # (B, 1, T, hd)
            sin = self._table("sin", device)[positions][:, None].to(x.dtype)
        elif self.config.positions == "learned":
            x = x + self.embed_positions(positions)
        else:
            x = x + self._table("sinusoidal", device)[positions].to(x.dtype)

        ctx = ForwardContext(
            positions=positions, cos=cos, sin=sin, mask=mask, is_causal=is_causal, cache=cache, slots=slots,
            n_keys=n_keys,
        )  # fmt: skip
        for layer in self.layers:
            x = layer(x, ctx)
        if logits_rows is not None:
            x = x[logits_rows]  # (K, T, dim)
        if logits_at is not None:
            x = x[torch.arange(x.shape[0], device=device), logits_at][:, None]  # (B, 1, dim)
        elif logits_from:
            x = x[:, logits_from:]
        return self.lm_head(self.norm(x))

    def _decode_step(
        self, x: Tensor, positions: Tensor, cache: KVCache, slots: Tensor | None, logits_rows: Tensor | None = None
    ) -> Tensor:
        """One new token per row (B, 1), each row its own sequence, through our decode kernels (see the module
        docstring); `logits_rows` keeps only the rows whose logits are wanted."""
        B = x.shape[0]
        cos = sin = None
        if self.config.positions == "rope":
            cos, sin = self._table("cos", x.device), self._table("sin", x.device)  # (max_seq_len, hd) float32
        elif self.config.positions == "learned":
            x = x + self.embed_positions(positions)
        else:
            x = x + self._table("sinusoidal", x.device)[positions].to(x.dtype)
        tables, lengths = cache.block_tables(slots, B), (positions[:, 0] + 1).to(torch.int32)
        positions = positions.long()
        stack = self.decode_stack()
        if stack is not None:  # the same kernels as the loop below, called from C++: no per-module Python
            x = stack.forward(x, positions, cos, sin, *cache.all_pools(), tables, lengths)
        else:
            ctx = ForwardContext(
                positions=positions, cos=cos, sin=sin, cache=cache, slots=slots, decode=True, block_tables=tables,
                lengths=lengths,
            )  # fmt: skip
            for layer in self.layers:
                x = layer(x, ctx)
        if logits_rows is not None:
            x = x[logits_rows]  # (K, 1, dim)
        return self.lm_head(self.norm(x))

    def decode_stack(self) -> object | None:
        """The kernels' `DecodeStack` for this model, or None where the blocks must run as Python modules.

        A decode step is ~10 kernel calls per block, and the nn.Module calls around them cost as much as the
        kernels (~5 ms of Python per token for the bundled 30 blocks). The stack makes the same calls, in the
        same order, from C++, so its logits equal the module loop's bit for bit (tests/test_decode_stack.py).
        It is made from the modules as they are: every block a Llama block with RMSNorms and fused low-bit
        q/k/v and gate/up projections. Anything else (dense weights, GPT-2 blocks, a LoRA adapter wrapping a
        projection, an attention recording its weights) keeps the module loop. It is remade whenever a
        block's modules are replaced (checked each step) or the model is moved or cast (`_apply`).
        """
        if not self.use_decode_stack or torch.is_grad_enabled():  # the kernels have no backward
            return None
        structure = self._structure()
        if self._stack is None or self._stack[1] != structure:
            self._stack = (self._make_stack(), structure)
        return self._stack[0]

    def _structure(self) -> list[tuple[object, ...]]:
        """Each block's modules and its attention's `record_weights`: what a stack depends on. Read from
        `_modules` directly, the cheap way (nn.Module attribute lookups cost ~1 us each, every step)."""
        out = []
        for block in self._modules["layers"]._modules.values():  # type: ignore[union-attr]
            attn, mlp = block._modules["self_attn"], block._modules["mlp"]  # type: ignore[union-attr]
            out.append(
                (*block._modules.values(), *attn._modules.values(), *mlp._modules.values(), attn.record_weights)  # type: ignore[union-attr]
            )
        return out

    def _make_stack(self) -> object | None:
        ops = kernels.load()
        dtype = self.embed_tokens.weight.dtype
        if ops is None or dtype not in FAST_DTYPES or not hasattr(ops, "DecodeStack"):
            return None
        linears, norms, eps = [], [], set()
        for block in self.layers:
            attn, mlp = block.self_attn, block.mlp
            if attn.record_weights or getattr(mlp, "kind", None) != "swiglu":
                return None
            if attn.qkv_parts != (attn.q_proj, attn.k_proj, attn.v_proj) or mlp.gate_up_parts != (
                mlp.gate_proj,
                mlp.up_proj,
            ):
                return None  # not fused (dense weights), or a part wrapped by an adapter
            for norm in (block.input_layernorm, block.post_attention_layernorm):
                if type(norm) is not RMSNorm or norm.weight.dtype != dtype:
                    return None
                norms.append(norm.weight)
                eps.add(norm.eps)
            for layer in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj):
                to_stack = getattr(layer, "to_stack", None)
                linear = to_stack(ops) if to_stack is not None else None
                if linear is None:
                    return None
                linears.append(linear)
        if len(eps) != 1:
            return None
        a = self.layers[0].self_attn
        return ops.DecodeStack(linears, norms, eps.pop(), a.n_head, a.n_kv_head, a.head_dim, a.head_dim**-0.5)

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        self._stack = None  # .to() / .half() / ... may replace the tensors a stack holds
        return super()._apply(fn, recurse)

    @staticmethod
    def _mask(positions: Tensor, n_keys: int, default_positions: bool, with_cache: bool) -> tuple[bool, Tensor | None]:
        """(is_causal, mask) for SDPA: the cheapest form of "key visible iff its position <= the query's"."""
        B, T = positions.shape
        if not with_cache:
            if default_positions:
                return True, None
            return False, (positions[:, None, :] <= positions[:, :, None])[:, None]  # (B, 1, T, T)
        if T == 1 and bool((positions == n_keys - 1).all()):
            return False, None  # one new token per row at the end of its keys: everything is visible
        if B == 1 and n_keys == T and default_positions:
            return True, None  # prefill from position 0: the fused causal kernel
        return False, visible_keys(positions, n_keys)[:, None]  # (B, 1, T, S)

    def new_cache(self, n_slots: int = 1, capacity: int = 256) -> KVCache:
        p = self.embed_tokens.weight
        return KVCache(self.config, n_slots, dtype=p.dtype, device=p.device, capacity=capacity)
