"""The paged KV cache: keys and values in fixed-size blocks, a block table per sequence, prefix caching.

Why pages: a cache of one contiguous buffer per sequence slot must be as long as the longest sequence in every
slot, so one 6,000-token request grows all eight slots to 6,000 positions and the memory never comes back.
Blocks are handed to a sequence as it grows and taken back when it ends, so memory follows the live tokens.

Design choices (after vLLM's PagedAttention, Kwon et al. 2023, and its automatic prefix caching):

- One pool for every layer, `(n_blocks, n_layer, 2, n_kv_head, block_size, head_dim)`, in one anonymous memory
  map. Layer l's keys are the view `pool[:, l, 0]`: `(n_blocks, n_kv_head, block_size, head_dim)`, the form the
  decode-attention kernel reads. One block of every layer is one contiguous byte range, so a freed block's pages
  go back to the operating system (`madvise(MADV_DONTNEED)`) and resident memory follows live tokens. The map is
  reserved for the worst case (every slot at the full context) and costs nothing until written.
- A sequence (a *slot*) owns a block table: position p lives in block `table[p // block_size]`, row
  `p % block_size`. New keys always go to the sequence's own blocks; shared blocks are only read.
- Prefix caching: a full block is named by a hash chained over (parent block's hash, its tokens, a namespace:
  the LoRA adapter, since keys differ per adapter). A new sequence starts with the longest chain of cached
  blocks that matches its prompt (all but the prompt's last token, whose logits must be computed) and computes
  only the rest. Blocks are reference-counted; a block nobody uses stays cached, least recently used first out,
  until the pool needs it or more than `prefix_cache_blocks` idle blocks are kept. Only full blocks are shared.
- Attention (`attend`): this forward's keys and values are written into the blocks first, then each sequence
  attends over its own keys: all single-token rows together through `decode_attention` (the C++ kernel in
  `kernels/` when it is built; `decode_attention` below is its PyTorch reference), and each multi-token run of a
  prompt (a prefill chunk) with SDPA over its gathered prefix and a causal mask shifted by the prefix length.
  So one forward may mix decode rows and prefill chunks of different sequences, as llama-server's batches do.
"""

from __future__ import annotations

import hashlib
import math
import mmap
from array import array
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from mini_claude import kernels
from mini_claude.config import ModelConfig

BLOCK_SIZE = 16


class CacheFullError(RuntimeError):
    """No free block is left for a sequence (only when the pool was made smaller than the worst case)."""


def decode_attention(
    q: Tensor, k_pool: Tensor, v_pool: Tensor, block_tables: Tensor, lengths: Tensor, scale: float
) -> Tensor:
    """One query per row over that row's cached keys, read through its block table.

    q: (B, n_head, head_dim); k_pool, v_pool: (n_blocks, n_kv_head, block_size, head_dim); block_tables: int32
    (B, max_blocks); lengths: int32 (B,), the number of keys row b sees (positions 0..lengths[b]-1).
    Returns (B, n_head, head_dim). This is the PyTorch reference of the C++ kernel of the same name: gather each
    row's blocks into one key sequence, then softmax(q k^T * scale + mask) v, written out in float32 (for one
    query per row, two batched matmuls beat SDPA's CPU kernel, which is built for long query blocks, by ~10x).
    """
    B, H, D = q.shape
    n_kv, bs = k_pool.shape[1], k_pool.shape[2]
    n_blocks = -(-int(lengths.max()) // bs)
    index = block_tables[:, :n_blocks].reshape(-1).long()
    S = n_blocks * bs
    keys, values = (
        torch.empty(B, n_kv, n_blocks, bs, D, dtype=torch.float32, device=q.device)
        .copy_(pool.index_select(0, index).view(B, n_blocks, n_kv, bs, D).transpose(1, 2))
        .view(B, n_kv, S, D)
        for pool in (k_pool, v_pool)
    )  # (B, n_kv, S, hd): one copy gathers, reorders and widens
    queries = q.float().view(B, n_kv, H // n_kv, D) * scale  # each key/value head serves H // n_kv query heads
    scores = torch.matmul(queries, keys.transpose(-1, -2))  # (B, n_kv, G, S)
    hidden = torch.arange(S, device=q.device) >= lengths.to(q.device).long()[:, None]  # (B, S) past each row's end
    scores.masked_fill_(hidden[:, None, None], -math.inf)
    out = torch.matmul(torch.softmax(scores, dim=-1), values)  # (B, n_kv, G, hd)
    return out.view(B, H, D).to(q.dtype)


def _decode_attention_impl() -> Callable[..., Tensor]:
    """The compiled kernel when it may run (built, no autograd graph to record), else the reference."""
    ops = None if torch.is_grad_enabled() else kernels.load()
    return decode_attention if ops is None else ops.decode_attention


@dataclass
class CacheStats:
    """Prefix-cache counters since the cache was made (the server's /metrics reports them)."""

    lookups: int = 0  # sequences whose prompt was looked up
    hits: int = 0  # of those, sequences that reused at least one block
    reused_tokens: int = 0  # prompt tokens whose keys and values came from the cache
    prompt_tokens: int = 0  # prompt tokens looked up in all
    evicted_blocks: int = 0


@dataclass
class _Chunk:
    """A run of one sequence's consecutive tokens in a forward: rows [start, stop) of the flattened tokens."""

    start: int
    stop: int
    blocks: Tensor  # (n,) the blocks holding keys 0..n_keys-1
    n_keys: int
    mask: Tensor | None  # (T, S) bool, None when the run starts at position 0 (plain causal attention)


@dataclass
class _Plan:
    """Where one forward's tokens go and what each attends to; made at layer 0, used by every layer."""

    blocks: Tensor  # (N,) block of each flattened token
    offsets: Tensor  # (N,) its row inside the block
    decode_rows: Tensor | None = None  # (R,) tokens that attend alone (one per sequence in this forward)
    tables: Tensor | None = None  # (R, max_blocks) int32
    lengths: Tensor | None = None  # (R,) int32
    all_decode: bool = False
    chunks: list[_Chunk] = field(default_factory=list)


def kv_bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
    """Memory one position's keys and values take in every layer."""
    element = torch.empty((), dtype=dtype).element_size()
    return config.n_layer * 2 * config.n_kv_head * config.head_dim * element  # type: ignore[operator]


def _anonymous_pool(
    shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str
) -> tuple[Tensor, mmap.mmap | None]:
    """A zero-filled tensor in its own anonymous memory map (page-aligned, pages untouched until written)."""
    n_bytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if torch.device(device).type != "cpu" or n_bytes == 0:
        return torch.zeros(shape, dtype=dtype, device=device), None
    buffer = mmap.mmap(-1, n_bytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return torch.frombuffer(buffer, dtype=dtype).view(shape), buffer


class PagedKVCache:
    """Block pools, a free list, per-slot block tables and the prefix cache; see the module docstring."""

    paged = True  # the model asks `attend()` for attention instead of `update()` for keys

    def __init__(
        self,
        config: ModelConfig,
        n_slots: int = 1,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        block_size: int = BLOCK_SIZE,
        n_blocks: int | None = None,
        prefix_cache_blocks: int = 0,
        warm_blocks: int = 64,
    ) -> None:
        self.config = config
        self.block_size = block_size
        self.max_seq_len = config.max_seq_len
        self.blocks_per_sequence = -(-config.max_seq_len // block_size)
        n_blocks = n_blocks if n_blocks is not None else max(n_slots, 1) * self.blocks_per_sequence
        shape = (n_blocks, config.n_layer, 2, config.n_kv_head, block_size, config.head_dim)
        self.pool, self._map = _anonymous_pool(shape, dtype, device)  # type: ignore[arg-type]
        self.block_bytes = math.prod(shape[1:]) * self.pool.element_size()
        self._all_pools: tuple[list[Tensor], list[Tensor]] | None = None
        self.prefix_cache_blocks = prefix_cache_blocks
        self.warm_limit = warm_blocks
        self.ref = [0] * n_blocks
        self._used = 0  # blocks with ref > 0
        self.key_of: list[bytes | None] = [None] * n_blocks  # the prefix hash a block is registered under
        self.by_key: dict[bytes, int] = {}
        self.idle: OrderedDict[int, None] = OrderedDict()  # registered blocks nobody uses, oldest first
        self.warm: deque[int] = deque()  # free blocks whose pages are still resident: reused first
        self.cold: list[int] = list(range(n_blocks - 1, -1, -1))  # free blocks with no resident pages
        self.tables: dict[int, list[int]] = {}  # slot -> its blocks, in position order
        self.chain: dict[int, list[bytes]] = {}  # slot -> prefix hashes of its first full blocks
        self.stats = CacheStats()
        self._plan: _Plan | None = None

    # ----------------------------------------------------------------------------------------- memory
    @property
    def n_blocks(self) -> int:
        return len(self.ref)

    @property
    def used_blocks(self) -> int:
        """Blocks some running sequence holds."""
        return self._used

    @property
    def cached_blocks(self) -> int:
        """Blocks kept only for the prefix cache (nobody runs on them)."""
        return len(self.idle)

    @property
    def resident_bytes(self) -> int:
        """Bytes of blocks that hold pages: in use, cached, or free but not yet given back."""
        return (self.n_blocks - len(self.cold)) * self.block_bytes

    def _release_pages(self, block: int) -> None:
        """Give a free block's whole pages back to the operating system (they read as zeros if touched again)."""
        if self._map is None:
            return
        start, stop = block * self.block_bytes, (block + 1) * self.block_bytes
        first, last = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE, stop // mmap.PAGESIZE * mmap.PAGESIZE
        if last > first:
            self._map.madvise(mmap.MADV_DONTNEED, first, last - first)

    def _take(self) -> int:
        if self.warm:
            return self.warm.pop()
        if self.cold:
            return self.cold.pop()
        if self.idle:
            block, _ = self.idle.popitem(last=False)  # the least recently used cached block
            self._unregister(block)
            self.stats.evicted_blocks += 1
            return block
        raise CacheFullError(f"the KV cache is full ({self.n_blocks} blocks of {self.block_size} positions)")

    def _free(self, block: int) -> None:
        self.warm.append(block)
        while len(self.warm) > self.warm_limit:
            old = self.warm.popleft()
            self._release_pages(old)
            self.cold.append(old)

    def _unregister(self, block: int) -> None:
        key = self.key_of[block]
        if key is not None:
            self.key_of[block] = None
            if self.by_key.get(key) == block:
                del self.by_key[key]

    def _trim_idle(self, limit: int) -> None:
        while len(self.idle) > limit:
            block, _ = self.idle.popitem(last=False)
            self._unregister(block)
            self.stats.evicted_blocks += 1
            self._free(block)

    def clear_prefixes(self) -> None:
        """Forget every cached prefix nobody is using (e.g. when the adapters change)."""
        self._trim_idle(0)

    # ---------------------------------------------------------------------------------- prefix hashing
    @staticmethod
    def _hash(parent: bytes, tokens: list[int], namespace: bytes) -> bytes:
        return hashlib.blake2b(parent + namespace + array("q", tokens).tobytes(), digest_size=16).digest()

    def start(self, slot: int, prompt: list[int], namespace: bytes = b"") -> int:
        """Begin a sequence in `slot` with the longest cached prefix of `prompt`; returns how many prompt tokens
        it reuses (a multiple of the block size, and always less than the whole prompt)."""
        if slot in self.tables:
            raise RuntimeError(f"slot {slot} is in use")
        bs = self.block_size
        table: list[int] = []
        chain: list[bytes] = []
        parent = b""
        for i in range((len(prompt) - 1) // bs):  # the last prompt token is always computed: its logits are needed
            key = self._hash(parent, prompt[i * bs : (i + 1) * bs], namespace)
            block = self.by_key.get(key)
            if block is None:
                break
            if self.ref[block] == 0:
                self.idle.pop(block, None)
                self._used += 1
            self.ref[block] += 1
            table.append(block)
            chain.append(key)
            parent = key
        self.tables[slot], self.chain[slot] = table, chain
        reused = len(table) * bs
        self.stats.lookups += 1
        self.stats.prompt_tokens += len(prompt)
        self.stats.hits += reused > 0
        self.stats.reused_tokens += reused
        return reused

    def extend(self, slot: int, length: int) -> None:
        """Make room in `slot`'s own blocks for positions [0, length)."""
        if length > self.max_seq_len:
            raise ValueError(f"position {length - 1} is past the context window of {self.max_seq_len} tokens")
        table = self.tables[slot]
        while len(table) * self.block_size < length:
            block = self._take()
            self.ref[block] = 1
            self._used += 1
            table.append(block)

    def commit(self, slot: int, tokens: list[int], n_computed: int, namespace: bytes = b"") -> None:
        """Register `slot`'s blocks that became full, now that keys of `tokens[:n_computed]` are written."""
        if self.prefix_cache_blocks <= 0 and not self.by_key:
            return  # nothing is ever looked up: skip the hashing
        bs, table, chain = self.block_size, self.tables[slot], self.chain[slot]
        for i in range(len(chain), n_computed // bs):
            key = self._hash(chain[-1] if chain else b"", tokens[i * bs : (i + 1) * bs], namespace)
            chain.append(key)
            block = table[i]
            if key not in self.by_key and self.key_of[block] is None:
                self.by_key[key], self.key_of[block] = block, key

    def finish(self, slot: int, keep: bool = True) -> None:
        """End `slot`'s sequence: its blocks go back to the pool, full ones stay cached (unless `keep` is False,
        e.g. for a sequence that failed)."""
        table = self.tables.pop(slot, [])
        self.chain.pop(slot, None)
        for block in reversed(table):  # the tail first, so a prefix's first blocks are evicted last
            self.ref[block] -= 1
            if self.ref[block] > 0:
                continue
            self._used -= 1
            if keep and self.key_of[block] is not None and self.prefix_cache_blocks > 0:
                self.idle[block] = None
                self.idle.move_to_end(block)
            else:
                self._unregister(block)
                self._free(block)
        self._trim_idle(self.prefix_cache_blocks)

    # ----------------------------------------------------------------------------- what the model reads
    def reserve(self, length: int) -> None:
        """The model's check that positions [0, length) fit; blocks themselves come from `extend`."""
        if length > self.max_seq_len:
            raise ValueError(f"position {length - 1} is past the context window of {self.max_seq_len} tokens")

    def pools(self, layer: int) -> tuple[Tensor, Tensor]:
        """One layer's key and value pools, (n_blocks, n_kv_head, block_size, head_dim) views of the one pool."""
        return self.pool[:, layer, 0], self.pool[:, layer, 1]

    def all_pools(self) -> tuple[list[Tensor], list[Tensor]]:
        """Every layer's pools at once (the kernels' `DecodeStack` takes them per step); made once: the pool
        never moves."""
        if self._all_pools is None:
            layers = range(self.pool.shape[1])
            self._all_pools = ([self.pool[:, i, 0] for i in layers], [self.pool[:, i, 1] for i in layers])
        return self._all_pools

    def block_tables(self, slots: Tensor | list[int] | None, batch: int) -> Tensor:
        """(B, max_blocks) int32: each row's blocks in position order (padded with block 0, never read)."""
        rows = list(range(batch)) if slots is None else (slots.tolist() if isinstance(slots, Tensor) else slots)
        tables = [self.tables[s] for s in rows]
        width = max(1, max(len(t) for t in tables))
        out = torch.zeros(len(rows), width, dtype=torch.int32)
        for r, t in enumerate(tables):
            out[r, : len(t)] = torch.tensor(t, dtype=torch.int32)
        return out

    def _make_plan(self, positions: Tensor, slots: Tensor | None) -> _Plan:
        B, T = positions.shape
        pos = positions.reshape(-1).tolist()
        row_slots = list(range(B)) if slots is None else slots.tolist()
        tok_slots = [row_slots[i // T] for i in range(B * T)]
        bs = self.block_size
        tables = [self.tables[s] for s in tok_slots]
        blocks = [t[p // bs] for t, p in zip(tables, pos, strict=True)]
        plan = _Plan(torch.tensor(blocks), torch.tensor([p % bs for p in pos]))
        runs: list[tuple[int, int]] = []  # [start, stop) of each run of one sequence's consecutive positions
        for i in range(B * T):
            if runs and tok_slots[i] == tok_slots[i - 1] and pos[i] == pos[i - 1] + 1:
                runs[-1] = (runs[-1][0], i + 1)
            else:
                runs.append((i, i + 1))
        singles = [start for start, stop in runs if stop - start == 1]
        if singles:
            plan.decode_rows = torch.tensor(singles)
            plan.tables = self.block_tables([tok_slots[i] for i in singles], len(singles))
            plan.lengths = torch.tensor([pos[i] + 1 for i in singles], dtype=torch.int32)
            plan.all_decode = len(singles) == B * T
        for start, stop in runs:
            if stop - start == 1:
                continue
            first, n_keys = pos[start], pos[stop - 1] + 1
            table = tables[start][: -(-n_keys // bs)]
            mask = None
            if first != 0:
                query_pos = torch.tensor(pos[start:stop])
                mask = torch.arange(n_keys) <= query_pos[:, None]  # (T, S): a key is seen iff not after the query
            plan.chunks.append(_Chunk(start, stop, torch.tensor(table), n_keys, mask))
        return plan

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, positions: Tensor, slots: Tensor | None) -> Tensor:
        """Write this forward's keys/values into the blocks and return each token's attention output.

        q: (B, n_head, T, hd); k, v: (B, n_kv_head, T, hd) at `positions` (B, T) of the sequences in `slots` (B,)
        (default: slots 0..B-1). Row b's tokens are one sequence's; a sequence may also span rows of one token
        each (the generator's layout: every token a row). Returns (B, n_head, T, hd).
        """
        if layer == 0 or self._plan is None:
            self._plan = self._make_plan(positions, slots)
        plan = self._plan
        B, H, T, D = q.shape
        n_kv = k.shape[1]
        k_pool, v_pool = self.pools(layer)
        # Advanced indices split by a slice put their dim first: the value is (N, n_kv, hd), token-major.
        k_pool[plan.blocks, :, plan.offsets] = k.transpose(1, 2).reshape(B * T, n_kv, D).to(k_pool.dtype)
        v_pool[plan.blocks, :, plan.offsets] = v.transpose(1, 2).reshape(B * T, n_kv, D).to(v_pool.dtype)
        q_tok = q.transpose(1, 2).reshape(B * T, H, D)  # (N, nh, hd)
        scale = D**-0.5
        attend_one = _decode_attention_impl()
        if plan.all_decode:
            y = attend_one(q_tok.contiguous(), k_pool, v_pool, plan.tables, plan.lengths, scale)
            return y.view(B, T, H, D).transpose(1, 2)
        out = torch.empty_like(q_tok)
        if plan.decode_rows is not None:
            rows = plan.decode_rows
            out[rows] = attend_one(q_tok[rows].contiguous(), k_pool, v_pool, plan.tables, plan.lengths, scale)
        for c in plan.chunks:
            keys = k_pool.transpose(0, 1)[:, c.blocks].reshape(n_kv, -1, D)[None, :, : c.n_keys]  # (1, nkv, S, hd)
            values = v_pool.transpose(0, 1)[:, c.blocks].reshape(n_kv, -1, D)[None, :, : c.n_keys]
            y = F.scaled_dot_product_attention(
                q_tok[c.start : c.stop].transpose(0, 1)[None], keys, values, attn_mask=c.mask,
                is_causal=c.mask is None, enable_gqa=n_kv != H,
            )  # fmt: skip  # (1, nh, T, hd)
            out[c.start : c.stop] = y[0].transpose(0, 1)
        return out.view(B, T, H, D).transpose(1, 2)

    def update(
        self, layer: int, k: Tensor, v: Tensor, positions: Tensor, slots: Tensor | None, n_keys: int
    ) -> tuple[Tensor, Tensor]:
        """The contiguous cache's interface, for callers that want keys back: write k, v (B, H_kv, T, d) at
        `positions` (B, T) of `slots` (B,), and return keys/values [0, n_keys) of those slots, gathered."""
        plan = self._make_plan(positions, slots)
        B, n_kv, T, D = k.shape
        k_pool, v_pool = self.pools(layer)
        k_pool[plan.blocks, :, plan.offsets] = k.transpose(1, 2).reshape(B * T, n_kv, D).to(k_pool.dtype)
        v_pool[plan.blocks, :, plan.offsets] = v.transpose(1, 2).reshape(B * T, n_kv, D).to(v_pool.dtype)
        tables = self.block_tables(slots, B)[:, : -(-n_keys // self.block_size)].long()
        keys = k_pool.transpose(0, 1)[:, tables].permute(1, 0, 2, 3, 4).reshape(B, n_kv, -1, D)[:, :, :n_keys]
        values = v_pool.transpose(0, 1)[:, tables].permute(1, 0, 2, 3, 4).reshape(B, n_kv, -1, D)[:, :, :n_keys]
        return keys, values
