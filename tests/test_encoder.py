"""The BERT sentence encoder against references: transformers' BertModel on random weights (through our real
name converter), sentence-transformers on the bundled all-MiniLM-L6-v2, and its own written-out attention.
The float32 path must equal sentence-transformers; the bf16 path (forced here, so it is checked on any x86-64
CPU, emulated where bf16 is not native) must stay within a cosine bound of it and rank passages the same."""

from __future__ import annotations

import os

import pytest
import torch

from mini_claude import encoder as encoder_module
from mini_claude.encoder import (
    BertEncoder,
    Encoder,
    EncoderConfig,
    convert_hf_state_dict,
    model_dir,
    with_bf16_linears,
)

pytestmark = pytest.mark.one_thread
TEXTS = [
    "Hello world",
    "How do I open a file for reading in Python?",
    "The quick brown fox jumps over the lazy dog. " * 40,  # ~400 word pieces: cut at the 256-piece window
    "a",
    "Résumé: naïve café, façade, coöperate.",
]


@pytest.fixture(scope="module")
def minilm() -> Encoder:
    return Encoder.load(precision="fp32")  # the exact reference path, whatever this CPU would choose


@pytest.fixture(scope="module")
def sentence_transformer():  # type: ignore[no-untyped-def]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sentence_transformers = pytest.importorskip("sentence_transformers")
    return sentence_transformers.SentenceTransformer(str(model_dir()), device="cpu")


def tiny_hf_bert(seed: int = 0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=40, layer_norm_eps=1e-12, attn_implementation="eager",
    )  # fmt: skip
    model = BertModel(config, add_pooling_layer=True).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a mis-mapped tensor shows
        for name, p in model.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model, config


def ours_from(hf_model, config) -> BertEncoder:
    ours = BertEncoder(EncoderConfig(
        vocab_size=config.vocab_size, dim=config.hidden_size, n_layer=config.num_hidden_layers,
        n_head=config.num_attention_heads, intermediate_size=config.intermediate_size,
        max_seq_len=config.max_position_embeddings, norm_eps=config.layer_norm_eps,
    ))  # fmt: skip
    missing, unexpected = ours.load_state_dict(convert_hf_state_dict(hf_model.state_dict()), strict=False)
    assert not missing and not unexpected
    return ours.eval()


def test_hidden_states_equal_transformers_bert_on_random_weights() -> None:
    hf, config = tiny_hf_bert()
    ours = ours_from(hf, config)
    ids = torch.randint(1, 64, (3, 11))
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[1, 7:] = 0  # a padded row
    mask[2, 2:] = 0
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        got = ours(ids, mask)
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=2e-5, rtol=1e-4)


def test_written_out_attention_agrees_with_sdpa() -> None:
    hf, config = tiny_hf_bert(seed=1)
    ours = ours_from(hf, config)
    ids = torch.randint(1, 64, (2, 9))
    mask = torch.tensor([[1] * 9, [1] * 4 + [0] * 5])
    with torch.no_grad():
        fast = ours.sentence_embedding(ids, mask)
        for layer in ours.layers:
            layer.self_attn.record_weights = True
        slow = ours.sentence_embedding(ids, mask)
    torch.testing.assert_close(slow, fast, atol=1e-6, rtol=1e-5)
    weights = ours.layers[0].self_attn.last_weights  # (B, nh, T, T): padding keys get no weight
    assert weights is not None and float(weights[1, :, :, 4:].abs().max()) == 0.0
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 9))


def test_bf16_linears_compute_what_autocast_computes_from_float32() -> None:
    """The bf16 path's copy with bf16 linear weights (cast once) against autocast casting the float32 weights on
    each call: the same rounding of the same weights into the same kernels, so equal, on any x86-64 CPU (bf16
    emulated where it is not native). The float32 model is left as it was: the reference stays one switch away."""
    hf, config = tiny_hf_bert(seed=2)
    ours = ours_from(hf, config)
    fast = with_bf16_linears(ours)
    assert ours.layers[0].mlp.up_proj.weight.dtype == torch.float32
    assert fast.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert fast.embed_tokens.weight.data_ptr() == ours.embed_tokens.weight.data_ptr()  # shared, not copied
    ids = torch.randint(1, 64, (3, 13))
    mask = torch.ones(3, 13, dtype=torch.long)
    mask[1, 6:] = 0
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = ours.sentence_embedding(ids, mask)
        got = fast.sentence_embedding(ids, mask)
    assert torch.equal(got, expected)


def test_embeddings_equal_sentence_transformers(minilm: Encoder, sentence_transformer) -> None:  # type: ignore[no-untyped-def]
    expected = sentence_transformer.encode(TEXTS, convert_to_tensor=True, batch_size=2)
    got = minilm.embed(TEXTS, batch_size=2)
    assert got.shape == (len(TEXTS), 384)
    torch.testing.assert_close(got, expected.float(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(len(TEXTS)))


def test_batching_and_padding_do_not_change_an_embedding(minilm: Encoder) -> None:
    alone = torch.cat([minilm.embed([t]) for t in TEXTS])
    together = minilm.embed(TEXTS, batch_size=len(TEXTS))  # one batch padded to the longest
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-4)
    assert minilm.count_tokens(TEXTS[2]) > minilm.config.max_length == 256
    assert minilm.embed([]).shape == (0, 384)


def test_similar_sentences_are_closer_than_unrelated_ones(minilm: Encoder) -> None:
    a, b, c = minilm.embed(["How do I read a file?", "Opening and reading files", "The weather is sunny today"])
    assert float(a @ b) > float(a @ c) + 0.2


def docs_passages(encoder: Encoder, n: int = 96) -> list[str]:
    """Real chunks of the Python docs (the retrieval corpus), ~200 word pieces each, as ingestion embeds them."""
    from mini_claude.rag.chunking import chunk_document
    from mini_claude.rag.evaluate import PYTHON_DOCS
    from mini_claude.rag.readers import read

    if not (PYTHON_DOCS / "library").is_dir():
        pytest.skip(f"{PYTHON_DOCS} is missing: apt-get install python3.11-doc")
    texts: list[str] = []
    for path in sorted((PYTHON_DOCS / "library").glob("*.rst.txt"))[:12]:
        texts += [c.embed_text for c in chunk_document(read(path), encoder.tokenizer)]
    return texts[:n]


QUERIES = [
    "How do I parse command line options?", "compress data with a gzip file", "run code when the interpreter exits",
    "abstract base classes for containers", "read a CSV file into rows", "measure elapsed time of a snippet",
    "register a function to be called at exit", "asynchronous tasks and event loops", "encode bytes as base64",
    "binary search in a sorted list",
]  # fmt: skip


def test_bf16_embeddings_track_sentence_transformers(minilm: Encoder, sentence_transformer) -> None:  # type: ignore[no-untyped-def]
    """bf16 compute (autocast: bf16 matmuls with float32 accumulation, float32 LayerNorm and pooling) against the
    float32 reference: every embedding within cosine 0.995 (measured: >= 0.9998 on these chunks), and the same
    passages retrieved for natural questions (top-1 identical, top-5 sets overlapping >= 90% on average)."""
    bf16 = Encoder(minilm.model, minilm.tokenizer, minilm.name, precision="bf16")
    # Where bf16 is emulated (AVX2), it is not what runs (`auto` picks float32) and costs ~10x: fewer passages.
    passages = docs_passages(minilm, 96 if encoder_module.native_bf16() else 48) + TEXTS
    expected = sentence_transformer.encode(passages, convert_to_tensor=True, batch_size=16).float()
    got = bf16.embed(passages, batch_size=16)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(len(passages)), atol=1e-5, rtol=0)
    cosine = (got * expected).sum(-1)
    assert float(cosine.min()) >= 0.995, f"worst cosine {float(cosine.min()):.5f}"
    q_ref = sentence_transformer.encode(QUERIES, convert_to_tensor=True).float()
    q_bf16 = bf16.embed(QUERIES)
    top_ref, top_bf16 = ((q @ p.T).topk(5).indices for q, p in ((q_ref, expected), (q_bf16, got)))
    assert top_bf16[:, 0].tolist() == top_ref[:, 0].tolist()
    overlap = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(top_ref, top_bf16, strict=True)) / 50
    assert overlap >= 0.9, overlap


def test_auto_precision_is_bf16_only_where_the_cpu_has_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(encoder_module, "native_bf16", lambda: False)
    assert encoder_module.resolve_precision("auto") == "fp32"  # AVX2 / AVX-512 without BF16: emulation is slower
    monkeypatch.setattr(encoder_module, "native_bf16", lambda: True)
    assert encoder_module.resolve_precision("auto") == "bf16"
    assert encoder_module.resolve_precision("fp32") == "fp32"
    with pytest.raises(ValueError, match="precision"):
        encoder_module.resolve_precision("int8")


def test_a_query_is_embedded_on_one_thread_and_the_count_is_restored(minilm: Encoder) -> None:
    question = "How do I open a file for reading?"
    seen: list[int] = []
    hook = minilm.model.register_forward_pre_hook(lambda *_: seen.append(torch.get_num_threads()))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        query = minilm.embed([question])
        chunks = minilm.embed([TEXTS[2]] * 2)  # ~512 word pieces: the configured threads
        assert seen == [1, 2] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
        hook.remove()
    torch.testing.assert_close(query, minilm._embed(minilm.tokenizer.encode_batch([question])))
    assert chunks.shape == (2, 384)
