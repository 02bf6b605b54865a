"""Our tokenizer and chat template, rebuilt from GGUF metadata, against transformers on the same file."""

from __future__ import annotations

import pytest

from mini_claude.tokenizer import IncrementalDetokenizer

TEXTS = [
    "Hello, world!",
    "What is the capital of France?",
    "  leading spaces and\ttabs\n\nnew lines  ",
    "Numbers: 3.14159, 2024-11-21, 1000000 and x86_64.",
    "def f(x):\n    return x ** 2  # square\n",
    "Ünïcödé: héllo wörld, 世界, Привет, مرحبا, emoji 🎉👍🏽 and ZWJ 👨‍👩‍👧.",
    "<|im_start|>user\nspecial tokens in text<|im_end|>",
    "don't can't won't it's I'm we've they'll she'd",
]
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Tell me a joke 🎉"},
    ],
]


@pytest.mark.slow
@pytest.mark.parametrize("text", TEXTS)
def test_token_ids_match_transformers(text: str, ours_bundled_fp32, hf_bundled) -> None:
    _, hf_tok = hf_bundled
    assert ours_bundled_fp32.tokenizer.encode(text) == hf_tok.encode(text, add_special_tokens=True)
    assert ours_bundled_fp32.tokenizer.decode(hf_tok.encode(text), skip_special_tokens=False) == text


@pytest.mark.slow
@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_chat_template_matches_transformers(messages: list[dict[str, str]], ours_bundled_fp32, hf_bundled) -> None:
    _, hf_tok = hf_bundled
    ours = ours_bundled_fp32.tokenizer
    ref_text = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ours.chat_template.render(messages, add_generation_prompt=True) == ref_text
    assert ours.apply_chat_template(messages) == hf_tok.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=True, return_dict=False
    )


@pytest.mark.slow
def test_special_ids_of_the_bundled_model(ours_bundled_fp32) -> None:
    tok = ours_bundled_fp32.tokenizer
    assert tok.eos_token == "<|im_end|>" and tok.eos_id in tok.stop_ids
    assert tok.add_bos is False  # SmolLM2's GGUF says so; its chat template writes <|im_start|> itself
    assert tok.encode("<|im_start|>") == [tok.backend.token_to_id("<|im_start|>")]


@pytest.mark.slow
@pytest.mark.parametrize("text", TEXTS)
def test_incremental_detokenizer_streams_whole_characters(text: str, ours_bundled_fp32) -> None:
    tok = ours_bundled_fp32.tokenizer
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok, skip_special_tokens=False)
    pieces = [detok.push(i) for i in ids] + [detok.flush()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=False)
