"""Checkpoints through our real converters, compared with transformers on the same weights."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT

from helpers import TINY_VOCAB, make_hf_model, tiny_tokenizer, write_tiny_tokenizer
from mini_claude.checkpoint import CheckpointError, load_checkpoint, load_model, save_model_dir


def test_logits_match_transformers(hf_tiny: tuple[torch.nn.Module, Path]) -> None:
    hf_model, path = hf_tiny
    model, _, _ = load_model(path, torch.float32)
    idx = torch.randint(0, TINY_VOCAB, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf_model(idx).logits
        ours = model(idx)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


def test_own_dir_round_trip(hf_tiny: tuple[torch.nn.Module, Path], tmp_path: Path) -> None:
    _, path = hf_tiny
    model, tokenizer, _ = load_model(path, torch.float32)
    out = save_model_dir(tmp_path / "ours", model, tokenizer, name="tiny")
    meta = json.loads((out / "config.json").read_text())
    assert meta["format"] == "mini-claude" and meta["model"]["n_layer"] == 2
    again, tok2, name = load_model(out, torch.float32)
    assert name == "tiny"
    idx = torch.randint(0, TINY_VOCAB, (1, 11))
    torch.testing.assert_close(again(idx), model(idx), rtol=0, atol=0)
    assert tok2.encode("hello <|im_end|>") == tokenizer.encode("hello <|im_end|>")
    assert tok2.stop_ids == tokenizer.stop_ids


def test_every_loaded_weight_is_contiguous(hf_tiny: tuple[torch.nn.Module, Path], tmp_path: Path) -> None:
    """Whatever the file's layout (GPT-2 stores its projections transposed), the model holds dense tensors, so
    one model runs the same kernels, and gives the same logits, whichever file it was read from."""
    _, path = hf_tiny
    model, tokenizer, _ = load_model(path, torch.float32)
    again, _, _ = load_model(save_model_dir(tmp_path / "ours", model, tokenizer), torch.float32)
    for loaded in (model, again):
        strided = [n for n, t in [*loaded.named_parameters(), *loaded.named_buffers()] if not t.is_contiguous()]
        assert not strided, f"non-contiguous weights: {strided}"


def test_sharded_safetensors_dir_loads(tmp_path: Path) -> None:
    hf_model = make_hf_model("llama")
    hf_model.save_pretrained(tmp_path, max_shard_size="100KB")
    write_tiny_tokenizer(tmp_path)
    assert (tmp_path / "model.safetensors.index.json").exists()
    model, _, _ = load_model(tmp_path, torch.float32)
    idx = torch.randint(0, TINY_VOCAB, (1, 5))
    torch.testing.assert_close(model(idx), hf_model(idx).logits, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------- GGUF


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """The row order llama.cpp's converter gives Llama's q/k weights (pairs interleaved within each head)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def write_llama_gguf(hf_model: torch.nn.Module, path: Path, qtype: QT) -> dict[str, torch.Tensor]:
    """Write `hf_model` as llama.cpp would (names, q/k permutation, metadata, tokenizer), with 2-D weights in
    `qtype`. Returns the dequantized weights by HF name: what the file really holds."""
    cfg = hf_model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    tok = tiny_tokenizer()
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt2")
    writer.add_token_list([t for t, _ in vocab])
    writer.add_token_types([3 if t.startswith("<|") else 1 for t, _ in vocab])
    writer.add_token_merges([])
    writer.add_eos_token_id(tok.token_to_id("<|im_end|>"))
    writer.add_chat_template(
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    )
    stored: dict[str, torch.Tensor] = {}
    for name, t in hf_model.state_dict().items():
        w = t.float().numpy()
        if ".layers." in name:
            layer, rest = name.split(".layers.")[1].split(".", 1)
            stem, kind = rest.rsplit(".", 1)
            gname = f"blk.{layer}.{LAYER_NAMES[stem]}.{kind}"
        else:
            gname = GGUF_NAMES[name]
        if gname.endswith(("attn_q.weight", "attn_k.weight")):
            heads = cfg.num_attention_heads if "attn_q" in gname else cfg.num_key_value_heads
            w = llama_cpp_permute(w, heads)
        if w.ndim == 2 and qtype not in (QT.F32, QT.F16):
            data = gguf.quants.quantize(w, qtype)
            writer.add_tensor(gname, data, raw_dtype=qtype)
            back = gguf.quants.dequantize(data, qtype)
        elif w.ndim == 2 and qtype == QT.F16:
            writer.add_tensor(gname, w.astype(np.float16))
            back = w.astype(np.float16).astype(np.float32)
        else:
            writer.add_tensor(gname, w)
            back = w
        if gname.endswith(("attn_q.weight", "attn_k.weight")):  # undo, to state the weights in HF's order
            heads = cfg.num_attention_heads if "attn_q" in gname else cfg.num_key_value_heads
            back = back.reshape(heads, -1, 2, back.shape[1]).swapaxes(1, 2).reshape(back.shape)
        stored[name] = torch.from_numpy(np.ascontiguousarray(back))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return stored


@pytest.mark.parametrize("qtype", [QT.F32, QT.F16, QT.Q8_0, QT.Q4_1, QT.Q4_0])
def test_gguf_file_loads_and_matches_its_dequantized_weights(tmp_path: Path, qtype: QT) -> None:
    hf_model = make_hf_model("llama")
    stored = write_llama_gguf(hf_model, tmp_path / "tiny.gguf", qtype)
    hf_model.load_state_dict(stored)  # the reference: transformers running exactly what the file holds
    idx = torch.randint(0, TINY_VOCAB, (2, 13), generator=torch.Generator().manual_seed(1))
    model, tokenizer, _ = load_model(tmp_path / "tiny.gguf", torch.float32)
    assert all(p.is_contiguous() for p in model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(idx), hf_model(idx).logits, rtol=1e-4, atol=1e-5)
    assert tokenizer.decode(tokenizer.encode("héllo wörld")) == "héllo wörld"
    assert tokenizer.stop_ids == {tokenizer.backend.token_to_id("<|im_end|>")}


@pytest.mark.parametrize("qtype", [QT.Q4_1, QT.Q4_0])
def test_int4_blocks_from_gguf_are_exact(tmp_path: Path, qtype: QT) -> None:
    """The int4 values we keep for the fast kernels reproduce gguf's own dequantization."""
    from mini_claude.quantize import dequantize_int4

    hf_model = make_hf_model("llama")
    stored = write_llama_gguf(hf_model, tmp_path / "tiny.gguf", qtype)
    ckpt = load_checkpoint(tmp_path / "tiny.gguf", torch.float32, keep_int4=True)
    assert "layers.0.self_attn.q_proj" in ckpt.int4_blocks
    for name, b in ckpt.int4_blocks.items():
        ref = stored["lm_head.weight" if name == "lm_head" else f"model.{name}.weight"]
        torch.testing.assert_close(dequantize_int4(b.q, b.scales, b.zeros), ref, rtol=1e-5, atol=1e-6)


def test_gguf_of_unsupported_architecture_is_refused(tmp_path: Path) -> None:
    writer = gguf.GGUFWriter(str(tmp_path / "x.gguf"), "mamba")
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match="unsupported GGUF architecture 'mamba'"):
        load_checkpoint(tmp_path / "x.gguf")


def test_damaged_and_missing_checkpoints_raise_checkpoint_error(tmp_path: Path, bundled_gguf: Path) -> None:
    truncated = tmp_path / "half.gguf"
    truncated.write_bytes(bundled_gguf.read_bytes()[: bundled_gguf.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="not a readable GGUF"):
        load_checkpoint(truncated)
    text = tmp_path / "notes.gguf"
    text.write_text("just some text")
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        load_checkpoint(text)
    with pytest.raises(CheckpointError, match="model not found"):
        load_checkpoint(tmp_path / "nope.gguf")
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        load_checkpoint(tmp_path / "emptydir")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(CheckpointError, match="unsupported model_type 'bert'"):
        load_checkpoint(bad)


def test_reading_gguf_metadata_runs_no_full_garbage_collection(bundled_gguf: Path) -> None:
    """The bundled model's metadata is ~100k small objects; reading it must not set off the cyclic collector's
    full passes (they cost half a second of start-up), and the collector is on again afterwards."""
    import gc

    from mini_claude.checkpoint.gguf import read_gguf

    collections: list[int] = []

    def count(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            collections.append(info["generation"])

    gc.callbacks.append(count)
    try:
        meta, _ = read_gguf(bundled_gguf)
    finally:
        gc.callbacks.remove(count)
    assert len(meta["tokenizer.ggml.tokens"]) == 49152
    assert 2 not in collections, collections  # (a young one may follow at once, when it is on again)
    assert gc.isenabled()
