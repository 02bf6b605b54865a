"""The kernels' one-call decode step (`DecodeStack`, kernels/csrc/stack.cpp) against the module loop it replaces.

The stack calls the very kernels the modules call, in the same order, on the same tensors, so the logits are
compared exactly: any difference would be a different computation, not rounding. It must also step aside
whenever the modules are no longer what it was made from (a LoRA adapter wrapping a projection, an attention
recording its weights), and never run with autograd on.
"""

from __future__ import annotations

import pytest
import torch

from mini_claude import kernels
from mini_claude.adapters import AdapterSet
from mini_claude.config import PRESETS
from mini_claude.kv_cache import PagedKVCache
from mini_claude.lora import LoRAConfig, apply_lora, save_adapter
from mini_claude.model import Transformer
from mini_claude.quantize import quantize_model

pytestmark = pytest.mark.one_thread
if kernels.load() is None:
    pytest.skip(f"kernels not built: {kernels.status()}", allow_module_level=True)


def _model(mode: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> Transformer:
    model = Transformer(PRESETS["tiny-llama"])
    model.init_weights(std=0.3, generator=torch.Generator().manual_seed(seed))
    model = model.to(dtype).eval().requires_grad_(False)
    return quantize_model(model, mode)  # type: ignore[return-value]


def _decode_logits(model: Transformer, prompts: list[list[int]], steps: int, stack: bool) -> torch.Tensor:
    """Greedy decode of several sequences together through a paged cache; every step's logits, (steps, B, V)."""
    model.use_decode_stack = stack
    B = len(prompts)
    out = []
    with torch.inference_mode():
        cache = PagedKVCache(model.config, n_slots=B, dtype=model.embed_tokens.weight.dtype, block_size=16)
        lengths = []
        last = []
        for slot, prompt in enumerate(prompts):
            cache.start(slot, prompt)
            cache.extend(slot, len(prompt) + steps)
            logits = model(
                torch.tensor([prompt]), positions=torch.arange(len(prompt))[None], cache=cache,
                slots=torch.tensor([slot]),
            )  # fmt: skip
            last.append(logits[0, -1])
            lengths.append(len(prompt))
        step = torch.stack(last)
        for i in range(steps):
            out.append(step.float())
            ids = step.argmax(-1)[:, None]
            positions = torch.tensor([[n + i] for n in lengths])
            step = model(ids, positions=positions, cache=cache, slots=torch.arange(B))[:, -1]
    return torch.stack(out)


MODES = [("int4", torch.float32), ("int4", torch.bfloat16), ("int8", torch.float32)]


@pytest.mark.parametrize(("mode", "dtype"), MODES)
def test_stack_equals_the_module_loop_exactly(mode: str, dtype: torch.dtype) -> None:
    model = _model(mode, dtype)
    with torch.inference_mode():
        assert model.decode_stack() is not None, "a fused low-bit Llama model gets a stack"
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1, 8, 2, 8, 1, 8, 2, 8, 4, 5, 9, 0, 4, 5, 2, 3, 5, 3]]
    fast = _decode_logits(model, prompts, 12, stack=True)
    loop = _decode_logits(model, prompts, 12, stack=False)
    assert torch.equal(fast, loop)


def test_stack_steps_aside_for_a_served_adapter(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A served adapter wraps projections in `AdapterLinear`: the module loop runs it, and its logits differ."""
    dense = Transformer(PRESETS["tiny-llama"])
    dense.init_weights(std=0.3, generator=torch.Generator().manual_seed(0))
    apply_lora(dense, LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    save_adapter(dense, tmp_path / "tiny")
    model = _model("int4")
    with torch.inference_mode():
        first = model.decode_stack()
        assert first is not None
        assert model.decode_stack() is first  # made once, reused while nothing changes
    adapters = AdapterSet(model)
    adapters.load(tmp_path / "tiny", "tiny")
    with torch.inference_mode():
        assert model.decode_stack() is None
    with adapters.route(["tiny", "tiny"]):
        adapted = _decode_logits(model, [[3, 1, 4, 1], [5, 9, 2, 6]], 3, stack=True)
    base = _decode_logits(_model("int4"), [[3, 1, 4, 1], [5, 9, 2, 6]], 3, stack=True)
    assert not torch.equal(adapted, base)


def test_stack_steps_aside_for_recorded_weights_and_autograd() -> None:
    model = _model("int4")
    assert model.decode_stack() is None  # autograd on: the kernels have no backward
    model.layers[1].self_attn.record_weights = True
    with torch.inference_mode():
        assert model.decode_stack() is None
    model.layers[1].self_attn.record_weights = False
    with torch.inference_mode():
        assert model.decode_stack() is not None


def test_dense_and_gpt2_models_keep_the_module_loop() -> None:
    dense = Transformer(PRESETS["tiny-llama"]).eval()
    gpt2 = quantize_model(Transformer(PRESETS["tiny-gpt2"]).eval(), "int4")
    with torch.inference_mode():
        assert dense.decode_stack() is None
        assert gpt2.decode_stack() is None  # type: ignore[union-attr]


def test_casting_the_model_remakes_the_stack() -> None:
    model = _model("int4")
    with torch.inference_mode():
        before = model.decode_stack()
    model.to(torch.bfloat16)
    with torch.inference_mode():
        after = model.decode_stack()
    assert after is not None and after is not before
