"""Builders of tiny test checkpoints in Hugging Face's format (shared by the test modules).

Tiny models are written with `transformers` itself (`save_pretrained`), so tests exercise our real
converters on the exact files a user would have. The bundled model is required: it is installed by
`make setup`, and tests that need it fail loudly rather than skip when it is missing.
"""

from __future__ import annotations

import contextlib
import functools
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tokenizers import Tokenizer as BPETokenizer
from tokenizers import decoders, models, pre_tokenizers

if TYPE_CHECKING:
    from sqlalchemy import Engine

TINY_VOCAB = 272  # 256 byte tokens + specials + room, a multiple of 16
POSTGRES_URL = os.environ.get("MINI_CLAUDE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def tiny_tokenizer() -> BPETokenizer:
    """A byte-level BPE with no merges: every byte is a token, plus ChatML specials."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = BPETokenizer(models.BPE(vocab, [], fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    return tok


def write_tiny_tokenizer(path: Path) -> None:
    import json

    tiny_tokenizer().save(str(path / "tokenizer.json"))
    cfg = {"bos_token": None, "eos_token": "<|im_end|>", "add_bos_token": False}
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))


def save_tiny_model_dir(path: Path) -> Path:
    """A tiny random Llama (the `tiny-llama` preset, 256-token context) with `tiny_tokenizer`, in our own dir
    format: a real model dir that loads in a blink."""
    from mini_claude.checkpoint import save_model_dir
    from mini_claude.config import PRESETS
    from mini_claude.model import Transformer
    from mini_claude.tokenizer import Tokenizer

    model = Transformer(PRESETS["tiny-llama"].replace(vocab_size=TINY_VOCAB))
    model.init_weights(std=1.0, generator=torch.Generator().manual_seed(0))
    return save_model_dir(path, model, Tokenizer(tiny_tokenizer(), eos_token="<|im_end|>"))


def save_hf(model: torch.nn.Module, path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    write_tiny_tokenizer(path)
    return path


def make_hf_model(kind: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random `transformers` model of the family `kind` (llama with GQA, qwen2 with biases, gpt2)."""
    import transformers as tf

    torch.manual_seed(seed)
    if kind == "llama":
        cfg = tf.LlamaConfig(
            vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5,
            tie_word_embeddings=False,
        )  # fmt: skip
        cfg.rope_parameters = {"rope_type": "default", "rope_theta": 10_000.0}
        model = tf.LlamaForCausalLM(cfg)
    elif kind == "qwen2":
        cfg = tf.Qwen2Config(
            vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6,
            tie_word_embeddings=True,
        )  # fmt: skip
        cfg.rope_parameters = {"rope_type": "default", "rope_theta": 1_000_000.0}
        model = tf.Qwen2ForCausalLM(cfg)
    elif kind == "gpt2":
        cfg = tf.GPT2Config(vocab_size=TINY_VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128)
        model = tf.GPT2LMHeadModel(cfg)
    else:
        raise ValueError(kind)
    # Random non-trivial norms and biases, so a mapping mistake in either cannot hide behind ones and zeros.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name or "ln_" in name else 0.0))
    return model.eval()


@functools.cache
def postgres_problem() -> str | None:
    """Why PostgreSQL cannot be used (checked once per run), or None when it answers."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import SQLAlchemyError

    engine = create_engine(POSTGRES_URL, connect_args={"connect_timeout": 3})
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except SQLAlchemyError as error:
        return f"PostgreSQL at {POSTGRES_URL} is unreachable: {str(error).splitlines()[0]}"
    finally:
        engine.dispose()
    return None


def require_postgres() -> None:
    """Skip the calling test when PostgreSQL is down, or fail it when running in CI."""
    import pytest

    problem = postgres_problem()
    if problem is None:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{problem} (CI=true: PostgreSQL tests must run)")
    pytest.skip(f"{problem}; start it or set MINI_CLAUDE_TEST_POSTGRES_URL (with CI=true this fails)")


@contextlib.contextmanager
def migrated_schema(url: str, prefix: str, search_path_after: str = "") -> Iterator[Engine]:
    """An engine on a migrated, empty schema of its own on the PostgreSQL at `url`, dropped afterwards, so tests
    sharing one server never see each other's rows. `search_path_after` follows it on the search path (the
    pgvector tests need `public`, where the extension's types live)."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    from mini_claude.db import init_db, make_engine

    schema = f"{prefix}_{uuid.uuid4().hex[:12]}"
    search_path = f"{schema},{search_path_after}" if search_path_after else schema
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    engine = make_engine(make_url(url).update_query_dict({"options": f"-csearch_path={search_path}"}))
    try:
        init_db(engine)
        yield engine
    finally:
        engine.dispose()
        with admin.connect() as connection:
            connection.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()
