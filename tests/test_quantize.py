"""Quantized model dirs: `mini-claude quantize` writes the low-bit values, and loading them builds exactly the layers
(and so exactly the logits) that quantizing the source at load time builds, without quantizing anything again."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from gguf import GGMLQuantizationType as QT
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from helpers import TINY_VOCAB, make_hf_model
from mini_claude import quantize as Q
from mini_claude.__main__ import main as cli_main
from mini_claude.checkpoint import CheckpointError, load_checkpoint, load_model, quantize_checkpoint
from test_checkpoint import write_llama_gguf

pytestmark = pytest.mark.one_thread


def module_tensors(module: nn.Module) -> dict[str, Tensor]:
    """Every tensor a module computes with: parameters, buffers and plain tensor attributes (an int4 layer's dense
    copy is one)."""
    out = {f"p.{k}": v for k, v in module._parameters.items() if v is not None}
    out |= {f"b.{k}": v for k, v in module._buffers.items() if v is not None}
    out |= {f"a.{k}": v for k, v in vars(module).items() if isinstance(v, Tensor)}
    return out


def assert_same_model(got: nn.Module, want: nn.Module) -> None:
    """The same modules of the same classes holding bitwise-equal tensors of the same dtypes."""
    got_modules, want_modules = dict(got.named_modules()), dict(want.named_modules())
    assert got_modules.keys() == want_modules.keys()
    for name, w in want_modules.items():
        g = got_modules[name]
        assert type(g) is type(w), name
        gt, wt = module_tensors(g), module_tensors(w)
        assert gt.keys() == wt.keys(), name
        for key in wt:
            assert gt[key].dtype == wt[key].dtype and torch.equal(gt[key], wt[key]), f"{name} {key}"


def logits_both_paths(model: nn.Module) -> tuple[Tensor, Tensor]:
    """Prefill logits of 20 tokens (more rows than `DENSE_ROWS`: an int4 layer's dense path) and of one decode step
    through the cache (the low-bit kernels)."""
    idx = torch.randint(0, TINY_VOCAB, (1, 21), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        cache = model.new_cache(1)
        prefill = model(idx[:, :20], cache=cache)
        step = model(idx[:, 20:], positions=torch.tensor([[20]]), cache=cache)
    return prefill, step


@pytest.fixture
def no_quantizing(monkeypatch: pytest.MonkeyPatch):
    """Within the test, computing any low-bit value fails: loading must only use stored ones."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a weight was quantized again")

    def install() -> None:
        monkeypatch.setattr(Q, "quantize_int4", refuse)
        monkeypatch.setattr(Q, "quantize_int8", refuse)

    return install


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["int4", "int8"])
def test_quantized_dir_loads_exactly_the_load_time_quantized_model(
    hf_tiny: tuple[nn.Module, Path], tmp_path: Path, mode: str, dtype: torch.dtype, no_quantizing
) -> None:
    _, source = hf_tiny
    want, _, _ = load_model(source, dtype, quantize=mode)
    out = quantize_checkpoint(source, tmp_path / "q", mode, dtype)
    meta = json.loads((out / "config.json").read_text())
    assert meta["model"]["quantization"] == {"mode": mode, "group_size": Q.GROUP_SIZE, "dtype": str(dtype)[6:]}
    no_quantizing()
    got, _, _ = load_model(out, dtype, quantize="auto" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else mode)
    assert got.config == want.config
    assert_same_model(got, want)
    for g, w in zip(logits_both_paths(got), logits_both_paths(want), strict=True):
        assert torch.equal(g, w)


def test_int4_dir_from_gguf_keeps_the_files_own_values(tmp_path: Path) -> None:
    stored = write_llama_gguf(make_hf_model("llama"), tmp_path / "tiny.gguf", QT.Q4_1)
    file_blocks = load_checkpoint(tmp_path / "tiny.gguf", keep_int4=True).int4_blocks
    out = quantize_checkpoint(tmp_path / "tiny.gguf", tmp_path / "q", "int4")
    ckpt = load_checkpoint(out)
    # Every Q4_1 matrix of the file but the embedding (a lookup, kept dense) and the output head (int8 in int4 mode).
    assert ckpt.int4_blocks.keys() == file_blocks.keys() - {"embed_tokens", "lm_head"}
    for name, b in ckpt.int4_blocks.items():
        f = file_blocks[name]
        assert torch.equal(b.q, f.q) and torch.equal(b.scales, f.scales) and torch.equal(b.zeros, f.zeros), name
    assert set(ckpt.int8_blocks) == {"lm_head"}
    # Loaded dense, the dir is the values it stores: the file's own weights.
    dense, _, _ = load_model(out, torch.float32, quantize="none")
    q_proj = dense.layers[0].self_attn.q_proj
    assert isinstance(q_proj, nn.Linear)
    torch.testing.assert_close(q_proj.weight, stored["model.layers.0.self_attn.q_proj.weight"], rtol=1e-5, atol=1e-6)


def test_int4_layer_is_one_model_on_its_dense_and_kernel_paths() -> None:
    """The dense copy a many-row input takes is made of the int4 values, not of the original weights."""
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    layer = Q.Int4Linear.from_linear(linear, keep_dense=True)  # the default on a CPU with native bf16
    blocks = Q.Int4Blocks(*Q.quantize_int4(linear.weight.detach()))
    assert torch.equal(layer.dense, Q.dequantize_int4(blocks.q, blocks.scales, blocks.zeros).to(Q.dense_dtype()))
    x = torch.randn(Q.DENSE_ROWS + 1, 64)
    dense = layer(x)
    kernel = torch.cat([layer(x[: Q.DENSE_ROWS]), layer(x[Q.DENSE_ROWS :])])
    torch.testing.assert_close(dense, kernel, rtol=2e-2, atol=2e-2)  # bf16 activations; bf16 scales in the kernel


def test_quantizing_frees_each_dense_layer_as_it_goes() -> None:
    """A load's peak memory is the model once, not twice: a replaced `nn.Linear` (and its dense weight) is
    gone before the next layer is quantized, so dense and low-bit weights never all coexist."""
    import gc
    import weakref

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(64, 64) for _ in range(6)])
    originals = [weakref.ref(m) for m in model]
    alive_at_each_layer = []
    build = Q.Int4Linear.from_linear

    def counting(linear: nn.Linear, *args: object, **kwargs: object) -> Q.Int4Linear:
        gc.collect()
        alive_at_each_layer.append(sum(ref() is not None for ref in originals))
        return build(linear, *args, **kwargs)

    Q.Int4Linear.from_linear = counting  # type: ignore[method-assign]
    try:
        Q.quantize_model(model, "int4")
    finally:
        Q.Int4Linear.from_linear = build  # type: ignore[method-assign]
    assert all(isinstance(m, Q.Int4Linear) for m in model)
    assert alive_at_each_layer == [6, 5, 4, 3, 2, 1]  # the layer being built and those still to come


def test_quantize_weights_takes_given_values_and_computes_the_rest() -> None:
    model = nn.Sequential()
    model.add_module("a", nn.Linear(64, 32))
    model.add_module("lm_head", nn.Linear(64, 100))
    given = Q.Int4Blocks(*Q.quantize_int4(torch.randn(32, 64)))
    weights = Q.quantize_weights(model, "int4", {"a": given})
    assert weights["a"] is given
    assert isinstance(weights["lm_head"], Q.Int8Blocks)  # the head is int8 in int4 mode, whatever is given
    assert isinstance(model.a, nn.Linear)  # phase 1 changes nothing


def test_wrong_mode_damage_and_requantizing_are_checkpoint_errors(hf_tiny, tmp_path: Path) -> None:
    _, source = hf_tiny
    out = quantize_checkpoint(source, tmp_path / "q", "int4")
    with pytest.raises(CheckpointError, match="stores int4 weights"):
        load_model(out, quantize="int8")
    with pytest.raises(CheckpointError, match="already quantized"):
        quantize_checkpoint(out, tmp_path / "again", "int8")
    tensors = load_file(out / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if k != "layers.1.mlp.up_proj.zeros"}, out / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"low-bit values of layers\.1\.mlp\.up_proj are damaged"):
        load_model(out, quantize="int4")
    save_file(
        {k: v for k, v in tensors.items() if not k.startswith("layers.1.mlp.up_proj.")}, out / "model.safetensors"
    )
    with pytest.raises(CheckpointError):  # the dense weight is missing as well as the values
        load_model(out, quantize="int4")


def test_quantize_command_and_its_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from helpers import save_tiny_model_dir

    source = save_tiny_model_dir(tmp_path / "tiny")
    out = tmp_path / "tiny-int8"
    assert cli_main(["quantize", str(source), str(out), "--mode", "int8", "--dtype", "float32"]) == 0
    assert f"wrote {out}: int8 weights" in capsys.readouterr().out
    model, _, _ = load_model(out, torch.float32, quantize="int8")
    assert isinstance(model.layers[0].mlp.down_proj, Q.Int8Linear)
    cases = {
        "exists": ([str(source), str(out)], "already exists and is not an empty dir"),
        "missing source": ([str(tmp_path / "nope"), str(tmp_path / "x")], "model not found"),
        "already quantized": ([str(out), str(tmp_path / "y")], "already quantized (int8)"),
        "onto its source": ([str(source), str(source)], "already exists"),
    }
    for name, (args, message) in cases.items():
        assert cli_main(["quantize", *args]) == 1, name
        err = capsys.readouterr().err.strip()
        assert err.startswith("mini-claude: error:") and message in err and "\n" not in err, (name, err)
    assert cli_main(["quantize", str(source), str(tmp_path / "z"), "--mode", "int3"]) == 2
    assert "\n" not in capsys.readouterr().err.strip()


def test_int4_layers_keep_a_dense_copy_only_where_bf16_is_native(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without native bf16 the copy would be float32 (twice the bytes) and slower than our kernel for chat-sized
    prompts, so it is dropped there when the kernels exist; the kernel path then serves every input size."""
    linear = nn.Linear(64, 48)
    x = torch.randn(Q.DENSE_ROWS + 5, 64)
    for native, kernels_built in ((True, True), (False, True), (False, False)):
        monkeypatch.setattr(Q, "dense_dtype", lambda native=native: torch.bfloat16 if native else torch.float32)
        monkeypatch.setattr(
            Q.kernels, "load", lambda built=kernels_built, load=Q.kernels.load: load() if built else None
        )
        layer = Q.Int4Linear.from_linear(linear)
        assert (layer.dense is not None) == (native or not kernels_built)
        if layer.dense is None:
            torch.testing.assert_close(layer(x), torch.cat([layer(x[:4]), layer(x[4:])]), rtol=0, atol=0)
