"""Serving LoRA adapters (`adapters.py`): per-row adapters in one batch, checked against `peft`.

Adapters are written by `peft` itself onto a tiny `transformers` Llama, so these tests also prove that what a
user trains with PEFT (or with `mini-claude finetune`, whose files `test_lora.py` checks against PEFT) serves
here with the same logits, alone or mixed with other adapters and the base model in one batch.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from helpers import make_hf_model, save_hf
from mini_claude.adapters import AdapterError, AdapterLinear, default_adapter_name
from mini_claude.engine import Engine
from mini_claude.generate import BatchGenerator, SamplingParams
from mini_claude.scheduler import Scheduler

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore:Setting `save_embedding_layers`:UserWarning")

IDS = torch.tensor([[1, 5, 9, 200, 17, 3, 250, 42], [7, 7, 100, 2, 64, 128, 255, 0]])
GREEDY = SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True)
ADAPTERS = {  # name -> PEFT LoraConfig arguments; init_lora_weights=False makes B random, so each one matters
    "alpha": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "lm_head"]},
    "beta": {"r": 2, "lora_alpha": 16, "target_modules": "all-linear", "use_rslora": True},
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The base model dir and one PEFT adapter dir per entry of ADAPTERS."""
    root = tmp_path_factory.mktemp("adapters")
    dirs = {"base": save_hf(make_hf_model("llama"), root / "base")}
    for seed, (name, kwargs) in enumerate(ADAPTERS.items()):
        torch.manual_seed(seed)
        config = peft.LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, **kwargs)
        peft.get_peft_model(hf(dirs["base"]), config).save_pretrained(root / name)
        dirs[name] = root / name
    return dirs


def hf(path: Path) -> nn.Module:
    return transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@torch.no_grad()
def reference_logits(tiny: dict[str, Path], adapter: str | None) -> torch.Tensor:
    model = hf(tiny["base"])
    if adapter is not None:
        model = peft.PeftModel.from_pretrained(model, tiny[adapter]).eval()
    return model(IDS).logits


def engine_with_adapters(tiny: dict[str, Path], quantize: str = "none") -> Engine:
    engine = Engine.load(tiny["base"], dtype="float32", quantize=quantize, name="base")
    for name in ADAPTERS:
        engine.load_adapter(tiny[name])
    return engine


@torch.no_grad()
def routed_logits(engine: Engine, rows: list[str | None]) -> torch.Tensor:
    with engine.adapters.route(rows):
        return engine.model(IDS)


def test_each_adapter_alone_gives_peft_logits(tiny: dict[str, Path]) -> None:
    engine = engine_with_adapters(tiny)
    assert engine.adapters.names == ["alpha", "beta"]
    for name in ADAPTERS:
        torch.testing.assert_close(routed_logits(engine, [name, name]), reference_logits(tiny, name))
    torch.testing.assert_close(routed_logits(engine, [None, None]), reference_logits(tiny, None))
    # The adapters really change the model, so the comparisons above could fail.
    assert (reference_logits(tiny, "alpha") - reference_logits(tiny, None)).abs().max() > 0.1


def test_rows_of_one_batch_use_their_own_adapter(tiny: dict[str, Path]) -> None:
    engine = engine_with_adapters(tiny)
    for rows in (["alpha", None], [None, "beta"], ["beta", "alpha"]):
        got = routed_logits(engine, rows)
        for i, name in enumerate(rows):
            torch.testing.assert_close(got[i], reference_logits(tiny, name)[i])


def test_quantized_base_keeps_the_adapter_effect(tiny: dict[str, Path]) -> None:
    """int8 base weights: the adapter's update is added in float32 on top, not merged into rounded weights."""
    engine = engine_with_adapters(tiny, quantize="int8")
    assert any(isinstance(m, AdapterLinear) and "Int8" in type(m.base_layer).__name__ for m in engine.model.modules())
    for name in ADAPTERS:
        got, want, base = (
            routed_logits(engine, [name, name]),
            reference_logits(tiny, name),
            reference_logits(tiny, None),
        )
        assert (got - want).abs().max() < 0.1 * (want - base).abs().max()
        assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9


def test_mixed_batch_generation_equals_each_sequence_alone(tiny: dict[str, Path]) -> None:
    engine = engine_with_adapters(tiny)
    prompts = [[5, 9, 200, 17], [7, 100, 2, 64, 128, 255], [1, 2], [42] * 5]
    adapters = ["alpha", None, "beta", "alpha"]
    alone = [engine.complete(p, GREEDY, adapter=a).completion_ids for p, a in zip(prompts, adapters, strict=True)]
    assert alone[0] != engine.complete(prompts[0], GREEDY).completion_ids  # the adapter changes the text

    gen = BatchGenerator(engine.model, 4, engine.tokenizer.stop_ids, engine.adapters)
    seqs = [gen.new_sequence(p, GREEDY, a) for p, a in zip(prompts, adapters, strict=True)]
    gen.add(seqs[:2])  # the others join later, as in a server
    gen.step()
    gen.add(seqs[2:])
    while gen.running:
        gen.step()
    assert [s.output_ids for s in seqs] == alone


def test_an_adapter_loaded_while_the_scheduler_runs_takes_effect_between_steps(tiny: dict[str, Path]) -> None:
    engine = Engine.load(tiny["base"], dtype="float32", quantize="none", name="base")
    prompt = [5, 9, 200, 17]
    long = SamplingParams(max_new_tokens=60, temperature=0.0, ignore_eos=True)
    base_alone = engine.complete(prompt, long).completion_ids
    scheduler = Scheduler(engine, max_batch=4)
    try:
        running = scheduler.submit(prompt, long)
        with pytest.raises(AdapterError, match="no adapter named 'alpha'"):
            scheduler.submit(prompt, GREEDY, adapter="alpha")
        engine.load_adapter(tiny["alpha"])
        adapted = scheduler.submit(prompt, GREEDY, adapter="alpha")
        outputs = [[t for chunk in handle for t in chunk.token_ids] for handle in (running, adapted)]
    finally:
        scheduler.close()
    assert outputs[0] == base_alone  # the base sequence never saw the adapter
    assert outputs[1] == engine.complete(prompt, GREEDY, adapter="alpha").completion_ids


def _copy_adapter(src: Path, dst: Path, config: dict | None = None, tensors: dict | None = None) -> Path:
    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True)
    cfg = json.loads((src / "adapter_config.json").read_text()) | (config or {})
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    weights = load_file(str(src / "adapter_model.safetensors"))
    for key, value in (tensors or {}).items():
        if value is None:
            weights.pop(key)
        else:
            weights[key] = value
    save_file(weights, str(dst / "adapter_model.safetensors"))
    return dst


def test_bad_adapters_are_refused_with_reasons_and_change_nothing(tiny: dict[str, Path], tmp_path: Path) -> None:
    engine = Engine.load(tiny["base"], dtype="float32", quantize="none", name="base")
    before = routed_logits(engine, [None, None])
    q_a = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    cases = {
        "not found": tmp_path / "nowhere",
        "lacks adapter_model.safetensors": tmp_path / "empty",
        "trains biases": _copy_adapter(tiny["alpha"], tmp_path / "bias", config={"bias": "all"}),
        "do not fit a 64x64 layer": _copy_adapter(tiny["alpha"], tmp_path / "shape", tensors={q_a: torch.zeros(4, 32)}),
        "not both lora_A and lora_B": _copy_adapter(tiny["alpha"], tmp_path / "half", tensors={q_a: None}),
        "has no layer layers.9": _copy_adapter(
            tiny["alpha"], tmp_path / "layer", tensors={q_a.replace("layers.0", "layers.9"): torch.zeros(4, 64)}
        ),
        "use_dora": _copy_adapter(tiny["alpha"], tmp_path / "dora", config={"use_dora": True}),
    }
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "adapter_config.json").write_text("{}")
    for reason, path in cases.items():
        with pytest.raises(AdapterError, match=reason):
            engine.load_adapter(path)
    with pytest.raises(AdapterError, match="already taken"):
        engine.load_adapter(tiny["alpha"], name="base")
    engine.load_adapter(tiny["alpha"])
    with pytest.raises(AdapterError, match="already taken"):
        engine.load_adapter(tiny["beta"], name="alpha")
    with pytest.raises(AdapterError, match="no spaces"):
        engine.load_adapter(tiny["beta"], name="my adapter")
    with pytest.raises(AdapterError, match="no adapter named 'gamma'"):
        engine.complete([1, 2, 3], GREEDY, adapter="gamma")
    assert engine.adapters.names == ["alpha"]
    torch.testing.assert_close(routed_logits(engine, [None, None]), before)


def test_adapter_info_and_default_names(tiny: dict[str, Path], tmp_path: Path) -> None:
    engine = Engine.load(tiny["base"], dtype="float32", quantize="none", name="base")
    info = engine.load_adapter(tiny["alpha"], name="support-bot")
    assert (info.name, info.rank, info.alpha, info.scaling) == ("support-bot", 4, 8, 2.0)
    assert info.targets == ["lm_head", "q_proj", "v_proj"] and len(info.modules) == 5
    q_proj, v_proj, lm_head = 4 * (64 + 64), 4 * (64 + 32), 4 * (64 + 272)  # r (in + out); GQA: v is 64 -> 32
    assert info.parameters == 2 * q_proj + 2 * v_proj + lm_head
    wrapped = {n for n, m in engine.model.named_modules() if isinstance(m, AdapterLinear)}
    assert wrapped == set(info.modules)  # untouched layers stay as they were
    assert default_adapter_name(tmp_path / "runs" / "my-run" / "adapter") == "my-run"
    assert default_adapter_name(tmp_path / "my-adapter") == "my-adapter"


# ------------------------------------------------------------------------ one failing sequence alone


def nan_adapter(tiny: dict[str, Path], root: Path) -> Path:
    """A copy of the 'alpha' adapter whose lora_B weights are NaN: its rows' logits are NaN, nobody else's."""
    from safetensors.torch import load_file, save_file

    root.mkdir()
    (root / "adapter_config.json").write_text((tiny["alpha"] / "adapter_config.json").read_text())
    tensors = load_file(tiny["alpha"] / "adapter_model.safetensors")
    save_file({k: torch.full_like(v, float("nan")) if "lora_B" in k else v for k, v in tensors.items()},
              root / "adapter_model.safetensors")  # fmt: skip
    return root


def test_nan_logits_and_a_removed_adapter_end_their_sequences_alone(tiny: dict[str, Path], tmp_path: Path) -> None:
    engine = engine_with_adapters(tiny)
    engine.load_adapter(nan_adapter(tiny, tmp_path / "broken"), "broken")
    prompts = [[5, 9, 200, 17], [7, 100, 2, 64, 128, 255], [1, 2], [42] * 5]
    adapters = [None, "broken", "beta", "alpha"]
    alone = [engine.complete(p, GREEDY, adapter=a).completion_ids for p, a in zip(prompts, adapters, strict=True)
             if a != "broken"]  # fmt: skip
    gen = BatchGenerator(engine.model, 4, engine.tokenizer.stop_ids, engine.adapters)
    seqs = [gen.new_sequence(p, GREEDY, a) for p, a in zip(prompts, adapters, strict=True)]
    events = gen.add(seqs)
    broken = [ev for ev in events if ev.seq is seqs[1]]
    assert [(ev.token_id, ev.finish_reason) for ev in broken] == [(None, "error")]
    assert seqs[1].error == "the model produced NaN logits" and seqs[1] not in gen.running
    for _ in range(3):
        gen.step()
    engine.adapters.unload("alpha")  # while a sequence uses it
    events = gen.step()
    assert [(ev.seq, ev.finish_reason) for ev in events if ev.finish_reason == "error"] == [(seqs[3], "error")]
    assert seqs[3].error == "its adapter was removed"
    while gen.running:
        gen.step()
    assert [seqs[0].output_ids, seqs[2].output_ids] == alone[:2]  # the others carried on, unchanged
    assert seqs[3].output_ids == alone[2][: len(seqs[3].output_ids)] and len(seqs[3].output_ids) == 4
    assert gen.cache.used_blocks == 0


def test_a_request_whose_adapter_is_removed_fails_alone_in_the_scheduler(tiny: dict[str, Path]) -> None:
    engine = engine_with_adapters(tiny)
    long = SamplingParams(max_new_tokens=40, temperature=0.0, ignore_eos=True)
    expected = engine.complete([5, 9, 200, 17], long).completion_ids
    scheduler = Scheduler(engine, max_batch=4)
    try:
        base = scheduler.submit([5, 9, 200, 17], long)
        doomed = scheduler.submit([1, 2, 3], long, adapter="beta")
        first = next(iter(doomed))
        assert first.token_ids
        engine.adapters.unload("beta")
        with pytest.raises(RuntimeError, match="its adapter was removed"):
            list(doomed)
        assert [t for chunk in base for t in chunk.token_ids] == expected
    finally:
        scheduler.close()
    assert scheduler.stats.failed == 1


def test_a_failing_sampler_and_nan_logits_end_their_requests_alone_in_the_scheduler(
    tiny: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the scheduler's loop, as the server runs it: each failing request gets its own error; the healthy
    one beside them gets exactly what it gets alone."""
    engine = engine_with_adapters(tiny)
    engine.load_adapter(nan_adapter(tiny, tmp_path / "broken"), "broken")
    long = SamplingParams(max_new_tokens=30, temperature=0.0, ignore_eos=True)
    healthy, flaky = [5, 9, 200, 17], [7, 7, 7]
    expected = engine.complete(healthy, long).completion_ids
    new_sequence = BatchGenerator.new_sequence

    def with_flaky_sampler(self: BatchGenerator, prompt_ids: list[int], *args: object, **kwargs: object) -> object:
        seq = new_sequence(self, prompt_ids, *args, **kwargs)  # type: ignore[arg-type]
        if list(prompt_ids) == flaky:
            calls = iter(range(1000))

            def hook(s: object, logits: torch.Tensor) -> torch.Tensor:
                if next(calls) == 4:
                    raise ValueError("grammar has no allowed token")
                return logits

            seq.logits_hook = hook
        return seq

    monkeypatch.setattr(BatchGenerator, "new_sequence", with_flaky_sampler)
    scheduler = Scheduler(engine, max_batch=4)
    try:
        base = scheduler.submit(healthy, long)
        sampler = scheduler.submit(flaky, long)
        nan = scheduler.submit([1, 2, 3], long, adapter="broken")
        with pytest.raises(RuntimeError, match="sampling failed: ValueError: grammar has no allowed token"):
            list(sampler)
        with pytest.raises(RuntimeError, match="NaN logits"):
            list(nan)
        assert [t for chunk in base for t in chunk.token_ids] == expected
    finally:
        scheduler.close()
    assert scheduler.stats.failed == 2
