"""The bundled SmolLM2 GGUF: our engine against transformers loading the very same file."""

from __future__ import annotations

import pytest
import torch

from mini_claude.engine import Engine
from mini_claude.generate import SamplingParams, generate_tokens

PROMPTS = ["What is the capital of France?", "Write a short poem about the ocean.", "Explain LoRA in two sentences."]

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("prompt", PROMPTS)
def test_logits_match_transformers(prompt: str, ours_bundled_fp32: Engine, hf_bundled) -> None:
    hf_model, _ = hf_bundled
    ids = ours_bundled_fp32.encode_chat([{"role": "user", "content": prompt}])
    x = torch.tensor([ids])
    with torch.no_grad():
        ref = hf_model(x).logits
        ours = ours_bundled_fp32.model(x)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=2e-4)


def test_greedy_decoding_matches_transformers(ours_bundled_fp32: Engine, hf_bundled) -> None:
    hf_model, _ = hf_bundled
    prompts = [ours_bundled_fp32.encode_chat([{"role": "user", "content": p}]) for p in PROMPTS]
    for ids in prompts:
        with torch.no_grad():
            ref = hf_model.generate(torch.tensor([ids]), max_new_tokens=24, min_new_tokens=24, do_sample=False)
        ours = ours_bundled_fp32.complete(ids, SamplingParams(temperature=0, max_new_tokens=24, ignore_eos=True))
        assert ours.completion_ids == ref[0, len(ids) :].tolist()


def test_batched_generation_equals_one_by_one_on_the_real_model(ours_bundled_fp32: Engine) -> None:
    engine = ours_bundled_fp32
    prompts = [engine.encode_chat([{"role": "user", "content": p}]) for p in PROMPTS]
    params = SamplingParams(temperature=0, max_new_tokens=16, ignore_eos=True)
    batched: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
    for i, token, _ in generate_tokens(engine.model, prompts, params, stop_ids=engine.tokenizer.stop_ids):
        batched[i].append(token)
    for i, ids in enumerate(prompts):
        assert batched[i] == engine.complete(ids, params).completion_ids


@pytest.fixture(scope="module")
def fp32_reference(ours_bundled_fp32: Engine) -> tuple[list[int], list[int], torch.Tensor]:
    """(prompt ids, prompt + fp32's greedy 64 tokens, fp32's logits over that sequence): the same for int8 and
    int4, so computed once (a 64-token fp32 generation and a forward of the whole sequence)."""
    ids = ours_bundled_fp32.encode_chat([{"role": "user", "content": PROMPTS[1]}])
    params = SamplingParams(temperature=0, max_new_tokens=64, ignore_eos=True)
    seq = ids + ours_bundled_fp32.complete(ids, params).completion_ids
    with torch.inference_mode():
        ref = ours_bundled_fp32.model(torch.tensor([seq]))[0].float()
    return ids, seq, ref


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_quantized_model_stays_close_to_fp32(quantize: str, fp32_reference, bundled_gguf) -> None:
    """Teacher-forced: on the same token sequence, the quantized model ranks next tokens like fp32 does.

    int4 runs the file's own Q4_1 values (only the scale/zero rounding to bf16 differs); bf16 activations
    add the rest. The bound follows the reference measurements (bf16 vs fp32 agree on ~99% of top-1).
    """
    engine = Engine.load(bundled_gguf, dtype="bfloat16", quantize=quantize)
    ids, seq, ref = fp32_reference
    x = torch.tensor([seq])
    with torch.inference_mode():
        # one token at a time through the cache: the int4 kernel path (prefill of >8 rows runs dense bf16)
        cache = engine.model.new_cache(1)
        engine.model(x[:, : len(ids)], cache=cache)
        steps = [
            engine.model(x[:, p : p + 1], positions=torch.tensor([[p]]), cache=cache)[0, 0].float()
            for p in range(len(ids), len(seq))
        ]
    got = torch.stack(steps)[:-1]
    want = ref[len(ids) : len(seq) - 1]
    agreement = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
    rel = ((got - want).norm() / want.norm()).item()
    assert agreement >= 0.9, f"top-1 agreement {agreement:.2%}"
    assert rel < 0.1, f"relative logit error {rel:.3f}"
