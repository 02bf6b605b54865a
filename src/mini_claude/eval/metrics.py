"""Evaluation metrics: perplexity of a model, BLEU and ROUGE of generated text.

- Perplexity is exp of the mean negative log-likelihood of the target tokens. Labels follow the fine-tuning
  data's convention (Hugging Face's): they are aligned with `input_ids`, position t's logits predict label
  t+1, and -100 marks tokens that are not targets (prompt, padding). Over a dataset the NLL is summed and
  divided by the total number of target tokens — a token-weighted mean, not a mean of per-batch
  perplexities, so batching does not change the answer.
- BLEU is `sacrebleu`'s (Post, 2018), the implementation papers report so numbers are comparable: 13a
  tokenization, corpus BLEU from n-gram counts summed over all sentences; sentence BLEU with sacrebleu's
  default exponential smoothing. Scores are on sacrebleu's 0-100 scale.
- ROUGE-1/2/L F1 is Google's `rouge-score` (a re-implementation of ROUGE-1.5.5; Lin, 2004), with the Porter
  stemmer on; a corpus score is the mean of per-pair F1, as that package's aggregator reports.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IGNORE_INDEX = -100


def nll_sum(logits: Tensor, labels: Tensor, shift: bool = True) -> tuple[float, int]:
    """Summed negative log-likelihood of the target tokens and how many there are.

    Args:
        logits: (B, T, V) scores.
        labels: (B, T) target ids, -100 where there is no target.
        shift: labels are aligned with the inputs (logits at t predict labels at t+1); False if already shifted.
    """
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]  # (B, T-1, V), (B, T-1)
    flat_logits = logits.reshape(-1, logits.size(-1)).float()  # (B*(T-1), V)
    flat_labels = labels.reshape(-1)
    total = F.cross_entropy(flat_logits, flat_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return float(total), int((flat_labels != IGNORE_INDEX).sum())


def perplexity_from_logits(logits: Tensor, labels: Tensor, shift: bool = True) -> float:
    """exp(mean NLL over target tokens). Uniform logits over V classes give exactly V."""
    total, count = nll_sum(logits, labels, shift)
    if count == 0:
        raise ValueError("no target tokens: every label is -100")
    return math.exp(total / count)


@torch.no_grad()
def perplexity(
    model: nn.Module,
    examples: Sequence[dict[str, Sequence[int]]],
    batch_size: int = 8,
    progress: bool = True,
    pad_id: int = 0,
) -> float:
    """Token-weighted perplexity of `model` over examples with `input_ids` and `labels` (-100 = not a target).

    Batches are right-padded (see `train.data.collate`); the model is called as `model(input_ids)` -> logits.
    """
    from tqdm.auto import tqdm

    from mini_claude.train.data import collate

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    batches = range(0, len(examples), batch_size)
    for start in tqdm(batches, desc="perplexity", unit="batch", disable=not progress):
        batch = collate(list(examples[start : start + batch_size]), pad_id)  # type: ignore[arg-type]
        logits = model(batch["input_ids"].to(device))  # (B, T, V)
        s, n = nll_sum(logits, batch["labels"].to(device))
        total, count = total + s, count + n
    model.train(was_training)
    if count == 0:
        raise ValueError("no target tokens in the dataset")
    return math.exp(total / count)


# ---------------------------------------------------------------------------------------------- BLEU


def _reference_streams(references: Sequence[str] | Sequence[Sequence[str]]) -> list[list[str]]:
    """sacrebleu wants one list per reference *stream*; accept one reference per hypothesis or several."""
    if references and isinstance(references[0], str):
        return [list(references)]  # type: ignore[arg-type]
    per_hyp = [list(r) for r in references]  # type: ignore[arg-type]
    width = max(map(len, per_hyp), default=0)
    # Hypotheses with fewer references get None in the missing streams, which sacrebleu skips.
    return [[refs[i] if i < len(refs) else None for refs in per_hyp] for i in range(width)]  # type: ignore[misc]


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str] | Sequence[Sequence[str]]) -> float:
    """Corpus BLEU (0-100): one reference string per hypothesis, or a list of references per hypothesis."""
    import sacrebleu

    return float(sacrebleu.corpus_bleu(list(hypotheses), _reference_streams(references)).score)


def sentence_bleu(hypothesis: str, references: str | Iterable[str]) -> float:
    """Smoothed BLEU (0-100) of one hypothesis against one or more references."""
    import sacrebleu

    refs = [references] if isinstance(references, str) else list(references)
    return float(sacrebleu.sentence_bleu(hypothesis, refs).score)


# --------------------------------------------------------------------------------------------- ROUGE

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def rouge(prediction: str, reference: str, use_stemmer: bool = True) -> dict[str, float]:
    """ROUGE-1, ROUGE-2 and ROUGE-L F1 (0-1) of one prediction against one reference."""
    from rouge_score import rouge_scorer

    scores = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=use_stemmer).score(reference, prediction)
    return {name: scores[name].fmeasure for name in ROUGE_TYPES}


def corpus_rouge(predictions: Sequence[str], references: Sequence[str], use_stemmer: bool = True) -> dict[str, float]:
    """Mean per-pair ROUGE F1 over a corpus."""
    from rouge_score import rouge_scorer

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("no predictions to score")
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=use_stemmer)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for pred, ref in zip(predictions, references, strict=True):
        scores = scorer.score(ref, pred)
        for name in ROUGE_TYPES:
            totals[name] += scores[name].fmeasure
    return {name: total / len(predictions) for name, total in totals.items()}
