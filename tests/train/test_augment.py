"""The augmentation stage: the rules by hand, and the guarantee that no copy of a validation example trains."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest

from helpers import tiny_tokenizer
from mini_claude.tokenizer import Tokenizer
from mini_claude.train import augment as A
from mini_claude.train import corpora
from mini_claude.train import data as D
from mini_claude.train.finetune import make_augmenter

pytestmark = pytest.mark.one_thread  # the paraphrase test decodes with the bundled model


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(tiny_tokenizer(), eos_token="<|im_end|>")


def chat(user: str, reply: str, source: str) -> D.Record:
    return D.Record.from_alpaca(user, reply, source=source)


def test_rules_by_hand() -> None:
    rng = random.Random(0)
    assert A.contractions("What is it? I do not know.", rng) == "What's it? I don't know."
    assert A.contractions("I'm sure it's fine, don't worry", rng) == "I am sure it is fine, do not worry"
    assert A.synonym("Hello there", rng) == "Hi there"
    assert A.synonym("nothing to swap here", rng) == "nothing to swap here"
    assert A.casual("What is your name?", rng) == "what is your name"
    assert A.casual("I like it.", rng) == "I like it"  # "I" keeps its capital
    led = A.lead_in("What is AI?", rng)
    assert led.endswith("what is AI?") and led.removesuffix("what is AI?") in A._LEAD_INS
    assert A.normalized_text("Hi,  HOW are you?!") == "hi how are you"


def test_rule_rewriter_is_seeded_and_says_what_it_did() -> None:
    texts = ["Hello, what is your name?", "I do not like rain.", "ok"]
    first, second = A.RuleRewriter(seed=3), A.RuleRewriter(seed=3)
    out = first(texts)
    assert out == second(texts) and first.used == second.used
    assert all(new != old for new, old in zip(out, texts, strict=True))  # every text here has a rule that applies
    assert set(first.used) <= set(A.RULES)
    assert A.RuleRewriter(seed=4)(texts * 5) != A.RuleRewriter(seed=5)(texts * 5)


class FixedRewriter:
    """A rewriter with a script: maps given texts to given rewrites, leaves the rest unchanged."""

    name = "fixed"

    def __init__(self, mapping: dict[str, str]) -> None:
        self.mapping = mapping

    def __call__(self, texts: Sequence[str]) -> list[str]:
        return [self.mapping.get(t, t) for t in texts]


SKY = "Name a colour of the sky at noon on a clear summer day, and say why it looks that way from the ground below"


def test_copies_that_would_leak_validation_are_dropped() -> None:
    train = [
        chat("Hello, how are you?", "Fine, thanks.", "t0"),
        chat(f"{SKY} please", "Blue.", "t1"),
        chat("What is two plus two?", "Four.", "t2"),
        chat("Tell me a joke", "No.", "t3"),
    ]
    val = [
        chat("Hi, how are you?", "Fine, thanks.", "v0"),
        chat(SKY, "Blue.", "v1"),
    ]
    rewriter = FixedRewriter(
        {
            "Hello, how are you?": "hi how are you",  # equals v0 once normalised
            f"{SKY} please": SKY.replace("colour", "color"),  # not equal to v1, but Jaccard > 0.9
            "What is two plus two?": "What's two plus two?",  # a fine copy
        }  # t3 unchanged
    )
    dropped: list[D.Dropped] = []
    copies = A.Augmenter(rewriter)(train, val, dropped)
    assert [c.messages[0]["content"] for c in copies] == ["What's two plus two?"]
    assert copies[0].messages[1] == train[2].messages[1]  # the reply is never rewritten
    assert copies[0].source == "t2 (augmented: fixed)"
    assert [(d.source.split()[0], d.reason) for d in dropped] == [
        ("t0", "augmented: equals a validation example"),
        ("t1", "augmented: near-duplicate of a validation example"),
        ("t3", "augmented: unchanged"),
    ]


def test_prepare_dataset_splits_first_and_never_trains_on_validation(tok: Tokenizer) -> None:
    pytest.importorskip("chatterbot_corpus")
    records = corpora.chatterbot_records()
    args = {"records": records, "safety_check": None, "val_fraction": 0.2, "seed": 1}
    plain = D.prepare_dataset(None, tok, **args)
    augmenter = make_augmenter("rules", 2, seed=1)
    out = D.prepare_dataset(None, tok, **args, augment=augmenter)
    assert out.val == plain.val  # the split does not move
    assert out.train[: len(plain.train)] == plain.train  # originals first, copies after
    report = out.report.augmentation
    assert report is not None and report.n_train == len(plain.train)
    assert report.n_added == len(out.train) - len(plain.train) > len(plain.train)  # most records got 2 copies
    assert set(report.rules) <= set(A.RULES) and sum(report.rules.values()) >= report.n_added
    assert 0 < report.diversity_after < report.diversity_before <= 1  # copies repeat their originals' trigrams
    assert "augmented" in str(out.report) and "diversity" in str(out.report)
    # No copy is a validation example by normalised text. (The originals are kept apart by the earlier
    # near-duplicate stage, at Jaccard 0.9 on the raw text; that is not what this test is about.)
    norm = lambda exs: {A.normalized_text(tok.decode(e["input_ids"], skip_special_tokens=False)) for e in exs}  # noqa: E731
    assert not norm(out.train[len(plain.train) :]) & norm(out.val)
    assert report.dropped.get("augmented: duplicate", 0) + report.n_added <= 2 * len(plain.train)
    assert augmenter.method == "rules x2"


def test_make_augmenter_flags() -> None:
    assert make_augmenter("none", 1, 0) is None
    from mini_claude.train.trainer import TrainingError

    with pytest.raises(TrainingError, match="unknown augment"):
        make_augmenter("magic", 1, 0)
    with pytest.raises(TrainingError, match="copies"):
        make_augmenter("rules", 0, 0)


@pytest.mark.slow
def test_model_paraphrases_with_the_bundled_model(bundled_gguf) -> None:
    import torch

    from mini_claude.checkpoint import load_model

    net, tokenizer, _ = load_model(bundled_gguf, torch.float32)
    questions = ["What is your favorite color?", "How do I boil an egg?", "Do you like music?"]
    out = A.ModelParaphraser(net, tokenizer, batch_size=2, max_new_tokens=24)(questions)
    assert len(out) == 3 and all(isinstance(p, str) and p for p in out)
    # Measured with greedy decoding: "How do you boil an egg?", "What kind of music do you enjoy?"
    assert sum(p != q for p, q in zip(out, questions, strict=True)) >= 1
    assert all(len(p) <= 3 * len(q) + 20 for p, q in zip(out, questions, strict=True))
