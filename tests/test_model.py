"""The from-scratch building blocks against PyTorch's and transformers' own implementations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mini_claude.config import PRESETS, ModelConfig
from mini_claude.model import LayerNorm, RMSNorm, Transformer, attention, causal_mask
from mini_claude.positions import apply_rope, rope_inv_freq, rope_tables, sinusoidal_positions


def random_model(name: str = "tiny-llama", seed: int = 0, std: float = 0.3, **changes: object) -> Transformer:
    config = PRESETS[name].replace(**changes) if changes else PRESETS[name]
    model = Transformer(config)
    model.init_weights(std=std, generator=torch.Generator().manual_seed(seed))
    return model.eval()


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_teaching_attention_matches_sdpa(n_kv_head: int) -> None:
    torch.manual_seed(0)
    q = torch.randn(2, 4, 7, 16)
    k, v = torch.randn(2, n_kv_head, 7, 16), torch.randn(2, n_kv_head, 7, 16)
    ours, weights = attention(q, k, v, causal_mask(7), return_weights=True)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=n_kv_head != 4)
    torch.testing.assert_close(ours, ref)
    assert weights.shape == (2, 4, 7, 7)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 7))
    assert torch.all(weights.triu(1) == 0), "a query attended to a future position"


def test_attention_with_boolean_mask_and_offset_queries_matches_sdpa() -> None:
    torch.manual_seed(1)
    q, k, v = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 10, 8), torch.randn(1, 2, 10, 8)
    mask = causal_mask(3, 10)  # the last 3 of 10 positions
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(attention(q, k, v, mask), ref)
    torch.testing.assert_close(attention(q, k, v, mask == 0), ref)


def test_causal_mask_values() -> None:
    m = causal_mask(3)
    assert m.tolist() == [[0, -math.inf, -math.inf], [0, 0, -math.inf], [0, 0, 0]]
    assert causal_mask(2, 4).tolist() == [[0, 0, 0, -math.inf], [0, 0, 0, 0]]


def test_sinusoidal_positions_follow_the_formula() -> None:
    pe = sinusoidal_positions(50, 16)
    for pos in (0, 1, 7, 49):
        for i in range(8):
            angle = pos / 10_000 ** (2 * i / 16)
            assert pe[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-5)
            assert pe[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-5)


def test_rope_matches_transformers() -> None:
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=64)
    cfg.rope_parameters = {"rope_type": "default", "rope_theta": 10_000.0}
    torch.manual_seed(0)
    q, k = torch.randn(2, 4, 9, 16), torch.randn(2, 4, 9, 16)
    pos = torch.arange(3, 12)[None].expand(2, 9)
    cos_ref, sin_ref = LlamaRotaryEmbedding(cfg)(q, pos)
    q_ref, k_ref = apply_rotary_pos_emb(q, k, cos_ref, sin_ref)
    cos, sin = rope_tables(16, 64, 10_000.0)
    torch.testing.assert_close(apply_rope(q, cos[pos][:, None], sin[pos][:, None]), q_ref)
    torch.testing.assert_close(apply_rope(k, cos[pos][:, None], sin[pos][:, None]), k_ref)


def test_rope_rotation_preserves_norm_and_encodes_relative_position() -> None:
    cos, sin = rope_tables(8, 32, 10_000.0)
    torch.manual_seed(0)
    q, k = torch.randn(8), torch.randn(8)

    def rot(x: torch.Tensor, p: int) -> torch.Tensor:
        return apply_rope(x, cos[p], sin[p])

    torch.testing.assert_close(rot(q, 5).norm(), q.norm())
    # q.k after rotation depends only on the distance between the positions
    torch.testing.assert_close(rot(q, 3) @ rot(k, 1), rot(q, 12) @ rot(k, 10))


def test_llama3_rope_scaling_matches_transformers() -> None:
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    cfg = LlamaConfig(hidden_size=128, num_attention_heads=2, max_position_embeddings=1024)
    cfg.rope_parameters = {"rope_type": "llama3", "rope_theta": 500_000.0, **scaling}
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    torch.testing.assert_close(rope_inv_freq(64, 500_000.0, scaling), ref)


def test_rmsnorm_matches_torch() -> None:
    torch.manual_seed(0)
    norm = RMSNorm(32, eps=1e-6)
    norm.weight.data.normal_()
    x = torch.randn(3, 5, 32)
    torch.testing.assert_close(norm(x), F.rms_norm(x, (32,), norm.weight, eps=1e-6))


def test_layernorm_matches_torch() -> None:
    torch.manual_seed(0)
    norm = LayerNorm(32, eps=1e-5)
    norm.weight.data.normal_()
    norm.bias.data.normal_()
    x = torch.randn(3, 5, 32) * 4 + 2
    torch.testing.assert_close(norm(x), F.layer_norm(x, (32,), norm.weight, norm.bias, eps=1e-5))


def test_teaching_attention_path_gives_the_same_logits_and_records_weights() -> None:
    model = random_model()
    idx = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    fast = model(idx)
    for layer in model.layers:
        layer.self_attn.record_weights = True
    slow = model(idx)
    torch.testing.assert_close(slow, fast)
    w = model.layers[0].self_attn.last_weights
    assert w is not None and w.shape == (2, 4, 12, 12)


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen2", "tiny-gpt2"])
def test_cached_decode_equals_uncached_forward(preset: str) -> None:
    model = random_model(preset, std=0.5)
    prompt = torch.randint(0, 512, (1, 9), generator=torch.Generator().manual_seed(3))
    seq = prompt
    cache = model.new_cache(1, capacity=4)  # small, so decoding exercises the cache growing
    with torch.inference_mode():
        logits = model(prompt, cache=cache)[:, -1]
        cached_tokens = []
        for step in range(20):
            nxt = logits.argmax(-1, keepdim=True)
            cached_tokens.append(int(nxt))
            pos = torch.tensor([[prompt.shape[1] + step]])
            logits = model(nxt, positions=pos, cache=cache)[:, -1]
        for _ in range(20):  # the reference: re-run the whole sequence every step, no cache
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert cached_tokens == seq[0, prompt.shape[1] :].tolist()


def test_sinusoidal_model_runs_and_caches() -> None:
    model = random_model("tiny-llama", positions="sinusoidal")
    idx = torch.randint(0, 512, (1, 6))
    cache = model.new_cache(1)
    with torch.inference_mode():
        full = model(idx)
        part = model(idx[:, :4], cache=cache)
        last = model(idx[:, 4:], positions=torch.tensor([[4, 5]]), cache=cache)
    torch.testing.assert_close(torch.cat([part, last], 1), full, rtol=1e-4, atol=1e-5)


def test_config_rejects_inconsistent_shapes_and_counts_parameters() -> None:
    with pytest.raises(ValueError, match="multiple"):
        ModelConfig(vocab_size=10, dim=64, n_layer=1, n_head=4, n_kv_head=3, intermediate_size=8)
    for name in ("tiny-llama", "tiny-qwen2", "tiny-gpt2"):
        model = random_model(name)
        assert model.config.n_params == sum(p.numel() for p in model.parameters())
    assert ModelConfig.from_dict({**PRESETS["tiny-llama"].to_dict(), "future_field": 1}) == PRESETS["tiny-llama"]
