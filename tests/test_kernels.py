"""Our C++ kernels against the PyTorch code they replace, and their vector code against their portable code.

Tolerances follow the arithmetic: the integer dot products of the low-bit kernels are exact, so against a
float64 product of the *quantized* activations only float32 rounding remains; against the original
activations, int16 rounding (half a step of max|x| / 32767) adds a bounded error. Vector and portable code
sum floats in different orders, so they agree to float32 rounding, and their integer parts exactly.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

from mini_claude import kernels
from mini_claude.model import RMSNorm, attention
from mini_claude.positions import apply_rope, rope_tables
from mini_claude.quantize import (
    Int4Blocks,
    Int4Linear,
    Int8Blocks,
    Int8Linear,
    _LowBitLinear,
    dequantize_int4,
    dequantize_int8,
    pack_int4,
    pack_int8,
    quantize_int4,
)

pytestmark = pytest.mark.one_thread
ext = kernels.load()
if ext is None:  # the fallback is tested by every other test module running without the extension
    pytest.skip(f"kernels not built: {kernels.status()}", allow_module_level=True)


@pytest.fixture(params=["vector", "portable"])
def isa(request: pytest.FixtureRequest) -> Iterator[str]:
    ext.set_portable(request.param == "portable")
    try:
        yield request.param
    finally:
        ext.set_portable(False)


def int16_rows(x: torch.Tensor, pairs: int) -> torch.Tensor:
    """The activations as the kernels see them: (M, K) dequantized from their int16 in natural order."""
    q, _, scale = ext.quantize_activations(x, pairs)
    # invert the pair layout: slot -> (block, weight), see quantize.LO_SRC / HI_SRC
    from mini_claude.quantize import HI_SRC, LO_SRC

    src = torch.cat([LO_SRC, HI_SRC])  # pair-local weight index held by each of the 64 slots
    natural = torch.empty_like(q)
    for p in range(pairs):
        natural[:, p * 64 + src] = q[:, p * 64 + torch.arange(64)]
    return natural[:, : x.shape[1]].double() * scale.double()[:, None]


def test_activation_quantization_is_exact_and_the_same_in_both_codes() -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 96) * torch.tensor([1.0, 100.0, 1e-3])[:, None]
    got = {}
    for portable in (False, True):
        ext.set_portable(portable)
        got[portable] = ext.quantize_activations(x, 2)
    ext.set_portable(False)
    for a, b in zip(got[False], got[True], strict=True):
        assert torch.equal(a, b)
    q, sums, scale = got[False]
    assert q.abs().max() == 32767
    back = int16_rows(x, 2)
    assert ((back - x.double()).abs() <= scale.double()[:, None] / 2 + 1e-12).all()
    # block sums in natural order: sum of each block's 32 int16 values (the padded block sums to 0)
    blocks = (back / scale.double()[:, None]).round().view(3, 3, 32).sum(-1)
    assert torch.equal(sums[:, :3].double(), blocks) and (sums[:, 3] == 0).all()


@pytest.mark.parametrize(("M", "N", "K"), [(1, 8, 64), (2, 10, 96), (3, 36, 256), (5, 12, 1536)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_q4_linear_matches_dequantized_matmul(isa: str, M: int, N: int, K: int, dtype: torch.dtype) -> None:
    torch.manual_seed(M * N)
    w = torch.randn(N, K)
    blocks = Int4Blocks(*quantize_int4(w))
    x = torch.randn(M, K).to(dtype)
    bias = torch.randn(N)
    packed = pack_int4(blocks)
    y = ext.q4_linear(x, packed["qweight"], packed["scales"], packed["mins"], bias, N, True)
    w_hat = dequantize_int4(blocks.q, blocks.scales, blocks.zeros).double()
    exact = int16_rows(x.float(), packed["qweight"].shape[1]) @ w_hat.T + bias.double()
    scale = (exact.abs().max() + 1).item()
    torch.testing.assert_close(y.double(), exact, rtol=0, atol=2e-6 * scale)  # float32 sums only
    ref = x.double() @ w_hat.T + bias.double()
    step = x.float().abs().amax(1, keepdim=True).double() / 32767  # int16 step of each row
    bound = step / 2 * w_hat.abs().sum(1)[None] + 2e-6 * scale
    assert ((y.double() - ref).abs() <= bound).all()
    y_bf16 = ext.q4_linear(x, packed["qweight"], packed["scales"], packed["mins"], bias, N, False)
    assert y_bf16.dtype == dtype
    torch.testing.assert_close(y_bf16.float(), y.to(dtype).float(), rtol=0, atol=0)


@pytest.mark.parametrize(("M", "K"), [(1, 96), (3, 576), (2, 1536)])
def test_q4_linear_reads_float16_scales_and_minimums_as_gguf_stores_them(isa: str, M: int, K: int) -> None:
    """GGUF's Q4_1 blocks hold float16 d and m, which the packing keeps as float16; the kernels read them in
    vectors of 8 or 16, so 18 blocks (K = 576, the model's width) end in a partial vector, 3 in half a pair."""
    torch.manual_seed(K + M)
    N, groups = 12, K // 32
    d = (torch.rand(N, groups) * 0.1 + 0.01).half().float()
    m = (torch.randn(N, groups) * 0.2).half().float()
    blocks = Int4Blocks(torch.randint(0, 16, (N, K), dtype=torch.uint8), d, m + 8 * d)  # w = (q - 8) s + z
    packed = pack_int4(blocks)
    assert packed["scales"].dtype == packed["mins"].dtype == torch.float16
    x = torch.randn(M, K)
    y = ext.q4_linear(x, packed["qweight"], packed["scales"], packed["mins"], None, N, True)
    w_hat = blocks.q.double() * d.double().repeat_interleave(32, 1) + m.double().repeat_interleave(32, 1)
    exact = int16_rows(x, packed["qweight"].shape[1]) @ w_hat.T
    torch.testing.assert_close(y.double(), exact, rtol=0, atol=2e-6 * exact.abs().max().item())


@pytest.mark.parametrize(("M", "N", "K", "groups"), [(1, 8, 64, 2), (4, 20, 96, 3), (6, 16, 576, 1)])
def test_q8_linear_matches_dequantized_matmul(isa: str, M: int, N: int, K: int, groups: int) -> None:
    torch.manual_seed(K)
    blocks = Int8Blocks(torch.randint(-127, 128, (N, K), dtype=torch.int8), torch.rand(N, groups).half().float())
    x = torch.randn(2, M, K)  # leading dims are kept
    packed = pack_int8(blocks)
    assert packed["scales"].dtype == torch.float16  # fp16-exact scales are stored as fp16
    y = ext.q8_linear(x, packed["qweight"], packed["scales"], None, N, False)
    assert y.shape == (2, M, N)
    exact = int16_rows(x.reshape(-1, K), packed["qweight"].shape[1]) @ dequantize_int8(blocks).double().T
    scale = exact.abs().max().item()
    torch.testing.assert_close(y.reshape(-1, N).double(), exact, rtol=0, atol=2e-6 * scale)


def test_vector_and_portable_code_agree() -> None:
    torch.manual_seed(3)
    blocks = Int4Blocks(*quantize_int4(torch.randn(64, 320)))
    packed = pack_int4(blocks)
    x = torch.randn(7, 320)
    out = {}
    for portable in (False, True):
        ext.set_portable(portable)
        out[portable] = ext.q4_linear(x, packed["qweight"], packed["scales"], packed["mins"], None, 64, True)
    ext.set_portable(False)
    scale = out[True].abs().max().item()  # float32 sums in another order: rounding of the largest terms
    torch.testing.assert_close(out[False], out[True], rtol=0, atol=2e-6 * scale)


def test_fused_layer_equals_its_parts_exactly() -> None:
    """One fused matmul computes each row exactly as the separate layer would (same tiles, same activations)."""
    torch.manual_seed(4)
    layers = [Int4Linear.from_linear(torch.nn.Linear(64, n)) for n in (32, 8, 8)]
    fused = _LowBitLinear.concat(layers)  # type: ignore[arg-type]
    x = torch.randn(3, 64)
    with torch.inference_mode():
        y = fused(x)
        assert torch.equal(y, torch.cat([m(x) for m in layers], dim=-1))
        assert torch.equal(fused.rows(32, 40)(x), layers[1](x))
    assert fused.rows(32, 40).qweight.data_ptr() == fused.qweight[8:].data_ptr()  # a view, not a copy


def test_int8_layer_keeps_q8_blocks_and_float_logits() -> None:
    torch.manual_seed(5)
    blocks = Int8Blocks(torch.randint(-127, 128, (40, 64), dtype=torch.int8), torch.rand(40, 2))
    head = Int8Linear(blocks, None, float_out=True)
    x = torch.randn(1, 1, 64, dtype=torch.bfloat16)
    y = head(x)
    assert y.dtype == torch.float32 and y.shape == (1, 1, 40)
    ref = x.double().reshape(1, 64) @ dequantize_int8(blocks).double().T
    torch.testing.assert_close(y.reshape(1, 40).double(), ref, rtol=0, atol=3e-4 * ref.abs().max().item())


def paged_cache(
    lengths: list[int], n_kv: int, block: int, d: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Pools of shuffled blocks, each row's block table, and the contiguous keys/values they stand for."""
    n_blocks = sum(-(-n // block) for n in lengths) + 2
    k_pool, v_pool = torch.randn(n_blocks, n_kv, block, d).to(dtype), torch.randn(n_blocks, n_kv, block, d).to(dtype)
    order = torch.randperm(n_blocks).tolist()
    width = max(-(-n // block) for n in lengths)
    tables = torch.zeros(len(lengths), width, dtype=torch.int32)
    rows = []
    for b, n in enumerate(lengths):
        ids = [order.pop() for _ in range(-(-n // block))]
        tables[b, : len(ids)] = torch.tensor(ids, dtype=torch.int32)
        k = torch.cat([k_pool[i] for i in ids], dim=1)[:, :n]  # (n_kv, n, d)
        v = torch.cat([v_pool[i] for i in ids], dim=1)[:, :n]
        rows.append((k, v))
    return k_pool, v_pool, tables, rows


@pytest.mark.parametrize(("n_head", "n_kv"), [(4, 4), (6, 2), (3, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_matches_the_teaching_attention(isa: str, n_head: int, n_kv: int, dtype: torch.dtype) -> None:
    torch.manual_seed(n_head)
    lengths, d = [1, 17, 40], 32
    k_pool, v_pool, tables, rows = paged_cache(lengths, n_kv, 16, d, dtype)
    q = torch.randn(len(lengths), n_head, d).to(dtype)
    y = ext.decode_attention(q, k_pool, v_pool, tables, torch.tensor(lengths, dtype=torch.int32), d**-0.5)
    assert y.shape == q.shape and y.dtype == dtype
    for b, (k, v) in enumerate(rows):
        ref = attention(q[b][None, :, None].double(), k[None].double(), v[None].double())[0, :, 0]  # (n_head, d)
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(y[b].double(), ref, rtol=tol, atol=tol)


def test_decode_attention_refuses_a_length_past_its_blocks() -> None:
    k_pool, v_pool, tables, _ = paged_cache([8], 1, 8, 16, torch.float32)
    with pytest.raises(RuntimeError, match="does not fit"):
        ext.decode_attention(torch.randn(1, 1, 16), k_pool, v_pool, tables, torch.tensor([9], dtype=torch.int32), 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_kv_write_matches_apply_rope_and_writes_the_cache(isa: str, dtype: torch.dtype) -> None:
    torch.manual_seed(6)
    n_head, n_kv, d, block = 4, 2, 16, 8
    cos, sin = rope_tables(d, 64, 10_000.0)
    qkv = torch.randn(2, 1, (n_head + 2 * n_kv) * d).to(dtype)
    positions = torch.tensor([[3], [12]])
    k_pool, v_pool = torch.zeros(4, n_kv, block, d, dtype=dtype), torch.zeros(4, n_kv, block, d, dtype=dtype)
    tables = torch.tensor([[2, 0], [3, 1]], dtype=torch.int32)
    q = ext.rope_kv_write(qkv, positions, cos, sin, k_pool, v_pool, tables, n_head, n_kv)
    qr, kr, vr = qkv.float().split([n_head * d, n_kv * d, n_kv * d], dim=-1)
    c, s = cos[positions][:, None], sin[positions][:, None]  # (B, 1, 1, d)
    want_q = apply_rope(qr.view(2, 1, n_head, d).transpose(1, 2), c, s).transpose(1, 2)
    want_k = apply_rope(kr.view(2, 1, n_kv, d).transpose(1, 2), c, s)  # (B, n_kv, 1, d)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}
    torch.testing.assert_close(q.float(), want_q, **tol)
    for b, (blk, off) in enumerate([(2, 3), (1, 4)]):  # position 3 -> block 0 of row 0; 12 -> block 1 of row 1
        torch.testing.assert_close(k_pool[blk, :, off].float(), want_k[b, :, 0], **tol)
        assert torch.equal(v_pool[blk, :, off], vr[b, 0].view(n_kv, d).to(dtype))
    assert k_pool.count_nonzero() == 2 * n_kv * d  # nothing else was written


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_and_silu_mul_match_pytorch(isa: str, dtype: torch.dtype) -> None:
    torch.manual_seed(7)
    norm = RMSNorm(96).to(dtype)
    norm.weight.data = torch.randn(96).to(dtype)
    x = torch.randn(2, 3, 96).to(dtype)
    ref = norm(x)  # autograd on: the PyTorch code
    got = ext.rms_norm(x, norm.weight.detach(), norm.eps)
    ulp = 1e-6 if dtype == torch.float32 else 2**-7
    torch.testing.assert_close(got.float(), ref.float(), rtol=2 * ulp, atol=2 * ulp)
    gu = torch.randn(2, 3, 64).to(dtype) * 4
    g, u = gu.float().chunk(2, dim=-1)
    torch.testing.assert_close(ext.silu_mul(gu).float(), F.silu(g) * u, rtol=ulp, atol=ulp)


@pytest.mark.parametrize("V", [1, 15, 16, 17, 49152 + 5])
def test_row_argmax_is_torchs_max_and_argmax(isa: str, V: int) -> None:
    """Exact, ties to the first index, NaN the greatest: rows with repeated maxima, -inf everywhere, a NaN
    late in the row and one in the tail, so every vector lane and the tail mask are exercised."""
    torch.manual_seed(11)
    x = torch.randint(-3, 4, (6, V)).float()  # few distinct values: the maximum repeats in most rows
    x[1] = -math.inf
    x[2, V // 2] = math.nan
    x[3, -1] = math.nan
    x[4] = torch.randn(V)
    values, indices = ext.row_argmax(x)
    assert indices.tolist() == x.argmax(-1).tolist()
    torch.testing.assert_close(values, x.max(-1).values, equal_nan=True, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="row_argmax"):
        ext.row_argmax(x.to(torch.bfloat16))


def _greedy_steps(model, prompt: list[int], steps: int, fast: bool) -> tuple[list[int], torch.Tensor]:
    """Greedy decode through the cache, on the fast path (no autograd) or on the PyTorch code (autograd on)."""
    context = torch.no_grad() if fast else torch.enable_grad()
    out, logits = [], []
    with context:
        cache = model.new_cache(1)
        step = model(torch.tensor([prompt]), cache=cache)[0, -1]
        for i in range(steps):
            logits.append(step.detach().float())
            out.append(int(step.argmax()))
            pos = torch.tensor([[len(prompt) + i]])
            step = model(torch.tensor([[out[-1]]]), positions=pos, cache=cache)[0, -1]
    return out, torch.stack(logits)


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-gpt2"])
def test_fast_decode_gives_the_reference_tokens_on_the_dense_fp32_path(preset: str) -> None:
    """The dense fp32 model decoded with our kernels equals the PyTorch code: same greedy tokens (a different
    token is allowed only where the two best logits are within float32 rounding of a tie) and close logits."""
    from mini_claude.config import PRESETS
    from mini_claude.model import Transformer

    model = Transformer(PRESETS[preset])
    model.init_weights(std=0.3, generator=torch.Generator().manual_seed(0))
    model.eval().requires_grad_(False)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    fast_ids, fast = _greedy_steps(model, prompt, 24, fast=True)
    ref_ids, ref = _greedy_steps(model, prompt, 24, fast=False)
    for i, (a, b) in enumerate(zip(fast_ids, ref_ids, strict=True)):
        if a != b:
            top2 = ref[i].topk(2).values
            assert top2[0] - top2[1] < 1e-4, f"step {i}: {a} != {b} without a near tie"
            break  # after a legitimate divergence the sequences differ
        torch.testing.assert_close(fast[i], ref[i], rtol=1e-4, atol=1e-4)


def test_int4_model_on_our_kernels_stays_close_to_pytorchs_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same int4 values on both kernel sets: ours (int16 activations, exact fp16/fp32 scales) and PyTorch's
    (bf16 activations and bf16 scales), teacher-forced on the same tokens, agree on the ranking."""
    from mini_claude.config import PRESETS
    from mini_claude.model import Transformer
    from mini_claude.quantize import quantize_model

    def build() -> Transformer:
        model = Transformer(PRESETS["tiny-llama"])
        model.init_weights(std=0.3, generator=torch.Generator().manual_seed(1))
        return quantize_model(model.eval(), "int4")  # type: ignore[return-value]

    ours = build()
    assert ours.layers[0].self_attn.qkv_proj is not None  # fused over our layout
    with monkeypatch.context() as m:
        m.setattr(kernels, "_ext", None)
        m.setattr(kernels, "_tried", True)  # load() now answers None: PyTorch's kernels and layout
        theirs = build()
        assert theirs.layers[0].self_attn.qkv_proj is None
        tokens = torch.randint(0, 256, (1, 28), generator=torch.Generator().manual_seed(2))
        ref = _forced_steps(theirs, tokens, 16)
    got = _forced_steps(ours, tokens, 16)
    assert (got - ref).norm() / ref.norm() < 0.02  # bf16 activations and scales on their side: ~2^-8 relative
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9


def _forced_steps(model, tokens: torch.Tensor, n_prompt: int) -> torch.Tensor:
    """Logits of each decode step fed the given tokens (teacher forcing), through the cache."""
    with torch.inference_mode():
        cache = model.new_cache(1)
        model(tokens[:, :n_prompt], cache=cache)
        return torch.stack(
            [
                model(tokens[:, p : p + 1], positions=torch.tensor([[p]]), cache=cache)[0, 0].float()
                for p in range(n_prompt, tokens.shape[1])
            ]
        )
