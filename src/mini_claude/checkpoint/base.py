"""What every checkpoint format produces (`Checkpoint`), its error, and the readers the formats share."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor

from mini_claude.config import ModelConfig
from mini_claude.quantize import (
    Int4Blocks,
    Int8Blocks,
)
from mini_claude.tokenizer import Tokenizer

FORMAT_NAME = "mini-claude"


FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A model file or dir that is missing, damaged or of a kind we cannot load."""


@dataclass
class Checkpoint:
    config: ModelConfig
    state_dict: dict[str, Tensor]
    tokenizer: Tokenizer
    name: str
    # Exact int4 values of weights the file stores as Q4_0/Q4_1, by module name, for int4 inference.
    int4_blocks: dict[str, Int4Blocks] = field(default_factory=dict)
    # Exact int8 values of weights stored as Q8_0 (a tied embedding's appear as `lm_head`: the head reads them),
    # or of a quantized model dir's int8 layers, by module name.
    int8_blocks: dict[str, Int8Blocks] = field(default_factory=dict)


Progress = Callable[[int, int], None]  # (done, total) callback for long loads


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / s for s in shards]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path} has no *.safetensors weights")
    return files


def _read_safetensors(files: list[Path]) -> Iterator[tuple[str, Tensor]]:
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                for key in st.keys():  # noqa: SIM118 (safe_open is not a dict)
                    yield key, st.get_tensor(key)
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{f} is not a readable safetensors file ({exc})") from None


def _load_tokenizer_dir(path: Path) -> Tokenizer:
    if not (path / "tokenizer.json").exists():
        raise CheckpointError(f"{path} has no tokenizer.json")
    try:
        return Tokenizer.from_dir(path)
    except Exception as exc:  # the tokenizers library raises plain Exceptions on bad JSON
        raise CheckpointError(f"{path}/tokenizer.json cannot be loaded ({exc})") from None


def _split_qkv(w: Tensor, config: ModelConfig) -> tuple[Tensor, Tensor, Tensor]:
    q = config.n_head * config.head_dim  # type: ignore[operator]
    kv = config.n_kv_head * config.head_dim  # type: ignore[operator]
    return w[:q], w[q : q + kv], w[q + kv :]
