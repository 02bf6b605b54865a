"""Fine-tuning data: load, validate, clean, de-duplicate, filter, report, format, split (then augment, opt-in).

Design choices:

- **One record type.** Alpaca rows (`instruction`, optional `input`, `output`, optional `system`) and chat
  rows (`messages: [{role, content}]`) both become a `Record` holding a list of chat messages, because the
  model is fine-tuned through its own chat template either way.
- **Two kinds of bad data.** A row that breaks the schema (not an object, missing "output", unknown role)
  is a `DataError` naming `file:line` (for a JSON array, the line where the record starts, found by
  decoding the array one element at a time) — the file needs fixing. A well-formed row with nothing to
  learn from (empty reply after whitespace clean-up, no assistant turn, a near-duplicate, unsafe, too
  long) is *dropped* with a reason that the `QualityReport` counts.
- **Fuzzy de-duplication** with MinHash + LSH (Broder, 1997; Leskovec et al., "Mining of Massive Datasets",
  ch. 3): each record's normalised text becomes a set of character 5-shingles; similarity is their Jaccard
  index. 128 min-hashes in 16 bands of 8 rows make any pair with Jaccard >= 0.9 a candidate with probability
  1 - (1 - 0.9^8)^16 > 0.9998, while a pair at 0.5 becomes one with probability 0.06; each candidate is
  then checked with the exact Jaccard index, so there are no false positives. Cost is linear in the number
  of records (plus the few candidates), where all-pairs difflib would need n^2/2 comparisons — 5·10^8 for
  30k records. The first occurrence of a group of near-duplicates is kept, so results are deterministic.
- **Loss masking through the real template.** The conversation is rendered once with the model's chat
  template and tokenized once with character offsets. Each assistant turn's character span is found by
  rendering the conversation up to that turn with and without it (templates are prefix-stable), and runs
  from the first character of the reply through the end-of-turn token (`<|im_end|>` for ChatML) that follows
  it — the model must learn to stop. Tokens starting inside a span keep their id as label; all others get
  -100. Labels are aligned with `input_ids` (Hugging Face's convention): the loss shifts them by one.
- **Augmentation after the split.** `prepare_dataset(augment=...)` hands the training records, and only
  them, to `train.augment` and validates the copies it returns; see there for why and how.
"""

from __future__ import annotations

import functools
import itertools
import json
import random
import re
import statistics
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from mini_claude.tokenizer import Tokenizer
from mini_claude.train.minhash import MinHashLSH, jaccard, shingles

ROLES = ("system", "user", "assistant")
IGNORE_INDEX = -100  # the label PyTorch's cross-entropy skips (`ignore_index` default)

SafetyCheck = Callable[[str], bool]  # text -> True if unsafe


class DataError(ValueError):
    """A record that breaks the schema. `where` is `file:line` (plus the record index in a JSON array)."""

    def __init__(self, where: str, message: str) -> None:
        super().__init__(f"{where}: {message}")
        self.where, self.message = where, message


@dataclass(frozen=True)
class Record:
    """One training conversation. `source` says where it came from (`file:line`) for messages and reports."""

    messages: tuple[dict[str, str], ...]
    source: str = ""

    @classmethod
    def from_alpaca(cls, instruction: str, output: str, input: str = "", system: str = "", source: str = "") -> Record:
        prompt = f"{instruction}\n\n{input}" if input.strip() else instruction
        msgs = [{"role": "system", "content": system}] if system.strip() else []
        msgs += [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
        return cls(tuple(msgs), source)

    @property
    def text(self) -> str:
        """All contents, one per line: what de-duplication, safety and diversity look at."""
        return "\n".join(m["content"] for m in self.messages)


# ------------------------------------------------------------------------------------------ loading


def parse_record(obj: Any, where: str) -> Record:
    """Validate one decoded JSON value as an Alpaca or chat record; `where` prefixes every error."""
    if not isinstance(obj, dict):
        raise DataError(where, f"expected a JSON object, got {type(obj).__name__}")

    def string(key: str, required: bool, container: dict[str, Any] = obj, label: str = "") -> str:
        if key not in container:
            if required:
                raise DataError(where, f'{label}missing "{key}"')
            return ""
        value = container[key]
        if not isinstance(value, str):
            raise DataError(where, f'{label}"{key}" must be a string, got {type(value).__name__}')
        return value

    if "messages" in obj:
        messages = obj["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(where, '"messages" must be a non-empty list')
        out = []
        for i, m in enumerate(messages):
            label = f"messages[{i}]: "
            if not isinstance(m, dict):
                raise DataError(where, f"{label}expected an object, got {type(m).__name__}")
            role = string("role", True, m, label)
            if role not in ROLES:
                raise DataError(where, f'{label}unknown role "{role}" (expected system, user or assistant)')
            if role == "system" and i != 0:
                raise DataError(where, f"{label}a system message may only come first")
            out.append({"role": role, "content": string("content", True, m, label)})
        return Record(tuple(out), where)
    if "instruction" in obj or "output" in obj:
        return Record.from_alpaca(
            string("instruction", True), string("output", True), string("input", False), string("system", False), where
        )
    raise DataError(where, 'expected "messages" (chat) or "instruction" and "output" (Alpaca)')


def _json_array_items(text: str, path: str) -> Iterator[tuple[int, int, Any]]:
    """(index, line, value) of each element of a top-level JSON array, decoded one at a time."""
    decoder = json.JSONDecoder()
    ws = re.compile(r"\s*")

    def skip(i: int) -> int:
        return ws.match(text, i).end()  # type: ignore[union-attr]

    i = skip(text.index("[") + 1)
    if text.startswith("]", i):
        return
    line, counted_to = 1, 0
    for index in itertools.count():
        try:
            value, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{exc.lineno}", f"invalid JSON ({exc.msg}, column {exc.colno})") from None
        line += text.count("\n", counted_to, i)
        counted_to = i
        yield index, line, value
        i = skip(end)
        if text.startswith(",", i):
            i = skip(i + 1)
        elif text.startswith("]", i):
            return
        else:
            where = f"{path}:{text.count(chr(10), 0, i) + 1}"
            raise DataError(where, f"invalid JSON (expected ',' or ']' after record {index})")


def load_records(path: str | Path, errors: list[DataError] | None = None) -> list[Record]:
    """Read a JSON array or JSON-lines file of Alpaca or chat records (the two may be mixed).

    The format is told from the content, not the suffix: a file whose first character is `[` is an array,
    anything else is one JSON value per line (blank lines allowed).

    Args:
        errors: if given, invalid records are appended here and skipped; otherwise the first one raises.
    """
    name = str(path)
    text = Path(path).read_text(encoding="utf-8-sig")
    records: list[Record] = []

    def add(value: Any, where: str) -> None:
        try:
            records.append(parse_record(value, where))
        except DataError as exc:
            if errors is None:
                raise
            errors.append(exc)

    if text.lstrip().startswith("["):
        for index, line, value in _json_array_items(text, name):
            add(value, f"{name}:{line}: record {index}")
        return records
    for lineno, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            value = json.loads(raw)
        except json.JSONDecodeError as exc:
            error = DataError(f"{name}:{lineno}", f"invalid JSON ({exc.msg}, column {exc.colno})")
            if errors is None:
                raise error from None
            errors.append(error)
            continue
        add(value, f"{name}:{lineno}")
    return records


# ----------------------------------------------------------------------------------------- cleaning


_INLINE_SPACE = re.compile(r"(?<=\S)[ \t\u00a0]{2,}")
_INVISIBLE = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff"))


def normalize_whitespace(text: str) -> str:
    """NFC, one newline style, no invisible characters or trailing spaces, at most one blank line in a row.

    Leading indentation is kept (code in replies needs it); runs of spaces inside a line become one.
    """
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n").translate(_INVISIBLE)
    lines = [_INLINE_SPACE.sub(" ", line.rstrip()) for line in text.split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip("\n").strip()


@dataclass(frozen=True)
class Dropped:
    """A record left out: where it came from, why (a short kind the report counts) and the particulars."""

    source: str
    reason: str
    detail: str = ""


def clean_records(records: Sequence[Record], dropped: list[Dropped]) -> list[Record]:
    """Normalise whitespace; drop records with an empty message or no assistant reply (reasons into `dropped`)."""
    kept = []
    for rec in records:
        messages = tuple({"role": m["role"], "content": normalize_whitespace(m["content"])} for m in rec.messages)
        empty = next((m["role"] for m in messages if not m["content"]), None)
        if empty is not None:
            dropped.append(Dropped(rec.source, f"empty {empty} message"))
        elif not any(m["role"] == "assistant" for m in messages):
            dropped.append(Dropped(rec.source, "no assistant reply"))
        elif messages[-1]["role"] != "assistant":
            dropped.append(Dropped(rec.source, "ends without an assistant reply"))
        else:
            kept.append(Record(messages, rec.source))
    return kept


# ---------------------------------------------------------------------------------- de-duplication


def deduplicate(
    records: Sequence[Record], dropped: list[Dropped], threshold: float = 0.9, k: int = 5, seed: int = 0
) -> list[Record]:
    """Keep the first of every group of records whose shingle sets have Jaccard similarity >= `threshold`."""
    lsh = MinHashLSH(seed=seed)
    kept: list[Record] = []
    kept_shingles: list[set[str]] = []
    for rec in records:
        grams = shingles(rec.text, k)
        sig = lsh.signature(grams)
        match = next((j for j in sorted(lsh.candidates(sig)) if jaccard(grams, kept_shingles[j]) >= threshold), None)
        if match is not None:
            dropped.append(Dropped(rec.source, "near-duplicate", f"of {kept[match].source}"))
            continue
        lsh.insert(len(kept), sig)
        kept.append(rec)
        kept_shingles.append(grams)
    return kept


def filter_unsafe(records: Sequence[Record], is_unsafe: SafetyCheck, dropped: list[Dropped]) -> list[Record]:
    """Drop a record if any of its messages is unsafe (each judged alone, as the classifier was trained).

    A check with a `flags(texts) -> list[bool]` method (the shipped classifier has one) judges every
    message in one call; any other `text -> bool` callable is called once per message.
    """
    texts = [[m["content"] for m in rec.messages if m["role"] != "system"] for rec in records]
    flat = [t for ts in texts for t in ts]
    batch = getattr(is_unsafe, "flags", None)
    verdicts = iter(batch(flat) if callable(batch) else [is_unsafe(t) for t in flat])
    kept = []
    for rec, ts in zip(records, texts, strict=True):
        if any([next(verdicts) for _ in ts]):  # a list, not a generator: every verdict must be consumed
            dropped.append(Dropped(rec.source, "unsafe"))
        else:
            kept.append(rec)
    return kept


class ModelSafetyCheck:
    """A `SafetyCheck` backed by a `predict.SklearnModel` whose last class means "harmful"."""

    def __init__(self, model: Any) -> None:
        self.model, self.positive = model, model.classes[-1]

    def flags(self, texts: Sequence[str]) -> list[bool]:
        return [label == self.positive for label in self.model.predict(texts).labels] if texts else []

    def __call__(self, text: str) -> bool:
        return self.flags([text])[0]


@functools.cache
def default_safety_check() -> ModelSafetyCheck:
    """The safety classifier shipped in the package, through the loader the evaluation and server use."""
    from mini_claude.predict.model import SAFETY_MODEL, SklearnModel

    return ModelSafetyCheck(SklearnModel.load(SAFETY_MODEL))


# ------------------------------------------------------------------------------------------- report


@dataclass
class QualityReport:
    """What the pipeline kept, what it dropped and why, and how varied the kept text is."""

    n_input: int
    n_kept: int
    token_lengths: dict[str, float]  # min, median, p90, max tokens of a formatted record
    diversity: float  # unique word trigrams / all word trigrams over the kept records
    duplicates_removed: int
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> count (duplicates included)
    augmentation: AugmentationReport | None = None  # set when the training side was augmented

    def __str__(self) -> str:
        lengths = ", ".join(f"{k} {v:g}" for k, v in self.token_lengths.items())
        rows = [
            f"records      {self.n_kept} kept of {self.n_input}",
            f"tokens       {lengths}",
            f"diversity    {self.diversity:.3f} (unique / total word trigrams)",
            f"duplicates   {self.duplicates_removed} removed",
        ]
        rows += [f"dropped      {n:>5}  {reason}" for reason, n in sorted(self.dropped.items(), key=lambda kv: -kv[1])]
        if self.augmentation is not None:
            rows.append(str(self.augmentation))
        return "\n".join(rows)


@dataclass
class AugmentationReport:
    """What augmentation added to the training side and what it cost in variety."""

    method: str
    n_train: int  # training records before augmentation
    n_added: int = 0
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> copies not added
    rules: dict[str, int] = field(default_factory=dict)  # rule -> user turns it rewrote in the copies returned
    diversity_before: float = 0.0  # unique / total word trigrams of the training records
    diversity_after: float = 0.0  # the same over the training records and the added copies

    def __str__(self) -> str:
        rows = [
            f"augmented    {self.n_added} copies added to {self.n_train} training records ({self.method})",
            f"diversity    {self.diversity_before:.3f} -> {self.diversity_after:.3f} on the training side",
        ]
        if self.rules:
            rows.append("rules        " + ", ".join(f"{k} {v}" for k, v in sorted(self.rules.items())))
        rows += [f"not added    {n:>5}  {r}" for r, n in sorted(self.dropped.items(), key=lambda kv: -kv[1])]
        return "\n".join(rows)


def trigram_diversity(texts: Sequence[str]) -> float:
    """Unique / total lowercase word trigrams, counted within each text (1.0 = nothing repeats)."""
    total: list[tuple[str, ...]] = []
    for text in texts:
        words = text.lower().split()
        total += zip(words, words[1:], words[2:], strict=False)
    return len(set(total)) / len(total) if total else 0.0


def length_stats(lengths: Sequence[int]) -> dict[str, float]:
    """min / median / p90 / max, percentiles by linear interpolation (numpy's default)."""
    if not lengths:
        return {"min": 0, "median": 0, "p90": 0, "max": 0}
    return {
        "min": min(lengths),
        "median": float(statistics.median(lengths)),
        "p90": float(np.percentile(lengths, 90)),
        "max": max(lengths),
    }


def quality_report(
    n_input: int, kept: Sequence[Record], token_lengths: Sequence[int], dropped: Sequence[Dropped]
) -> QualityReport:
    reasons = Counter(d.reason for d in dropped)
    return QualityReport(
        n_input=n_input,
        n_kept=len(kept),
        token_lengths=length_stats(token_lengths),
        diversity=trigram_diversity([r.text for r in kept]),
        duplicates_removed=reasons.get("near-duplicate", 0),
        dropped=dict(reasons),
    )


# --------------------------------------------------------------------------------------- formatting


def _turn_end(reply: str, content: str, end_tokens: Sequence[str]) -> int:
    """Offset in `reply` just past the end-of-turn token after `content` (or past the content if none)."""
    after = reply.find(content) + len(content) if content in reply else 0
    found = [reply.find(t, after) + len(t) for t in end_tokens if t and reply.find(t, after) >= 0]
    return min(found) if found else len(reply.rstrip())


def encode_chat(tokenizer: Tokenizer, messages: Sequence[dict[str, str]]) -> dict[str, list[int]]:
    """`input_ids` of the rendered conversation and `labels` that are -100 outside assistant turns."""
    render = tokenizer.chat_template.render
    messages = list(messages)
    text = render(messages, add_generation_prompt=False)
    end_tokens = [tokenizer.backend.id_to_token(i) for i in sorted(tokenizer.stop_ids)]
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(messages[:i], add_generation_prompt=True)
        through = render(messages[: i + 1], add_generation_prompt=False)
        if not (text.startswith(through) and through.startswith(before)):
            raise ValueError("the chat template is not prefix-stable, so assistant turns cannot be located")
        spans.append((len(before), len(before) + _turn_end(through[len(before) :], m["content"], end_tokens)))
    enc = tokenizer.backend.encode(text, add_special_tokens=False)
    ids = list(enc.ids)
    labels = [
        t if any(s <= start < e for s, e in spans) else IGNORE_INDEX
        for t, (start, _) in zip(ids, enc.offsets, strict=True)
    ]
    if tokenizer.add_bos and tokenizer.bos_id is not None and ids[:1] != [tokenizer.bos_id]:
        ids, labels = [tokenizer.bos_id, *ids], [IGNORE_INDEX, *labels]
    return {"input_ids": ids, "labels": labels}


def train_val_split(items: Sequence[Any], val_fraction: float = 0.1, seed: int = 0) -> tuple[list[Any], list[Any]]:
    """Seeded shuffle, then the first `val_fraction` (at least one item when there are two or more) is validation."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_val = round(len(items) * val_fraction)
    if val_fraction > 0 and len(items) >= 2:
        n_val = max(1, n_val)
    return [items[i] for i in order[n_val:]], [items[i] for i in order[:n_val]]


def collate(batch: Sequence[dict[str, list[int]]], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: ids with `pad_id`, labels with -100, plus an attention mask.

    Right padding needs no mask inside a causal model: padded positions come after every real token, and
    their labels are ignored.
    """
    width = max(len(ex["input_ids"]) for ex in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(batch), width), dtype=torch.bool)  # (B, T)
    for row, ex in enumerate(batch):
        n = len(ex["input_ids"])
        ids[row, :n] = torch.tensor(ex["input_ids"])
        labels[row, :n] = torch.tensor(ex["labels"])
        mask[row, :n] = True
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


# ----------------------------------------------------------------------------------------- pipeline


@dataclass
class PreparedData:
    train: list[dict[str, list[int]]]
    val: list[dict[str, list[int]]]
    report: QualityReport
    dropped: list[Dropped]  # every dropped record with where it came from and why


class Augment(Protocol):
    """The augmentation stage (`train.augment.Augmenter`): copies of training records, none leaking `val`."""

    method: str

    def __call__(self, train: Sequence[Record], val: Sequence[Record], dropped: list[Dropped]) -> list[Record]: ...


def prepare_dataset(
    paths: Sequence[str | Path] | None,
    tokenizer: Tokenizer,
    records: Sequence[Record] = (),
    min_tokens: int = 1,
    max_tokens: int = 2048,
    dedup_threshold: float | None = 0.9,
    safety_check: SafetyCheck | str | None = "default",
    val_fraction: float = 0.1,
    seed: int = 0,
    strict: bool = True,
    augment: Augment | None = None,
) -> PreparedData:
    """The whole pipeline: load -> clean -> de-duplicate -> safety -> format -> length filter -> report -> split,
    then, if `augment` is given, augmentation of the training side and validation of the copies.

    The split comes before augmentation, so the validation examples are the same with or without it and no
    copy of one can reach training (`train.augment` explains the checks).

    Args:
        records: records already in memory (e.g. from `chatterbot_records()`), added after those in `paths`.
        safety_check: "default" for the shipped classifier, any `text -> bool` callable, or None to skip.
        strict: raise on the first schema error; otherwise count invalid rows as dropped.
        augment: the augmentation stage (`train.augment.Augmenter`), or None for none.
    """
    errors: list[DataError] | None = None if strict else []
    loaded = [rec for p in paths or () for rec in load_records(p, errors)] + list(records)
    dropped = [Dropped(e.where, "invalid", e.message) for e in errors or ()]
    n_input = len(loaded) + len(dropped)
    kept = clean_records(loaded, dropped)
    if dedup_threshold is not None:
        kept = deduplicate(kept, dropped, dedup_threshold, seed=seed)
    if safety_check == "default":
        safety_check = default_safety_check()
    if callable(safety_check):
        kept = filter_unsafe(kept, safety_check, dropped)
    examples, final = _format(kept, tokenizer, min_tokens, max_tokens, dropped)
    report = quality_report(n_input, final, [len(ex["input_ids"]) for ex in examples], dropped)
    train_idx, val_idx = train_val_split(range(len(examples)), val_fraction, seed)
    train, val = [examples[i] for i in train_idx], [examples[i] for i in val_idx]
    if augment is not None:
        train_recs = [final[i] for i in train_idx]
        aug_dropped: list[Dropped] = []
        copies = augment(train_recs, [final[i] for i in val_idx], aug_dropped)
        if callable(safety_check):  # a model's paraphrase is new text: judge it like the rest
            copies = filter_unsafe(copies, safety_check, aug_dropped)
        new_examples, added = _format(copies, tokenizer, min_tokens, max_tokens, aug_dropped)
        train += new_examples
        report.augmentation = AugmentationReport(
            method=augment.method,
            n_train=len(train_recs),
            n_added=len(added),
            dropped=dict(Counter(d.reason for d in aug_dropped)),
            rules=dict(getattr(augment, "rules", {})),
            diversity_before=trigram_diversity([r.text for r in train_recs]),
            diversity_after=trigram_diversity([r.text for r in train_recs + added]),
        )
        dropped += aug_dropped
    return PreparedData(train, val, report, dropped)


def _format(
    records: Sequence[Record], tokenizer: Tokenizer, min_tokens: int, max_tokens: int, dropped: list[Dropped]
) -> tuple[list[dict[str, list[int]]], list[Record]]:
    """Chat-template each record; keep those within the token bounds: (examples, their records)."""
    examples, kept = [], []
    for rec in records:
        ex = encode_chat(tokenizer, rec.messages)
        n = len(ex["input_ids"])
        if n < min_tokens or n > max_tokens:
            dropped.append(Dropped(rec.source, "too short" if n < min_tokens else "too long", f"{n} tokens"))
        else:
            examples.append(ex)
            kept.append(rec)
    return examples, kept
