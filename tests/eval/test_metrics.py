"""Perplexity against hand computations; BLEU and ROUGE against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from mini_claude.config import PRESETS
from mini_claude.eval import metrics as M
from mini_claude.model import Transformer

# ------------------------------------------------------------------------------------------ perplexity


@pytest.mark.parametrize("vocab", [2, 17, 1000])
def test_uniform_logits_give_perplexity_v(vocab: int) -> None:
    logits = torch.zeros(2, 5, vocab)
    labels = torch.randint(0, vocab, (2, 5))
    labels[0, 3] = -100
    assert M.perplexity_from_logits(logits, labels) == pytest.approx(vocab, rel=1e-5)


def test_perplexity_matches_hand_loop() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 11, generator=g)
    labels = torch.randint(0, 11, (2, 6), generator=g)
    labels[0, :3] = -100  # a masked prompt
    labels[1, 4] = -100
    nll, n = 0.0, 0
    for b in range(2):
        for t in range(1, 6):  # logits at t-1 predict the label at t
            if labels[b, t] == -100:
                continue
            probs = [math.exp(x) for x in logits[b, t - 1].tolist()]
            nll -= math.log(probs[int(labels[b, t])] / sum(probs))
            n += 1
    assert n == 7
    assert M.nll_sum(logits, labels) == (pytest.approx(nll, rel=1e-5), 7)
    assert M.perplexity_from_logits(logits, labels) == pytest.approx(math.exp(nll / n), rel=1e-5)
    # shift=False scores logits[t] against labels[t]
    direct = -torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    mask = labels != -100
    assert M.perplexity_from_logits(logits, labels, shift=False) == pytest.approx(
        math.exp(float(direct[mask].mean())), rel=1e-5
    )


def test_perplexity_needs_targets() -> None:
    with pytest.raises(ValueError, match="no target tokens"):
        M.perplexity_from_logits(torch.zeros(1, 3, 5), torch.full((1, 3), -100))


def test_model_perplexity_is_token_weighted_and_batch_invariant() -> None:
    torch.manual_seed(0)
    model = Transformer(PRESETS["tiny-llama"])
    model.init_weights(std=0.2)
    g = torch.Generator().manual_seed(1)
    examples = []
    for length in (5, 9, 3, 12, 7):
        ids = torch.randint(0, 512, (length,), generator=g).tolist()
        labels = [-100, -100, *ids[2:]]  # the first two tokens are "prompt"
        examples.append({"input_ids": ids, "labels": labels})
    total, count = 0.0, 0
    with torch.no_grad():
        for ex in examples:  # one unpadded example at a time
            logits = model(torch.tensor([ex["input_ids"]]))
            s, n = M.nll_sum(logits, torch.tensor([ex["labels"]]))
            total, count = total + s, count + n
    expected = math.exp(total / count)
    for batch_size in (1, 2, 5):
        assert M.perplexity(model, examples, batch_size=batch_size, progress=False) == pytest.approx(expected, rel=1e-4)
    assert model.training  # restored


# ------------------------------------------------------------------------------------------------ BLEU

REF = "the cat sat on the mat"


def test_sentence_bleu_by_hand() -> None:
    assert M.sentence_bleu(REF, REF) == pytest.approx(100.0)
    # "the cat sat on a mat": 1-grams 5/6, 2-grams 3/5, 3-grams 2/4, 4-grams 1/3; equal lengths so BP = 1.
    expected = 100 * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
    assert M.sentence_bleu("the cat sat on a mat", REF) == pytest.approx(expected, abs=1e-6)
    # "the cat sat on the": every n-gram matches, but 5 words vs 6: BP = exp(1 - 6/5)
    assert M.sentence_bleu("the cat sat on the", REF) == pytest.approx(100 * math.exp(1 - 6 / 5), abs=1e-6)
    # several references: the one it equals decides
    assert M.sentence_bleu("a dog barked", ["the cat sat", "a dog barked"]) == pytest.approx(100.0)


def test_corpus_bleu_pools_counts() -> None:
    hyps = ["the cat sat on a mat", "hello world"]
    refs = [REF, "hello world"]
    # pooled matches/totals: 1-grams (5+2)/(6+2), 2-grams (3+1)/(5+1), 3-grams 2/4, 4-grams 1/3; lengths 8 = 8
    expected = 100 * (7 / 8 * 4 / 6 * 2 / 4 * 1 / 3) ** 0.25
    assert M.corpus_bleu(hyps, refs) == pytest.approx(expected, abs=1e-6)
    assert M.corpus_bleu(hyps, [[REF, "x"], ["hello world"]]) == pytest.approx(expected, abs=1e-6)


# ----------------------------------------------------------------------------------------------- ROUGE


def test_rouge_by_hand() -> None:
    scores = M.rouge("the cat lay on the mat", REF)
    # unigram overlap (clipped): the x2, cat, on, mat = 5 of 6 each way
    assert scores["rouge1"] == pytest.approx(5 / 6)
    # bigrams: "the cat", "on the", "the mat" shared, 3 of 5 each way
    assert scores["rouge2"] == pytest.approx(3 / 5)
    # LCS "the cat on the mat" = 5
    assert scores["rougeL"] == pytest.approx(5 / 6)

    short = M.rouge("the cat sat", REF)
    f = lambda p, r: 2 * p * r / (p + r)  # noqa: E731
    assert short["rouge1"] == pytest.approx(f(1, 3 / 6))
    assert short["rouge2"] == pytest.approx(f(1, 2 / 5))
    assert short["rougeL"] == pytest.approx(f(1, 3 / 6))
    # the stemmer maps "cats" to "cat"
    assert M.rouge("cats", "cat")["rouge1"] == 1.0
    assert M.rouge("cats", "cat", use_stemmer=False)["rouge1"] == 0.0


def test_corpus_rouge_is_the_mean() -> None:
    preds, refs = ["the cat lay on the mat", "the cat sat"], [REF, REF]
    assert M.corpus_rouge(preds, refs)["rouge1"] == pytest.approx((5 / 6 + 2 / 3) / 2)
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        M.corpus_rouge(preds, refs[:1])
