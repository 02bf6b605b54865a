"""A small safety classifier: does this text ask for (or contain) something harmful?

A scikit-learn pipeline, stored with skops and shipped in the package (`data/safety_classifier.skops`):

    FeatureUnion(                                      text -> hashed sparse counts, 2 x 2^17 columns
        HashingVectorizer(word 1-2-grams),             "pipe bomb", "how do"
        HashingVectorizer(char_wb 3-5-grams))          "<syn", "ynth", "thesiz": shared by inflections
    -> TfidfTransformer(sublinear_tf, idf)             1 + log(tf), times idf, L2-normalised
    -> LogisticRegression(C=30, class_weight="balanced")

Design choices:

- **Feature hashing** (Weinberger et al., 2009) rather than a vocabulary: no word list to store or to grow,
  a fixed 2^18-column space, and `HashingVectorizer` is stateless, so only the idf vector and the weights
  are learned. Word bigrams catch short phrases; character n-grams inside word boundaries (fastText-style
  subwords) let "synthesize" and "synthesizing" share evidence.
- **Logistic regression, not a linear SVM**: the same linear decision rule, but it is fitted to
  probabilities, and the data pipeline, the evaluation and `/predict` all want P(harmful) with a tunable
  threshold, which `LinearSVC` does not give without a second calibration model. The problem is convex,
  and lbfgs fits ~4,700 texts in about a second.
- **Chosen on the training side only.** C, the class weights, the idf, the character n-gram range and the
  0.55 threshold were chosen by 4 repeated group-wise hold-outs carved out of the training split (seeds 1-4):
  the one with the best mean F1 among those that did no worse than the previous hand-written model on
  precision and recall, both overall and on the real (not templated) data.
- **Held-out quality** (the group-wise test split of `safety_corpus`, seed 0; 156 harmful, 1,332 benign):
  precision 0.914, recall 0.885 overall; 0.974 / 0.911 on the real data alone (benchmark prompts vs
  chatterbot and hard negatives); 0.72 / 0.79 on the templated requests alone, where a bag of n-grams still
  struggles to tell an unseen harmless task from an unseen harmful one in the same sentence frame.
- **One model, one loader.** `SafetyChecker` wraps `predict.SklearnModel`, the loader a server uses; the
  fine-tuning data pipeline (`train.data.default_safety_check`) loads the same file through it without
  importing this module, so `train` and `eval` do not import each other in a circle.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path
from typing import Any

import sklearn
from sklearn.feature_extraction.text import HashingVectorizer, TfidfTransformer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import FeatureUnion, Pipeline

from mini_claude.eval.safety_corpus import LabelledText, safety_corpus, split_corpus
from mini_claude.predict.model import SAFETY_MODEL, SklearnModel
from mini_claude.train.data import ModelSafetyCheck

DEFAULT_MODEL = SAFETY_MODEL
LABELS = ("benign", "harmful")  # the pipeline's classes, in its sorted order: index 1 is the positive class
THRESHOLD = 0.55
WORD = r"[a-z0-9]+(?:'[a-z]+)?"  # words and contractions; punctuation never joins a word feature


@dataclass(frozen=True)
class Metrics:
    precision: float
    recall: float
    f1: float
    n_positive: int
    n_negative: int

    def __str__(self) -> str:
        return (
            f"precision={self.precision:.3f} recall={self.recall:.3f} f1={self.f1:.3f} "
            f"(held-out: {self.n_positive} harmful, {self.n_negative} benign)"
        )


def binary_metrics(predicted: Sequence[bool], labels: Sequence[int]) -> Metrics:
    tp = sum(1 for p, y in zip(predicted, labels, strict=True) if p and y)
    fp = sum(1 for p, y in zip(predicted, labels, strict=True) if p and not y)
    fn = sum(1 for p, y in zip(predicted, labels, strict=True) if not p and y)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    n_pos = sum(1 for y in labels if y)
    return Metrics(precision, recall, f1, n_pos, len(labels) - n_pos)


def build_pipeline(C: float = 30.0, n_features: int = 2**17) -> Pipeline:
    """The unfitted pipeline (see the module docstring for each step)."""
    counts = {"alternate_sign": False, "norm": None, "n_features": n_features}  # raw counts; weighting comes next
    return Pipeline(
        [
            (
                "features",
                FeatureUnion(
                    [
                        ("words", HashingVectorizer(token_pattern=WORD, ngram_range=(1, 2), **counts)),
                        ("chars", HashingVectorizer(analyzer="char_wb", ngram_range=(3, 5), **counts)),
                    ]
                ),
            ),
            ("weighting", TfidfTransformer(sublinear_tf=True)),
            ("classifier", LogisticRegression(C=C, class_weight="balanced", max_iter=2000)),
        ]
    )


class SafetyChecker(ModelSafetyCheck):
    """`score` is P(harmful); `flags` / `is_unsafe` apply the model's threshold; instances are `text -> bool`.

    The data pipeline's check (`train.data.ModelSafetyCheck`) plus what evaluation wants: scores, metrics.
    """

    def __init__(self, model: SklearnModel) -> None:
        if model.classes != list(LABELS):
            raise ValueError(f"a safety model has classes {list(LABELS)}, this one {model.classes}")
        super().__init__(model)
        self.threshold = float(model.metadata.get("threshold", 0.5))
        raw = model.metadata.get("metrics")
        self.metrics = Metrics(**raw) if raw else None  # held-out metrics recorded at training time

    def scores(self, texts: Sequence[str]) -> list[float]:
        return [p[LABELS[1]] for p in self.model.predict(texts).probabilities]

    def score(self, text: str) -> float:
        """Probability that `text` is harmful."""
        return self.scores([text])[0]

    def is_unsafe(self, text: str) -> bool:
        return self(text)

    def evaluate(self, texts: Sequence[str], labels: Sequence[int]) -> Metrics:
        return binary_metrics(self.flags(texts), labels)

    def save(self, path: str | Path) -> None:
        self.model.save(path)

    @classmethod
    def load(cls, path: str | Path) -> SafetyChecker:
        return cls(SklearnModel.load(path))

    @classmethod
    def default(cls) -> SafetyChecker:
        """The classifier shipped with the package (loaded once per process)."""
        return _default_checker()


@cache
def _default_checker() -> SafetyChecker:
    if not DEFAULT_MODEL.exists():
        raise FileNotFoundError(f"{DEFAULT_MODEL} is missing; `python scripts/train_safety.py` writes it")
    return SafetyChecker.load(DEFAULT_MODEL)


def train_checker(
    texts: Sequence[str], labels: Sequence[int], threshold: float = THRESHOLD, **pipeline_args: Any
) -> SafetyChecker:
    """Fit the pipeline on texts labelled 1 (harmful) / 0 (benign)."""
    pipeline = build_pipeline(**pipeline_args).fit(list(texts), [LABELS[y] for y in labels])
    return SafetyChecker(SklearnModel(pipeline, {"name": "safety_classifier", "threshold": threshold}))


def train_default(seed: int = 0, test_fraction: float = 0.2) -> SafetyChecker:
    """Train on the group-wise training split and record the held-out metrics in the model's metadata."""
    train, test = split_corpus(safety_corpus(seed), test_fraction, seed)
    checker = train_checker([t.text for t in train], [t.label for t in train])
    metrics = checker.evaluate([t.text for t in test], [t.label for t in test])
    checker.metrics = metrics
    checker.model.metadata |= {
        "metrics": asdict(metrics),
        "split": {"seed": seed, "test_fraction": test_fraction, "train": len(train), "test": len(test)},
        "labels": list(LABELS),
        "sklearn_version": sklearn.__version__,
    }
    return checker


__all__ = [
    "DEFAULT_MODEL",
    "LABELS",
    "LabelledText",
    "Metrics",
    "SafetyChecker",
    "binary_metrics",
    "build_pipeline",
    "safety_corpus",
    "split_corpus",
    "train_checker",
    "train_default",
]
