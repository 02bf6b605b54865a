"""Perplexity of a plain text as llama.cpp's `llama-perplexity` computes it, and KL divergence between models.

Perplexity numbers are only comparable under identical tokenization, windows and scoring (llama.cpp's own README
warns of this), so this module reproduces `perplexity()` in `tools/perplexity/perplexity.cpp` (llama.cpp 0.25.3,
the default mode without `--ppl-stride`) step by step:

- The file is read as it is, minus one trailing newline (what `-f` does), and tokenized once with the model's
  own BOS rule (`common_tokenize(ctx, text, add_special=true)`): a BOS first if the vocabulary adds one.
- The tokens are cut into consecutive, non-overlapping windows of `ctx` tokens (`n_chunk = n_tokens / ctx`); the
  partial window at the end is not scored. (llama-perplexity refuses a text of fewer than two windows; one is
  enough here.)
- If the vocabulary adds BOS, each window's first token is *replaced* by BOS (the window stays `ctx` long).
- Each window is one pass from an empty cache, and only its second half is scored: the logits at positions
  `first = ctx // 2` ... `ctx - 2` predict tokens `first + 1` ... `ctx - 1`, so every scored token sees at least
  `ctx / 2` tokens of context: `ctx - ctx // 2 - 1` tokens per window (255 of 512).
- PPL = exp(mean NLL) over all scored tokens (token-weighted, never a mean of per-window perplexities); its
  standard error is llama's first-order one, `ppl * sqrt((mean(nll²) - mean(nll)²) / (count - 1))`.

KL divergence follows `--kl-divergence`: per scored token KL(P_ref || P) = Σ_v p_ref (log p_ref - log p), its
mean with standard error, and "same top p", the share of tokens whose most likely next token is the same in both
(top-1 agreement). That is how llama.cpp judges a quantization: perplexity alone can hide errors that cancel.

The model is called as the engine calls it. `rows_per_forward=None` feeds a window in one forward; a number feeds
it that many tokens at a time through the KV cache, as decoding does, so the low-bit kernels of an int4/int8 model
run (a 512-row forward would take an int4 layer's dense bf16 copy, which is a prefill kernel, not the decode one).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class TextTooShortError(ValueError):
    """The text has fewer tokens than one window."""


def read_text(path: str | Path) -> str:
    """A text file as llama-perplexity's `-f` reads it: bytes as they are (no newline translation), minus one
    trailing newline."""
    text = Path(path).read_bytes().decode("utf-8")
    return text[:-1] if text.endswith("\n") else text


def window_starts(n_tokens: int, ctx: int) -> list[int]:
    """Start of every full window of `ctx` tokens, back to back: [0, ctx, 2 ctx, ...]; a partial tail is dropped."""
    check_ctx(ctx)
    if n_tokens < ctx:
        raise TextTooShortError(f"the text has {n_tokens} tokens, fewer than one window of {ctx} (use a smaller ctx)")
    return list(range(0, n_tokens - ctx + 1, ctx))


def check_ctx(ctx: int) -> None:
    if ctx < 3:  # ctx - ctx // 2 - 1 scored tokens per window: at least one
        raise ValueError(f"ctx must be at least 3 (a window scores ctx - ctx // 2 - 1 tokens), got {ctx}")


def scored_range(ctx: int) -> tuple[int, int]:
    """(first, last) positions of a window whose logits are scored; logits at p predict the token at p + 1."""
    return ctx // 2, ctx - 1


def text_windows(tokens: Sequence[int], ctx: int, bos_id: int | None = None) -> list[list[int]]:
    """The windows llama-perplexity evaluates: full `ctx`-token windows, the first token replaced by `bos_id` when
    the model adds a BOS (None: it does not)."""
    windows = [list(tokens[s : s + ctx]) for s in window_starts(len(tokens), ctx)]
    if bos_id is not None:
        for w in windows:
            w[0] = bos_id
    return windows


def window_logits(model: nn.Module, ids: list[int], rows_per_forward: int | None = None) -> Tensor:
    """Logits (T, V) of one window, from an empty cache; `rows_per_forward` tokens per forward through the KV
    cache (the decode path), or the whole window in one forward (None)."""
    device = next(model.parameters()).device
    x = torch.tensor([ids], device=device)  # (1, T)
    T = x.shape[1]
    if rows_per_forward is None or rows_per_forward >= T:
        return model(x)[0]
    cache = model.new_cache(1, capacity=T)
    parts = []
    for s in range(0, T, rows_per_forward):
        positions = torch.arange(s, min(s + rows_per_forward, T), device=device)[None]  # (1, chunk)
        parts.append(model(x[:, s : s + rows_per_forward], positions=positions, cache=cache)[0])
    return torch.cat(parts)  # (T, V)


def scored_logits(logits: Tensor, ids: Sequence[int]) -> tuple[Tensor, Tensor]:
    """(logits (n, V) float32, targets (n,)) of a window's scored positions."""
    first, last = scored_range(len(ids))
    return logits[first:last].float(), torch.tensor(ids[first + 1 : last + 1], device=logits.device)


@dataclass
class NLLStats:
    """Running sums of per-token negative log-likelihoods (float64), as llama-perplexity keeps them."""

    count: int = 0
    total: float = 0.0
    total_sq: float = 0.0

    def add(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Add the tokens `targets` (n,) scored by `logits` (n, V); returns their NLLs (n,) float32."""
        nll = F.cross_entropy(logits.float(), targets, reduction="none")  # (n,)
        nll64 = nll.double()
        self.count += nll.numel()
        self.total += float(nll64.sum())
        self.total_sq += float((nll64 * nll64).sum())
        return nll

    @property
    def mean(self) -> float:
        return self.total / self.count

    @property
    def ppl(self) -> float:
        return math.exp(self.mean)

    @property
    def ppl_se(self) -> float:
        """llama-perplexity's uncertainty: ppl * (standard error of the mean NLL)."""
        if self.count < 2:
            return math.nan
        var = self.total_sq / self.count - self.mean**2
        return self.ppl * math.sqrt(var / (self.count - 1)) if var > 0 else 0.0


@dataclass
class KLStats:
    """KL(P_ref || P) and top-1 agreement over scored tokens (llama-perplexity's --kl-divergence figures)."""

    values: list[Tensor] = field(default_factory=list)  # per-token KL, float64
    same_top: int = 0

    def add(self, ref_logits: Tensor, logits: Tensor, rows: int = 64) -> None:
        """Add tokens scored by reference logits and logits (n, V); float32, `rows` tokens at a time (a 255 x 49,152
        window in float64 would need a few hundred MB of temporaries)."""
        for s in range(0, ref_logits.shape[0], rows):
            ref = F.log_softmax(ref_logits[s : s + rows].float(), dim=-1)  # (rows, V)
            cur = F.log_softmax(logits[s : s + rows].float(), dim=-1)
            self.values.append((ref.exp() * (ref - cur)).sum(-1).double())
        self.same_top += int((ref_logits.argmax(-1) == logits.argmax(-1)).sum())

    @property
    def count(self) -> int:
        return sum(v.numel() for v in self.values)

    def summary(self) -> dict[str, float]:
        kl = torch.cat(self.values)
        n = kl.numel()
        top = self.same_top / n
        return {
            "kld_mean": float(kl.mean()),
            "kld_se": float(kl.std() / math.sqrt(n)) if n > 1 else math.nan,
            "kld_median": float(kl.median()),
            "kld_p99": float(torch.quantile(kl, 0.99)),
            "kld_max": float(kl.max()),
            "same_top": top,
            "same_top_se": math.sqrt(top * (1 - top) / (n - 1)) if n > 1 else math.nan,
            "tokens": n,
        }


@dataclass
class TextPerplexity:
    """The result of `text_perplexity`: what llama-perplexity prints, and how much of the text it covered."""

    ppl: float
    ppl_se: float
    nll: float
    ctx: int
    tokens: int  # the whole text, BOS included
    windows: int
    scored: int
    bos: bool  # each window starts with BOS

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def iter_scored(
    model: nn.Module,
    windows: Sequence[list[int]],
    rows_per_forward: int | None = None,
    context: Callable[[], AbstractContextManager[Any]] = nullcontext,
) -> Iterator[tuple[Tensor, Tensor]]:
    """(scored logits (n, V) float32, targets (n,)) of each window in turn; zip two of these to compare models.

    `context` is entered around each forward (e.g. `lambda: engine.adapters.route([name])`).
    """
    for ids in windows:
        # Inference mode only around the forward, never across a yield: several of these may run interleaved.
        with torch.inference_mode(), context():
            scored = scored_logits(window_logits(model, ids, rows_per_forward), ids)
        yield scored


def text_perplexity(
    model: nn.Module,
    tokens: Sequence[int],
    ctx: int = 512,
    bos_id: int | None = None,
    rows_per_forward: int | None = None,
    progress: bool = False,
    context: Callable[[], AbstractContextManager[Any]] = nullcontext,
) -> TextPerplexity:
    """Perplexity of a token stream (the text's tokens, BOS included if the model adds one) with llama-perplexity's
    windows and scoring; see the module docstring.

    Args:
        bos_id: the BOS id if the model adds one (`tokenizer.bos_id if tokenizer.add_bos`), else None.
        rows_per_forward: tokens per forward through the KV cache (None: a window per forward).
        progress: a progress bar over the windows (stderr).
        context: entered around each forward (see `iter_scored`).
    """
    from tqdm.auto import tqdm

    windows = text_windows(tokens, ctx, bos_id)
    stats = NLLStats()
    scored = iter_scored(model, windows, rows_per_forward, context)
    for logits, targets in tqdm(scored, total=len(windows), desc="perplexity", unit="window", disable=not progress):
        stats.add(logits, targets)
    return TextPerplexity(
        ppl=stats.ppl, ppl_se=stats.ppl_se, nll=stats.mean, ctx=ctx, tokens=len(tokens), windows=len(windows),
        scored=stats.count, bos=bos_id is not None,
    )  # fmt: skip
