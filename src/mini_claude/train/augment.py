"""Data augmentation for fine-tuning: more ways of asking for the same answer, never a leak into validation.

Where it sits in `prepare_dataset`: cleaning (whitespace, de-duplication, safety) -> formatting (chat
template, length) -> **split** -> augmentation of the *training* side -> validation of every new copy ->
report. Splitting first is the point: an augmented copy of a validation example in training would let the
model see a validation answer under another wording, and the held-out loss would flatter it. Splitting
first also keeps the validation split identical with and without augmentation, so `mini-claude eval
--split val` finds the same examples either way.

Design choices:

- **Only user turns are rewritten.** The assistant replies are the targets the data's author wrote; a
  rule that rewrote them would teach its own mistakes. What changes is how the question is asked, which is
  what a model meets in use: casual typing, a lead-in, contractions, a synonym.
- **Rule-based rewrites** (`RuleRewriter`) are cheap, deterministic for a seed and cannot invent content.
  Each copy applies one rule chosen at random among those that change the text.
- **Paraphrases by the loaded model** (`ModelParaphraser`) are opt-in on top: the model being fine-tuned
  rewrites each question greedily. A small model's paraphrase can drift, so every copy is validated.
- **Validation of the copies.** A copy is dropped, with a reason the quality report counts, if it is
  unchanged, a duplicate of a training record or of another copy, equal to a validation example after
  normalisation (lowercase, words only) or a near-duplicate of one (the pipeline's MinHash + Jaccard
  threshold), unsafe, or outside the token-length bounds.
- **The report shows the cost in variety.** Diversity (unique word trigrams / all word trigrams, Li et
  al., 2016's distinct-n) over the training side is measured before and after: copies repeat most of
  their original's trigrams, so it falls; how far says how much new wording the copies brought.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from mini_claude.train.data import Dropped, Record, normalize_whitespace
from mini_claude.train.minhash import MinHashLSH, jaccard, shingles

Rule = Callable[[str, random.Random], str]


class Rewriter(Protocol):
    """Turns a batch of user messages into rewritten ones (same length; a text may come back unchanged)."""

    name: str

    def __call__(self, texts: Sequence[str]) -> list[str]: ...


def normalized_text(text: str) -> str:
    """Lowercase words only: the form in which two examples count as the same text."""
    return " ".join(re.findall(r"\w+", text.lower()))


# ------------------------------------------------------------------------------------------- rules

_CONTRACTIONS = {
    "do not": "don't", "does not": "doesn't", "did not": "didn't", "is not": "isn't", "are not": "aren't",
    "can not": "can't", "cannot": "can't", "will not": "won't", "would not": "wouldn't", "i am": "i'm",
    "you are": "you're", "we are": "we're", "they are": "they're", "it is": "it's", "that is": "that's",
    "what is": "what's", "who is": "who's", "where is": "where's", "how is": "how's", "there is": "there's",
    "i have": "i've", "you have": "you've", "i would": "i'd", "i will": "i'll", "let us": "let's",
}  # fmt: skip
_EXPAND = {v: k for k, v in _CONTRACTIONS.items() if k != "cannot"}
_SYNONYMS = {
    "hello": "hi", "hi": "hello", "big": "large", "large": "big", "small": "little", "little": "small",
    "quick": "fast", "fast": "quick", "tell me": "explain", "explain": "describe", "help": "assist",
    "like": "enjoy", "favorite": "favourite", "favourite": "favorite", "think": "believe", "know": "understand",
    "good": "nice", "nice": "good", "happy": "glad", "glad": "happy", "maybe": "perhaps", "perhaps": "maybe",
    "buy": "purchase", "begin": "start", "start": "begin", "show": "display", "answer": "reply", "reply": "answer",
    "sure": "certain", "really": "truly", "very": "really", "smart": "clever", "clever": "smart",
}  # fmt: skip
_LEAD_INS = ("Quick question: ", "I was wondering: ", "Please tell me: ", "Hey, ", "Can I ask you something? ")


def _swap_phrases(text: str, table: dict[str, str], rng: random.Random, one: bool) -> str:
    """Replace phrases of `table` (whole words, case-insensitive), all of them or one chosen at random."""
    found = [m for k in table for m in re.finditer(rf"\b{re.escape(k)}\b", text, flags=re.IGNORECASE)]
    if not found:
        return text
    found.sort(key=lambda m: m.start())
    chosen = [rng.choice(found)] if one else found
    out, last = [], 0
    for m in chosen:
        if m.start() < last:
            continue  # overlapping phrases ("tell me" inside a longer match): the first wins
        new = table[m.group(0).lower()]
        if m.group(0)[0].isupper():
            new = new[0].upper() + new[1:]
        out += [text[last : m.start()], new]
        last = m.end()
    return "".join([*out, text[last:]])


def contractions(text: str, rng: random.Random) -> str:
    """Expand contractions if the text has any ("don't" -> "do not"), else contract what can be."""
    expanded = _swap_phrases(text, _EXPAND, rng, one=False)
    if expanded != text:
        return re.sub(r"\bi(?= (?:am|have|would|will)\b)", "I", expanded)
    return re.sub(r"\bi'(m|ve|d|ll)\b", r"I'\1", _swap_phrases(text, _CONTRACTIONS, rng, one=False))


def synonym(text: str, rng: random.Random) -> str:
    """One word or phrase swapped for a synonym from a small hand-checked table."""
    return _swap_phrases(text, _SYNONYMS, rng, one=True)


def _lower_first(text: str) -> str:
    first = text.split(maxsplit=1)[0] if text.split() else ""
    keep = first == "I" or first.startswith("I'") or (len(first) > 1 and first.isupper())
    return text if keep else text[:1].lower() + text[1:]


def lead_in(text: str, rng: random.Random) -> str:
    """A conversational opening before the question ("Quick question: what is ...")."""
    return rng.choice(_LEAD_INS) + _lower_first(text)


def casual(text: str, rng: random.Random) -> str:
    """Typed the way people type into a chat box: no capital at the start, no final punctuation."""
    return _lower_first(text).rstrip(" .!?")


RULES: dict[str, Rule] = {"contractions": contractions, "synonym": synonym, "lead-in": lead_in, "casual": casual}


class RuleRewriter:
    """One rule per text, chosen (seeded) among the rules that change it; unchanged if none does."""

    name = "rules"

    def __init__(self, seed: int = 0, rules: dict[str, Rule] | None = None) -> None:
        self.rng = random.Random(seed)
        self.rules = rules or RULES
        self.used: list[str] = []  # the rule applied to each text of the last call ("" where none applied)

    def __call__(self, texts: Sequence[str]) -> list[str]:
        out, self.used = [], []
        for text in texts:
            names = list(self.rules)
            self.rng.shuffle(names)
            new, used = text, ""
            for name in names:
                candidate = self.rules[name](text, self.rng)
                if candidate != text:
                    new, used = candidate, name
                    break
            out.append(new)
            self.used.append(used)
        return out


# ------------------------------------------------------------------------------------ paraphrases


# Asked cold, a 135M-parameter chat model tends to answer the question instead of rewording it ("My favorite
# color is blue."); two worked examples and a system line make it reword (measured on SmolLM2-135M-Instruct).
PARAPHRASE_SYSTEM = "You rewrite the user's question in different words. You never answer it."
PARAPHRASE_SHOTS = (
    ("How old are you?", "What is your age?"),
    ("Can you recommend a good book?", "Which book would you suggest I read?"),
)


def paraphrase_messages(text: str) -> list[dict[str, str]]:
    """The few-shot conversation that asks the model to reword `text`."""
    messages = [{"role": "system", "content": PARAPHRASE_SYSTEM}]
    for question, reworded in PARAPHRASE_SHOTS:
        messages += [{"role": "user", "content": f"Rewrite: {question}"}, {"role": "assistant", "content": reworded}]
    return [*messages, {"role": "user", "content": f"Rewrite: {text}"}]


class ModelParaphraser:
    """Paraphrases written by a loaded model: greedy decoding of `paraphrase_messages`, in batches."""

    name = "paraphrase"

    def __init__(self, model: Any, tokenizer: Any, batch_size: int = 8, max_new_tokens: int = 64) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens

    def __call__(self, texts: Sequence[str]) -> list[str]:
        import torch

        from mini_claude.generate import SamplingParams, generate_tokens

        params = SamplingParams(max_new_tokens=self.max_new_tokens, temperature=0.0)
        out: list[str] = []
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                for start in range(0, len(texts), self.batch_size):
                    batch = texts[start : start + self.batch_size]
                    prompts = [self.tokenizer.apply_chat_template(paraphrase_messages(t)) for t in batch]
                    ids: list[list[int]] = [[] for _ in batch]
                    stop = self.tokenizer.stop_ids
                    for i, token, _ in generate_tokens(self.model, prompts, params, stop):
                        if token not in stop:
                            ids[i].append(token)
                    out += [self.tokenizer.decode(t).strip().strip('"') for t in ids]
        finally:
            self.model.train(was_training)
        # A reply that is empty, or far longer than the question, is not a paraphrase of it.
        return [p if p and len(p) <= 3 * len(t) + 20 else t for p, t in zip(out, texts, strict=True)]


# ------------------------------------------------------------------------------------ augmenter


class Augmenter:
    """The augmentation stage `prepare_dataset` calls: training records in, validated copies out.

    Args:
        rewriter: `RuleRewriter`, `ModelParaphraser` or any `Rewriter`.
        copies: rewrites per training record (each a fresh draw of the rewriter).
        near_duplicate: a copy whose shingle Jaccard index with a validation example reaches this is dropped.
    """

    def __init__(self, rewriter: Rewriter, copies: int = 1, near_duplicate: float = 0.9, seed: int = 0) -> None:
        if copies < 1:
            raise ValueError(f"copies must be at least 1, got {copies}")
        self.rewriter, self.copies, self.near_duplicate, self.seed = rewriter, copies, near_duplicate, seed
        self.rules: Counter[str] = Counter()  # rule -> user turns it rewrote in the copies returned (RuleRewriter)

    @property
    def method(self) -> str:
        return f"{self.rewriter.name} x{self.copies}"

    def __call__(self, train: Sequence[Record], val: Sequence[Record], dropped: list[Dropped]) -> list[Record]:
        lsh = MinHashLSH(seed=self.seed)
        val_shingles = [shingles(rec.text) for rec in val]
        for j, grams in enumerate(val_shingles):
            lsh.insert(j, lsh.signature(grams))
        val_texts = {normalized_text(rec.text) for rec in val}
        seen = {rec.text for rec in train}
        copies: list[Record] = []
        for _ in range(self.copies):
            # Every user turn of every record, rewritten in one batch (a model paraphraser batches them).
            turns = [(r, i) for r, rec in enumerate(train) for i, m in enumerate(rec.messages) if m["role"] == "user"]
            rewritten = self.rewriter([train[r].messages[i]["content"] for r, i in turns])
            used = list(getattr(self.rewriter, "used", [""] * len(turns)))
            new_messages = [list(rec.messages) for rec in train]
            how: list[list[str]] = [[] for _ in train]
            for (r, i), text, rule in zip(turns, rewritten, used, strict=True):
                text = normalize_whitespace(text)
                if text and text != train[r].messages[i]["content"]:
                    new_messages[r][i] = {"role": "user", "content": text}
                    how[r].append(rule or self.rewriter.name)
            for rec, messages, rules in zip(train, new_messages, how, strict=True):
                copy = Record(tuple(messages), f"{rec.source} (augmented: {', '.join(rules) or 'unchanged'})")
                reason = self._reject(copy, rules, seen, val_texts, val_shingles, lsh)
                if reason:
                    dropped.append(Dropped(copy.source, f"augmented: {reason}"))
                    continue
                seen.add(copy.text)
                copies.append(copy)
                self.rules.update(r for r in rules if r in RULES)
        return copies

    def _reject(
        self,
        copy: Record,
        rules: list[str],
        seen: set[str],
        val_texts: set[str],
        val_shingles: list[set[str]],
        lsh: MinHashLSH,
    ) -> str:
        """Why `copy` may not join the training side ("" if it may)."""
        if not rules:
            return "unchanged"
        if copy.text in seen:
            return "duplicate"
        if normalized_text(copy.text) in val_texts:
            return "equals a validation example"
        grams = shingles(copy.text)
        if any(jaccard(grams, val_shingles[j]) >= self.near_duplicate for j in lsh.candidates(lsh.signature(grams))):
            return "near-duplicate of a validation example"
        return ""
