"""Constrained decoding: a grammar becomes a per-sequence token mask that the decode loop applies.

A `Grammar` says what a reply must be (a JSON schema, a Lark grammar or a regex); `GrammarCompiler` turns it
into a `TokenMask` for one sequence. Before each token is sampled, `TokenMask.apply` sets every logit the
grammar forbids in the current state to -inf; after it is sampled, `accept` advances the state. Every row of
a batch carries its own mask (or none: rows without a grammar are never touched), so a constrained request
and a free one share the same forwards. When the grammar is complete, `done` is true and the sequence ends.

Design choices:
- The grammar engine is llguidance (Microsoft's, the engine behind Guidance and llama.cpp's `%llguidance`), not
  a hand-written parser: it compiles JSON schemas and Lark grammars (with JSON schemas inside them, which
  is what tool calls need) against the tokenizer once, and computes a mask in tens of microseconds for a
  49k vocabulary. `docs/structured_outputs.md` compares it with xgrammar and outlines-core.
- JSON is generated compactly (`", "` and `": "` separators, no free whitespace): a small model given the
  freedom of JSON whitespace may emit newlines forever, and a fixed layout makes streamed tool-call arguments
  easy to cut out of the text.
- Schemas are checked before a request is queued (`check`): an unsupported feature is the caller's error
  (a 400 naming it), never a failed sequence in a shared batch.

References: llguidance's docs/syntax.md (Lark with `%json`) and docs/json_schema.md (what is supported).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    import llguidance

    from mini_claude.tokenizer import Tokenizer

# Compact JSON with one layout: see the module docstring.
JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarError(ValueError):
    """A grammar or schema that cannot be compiled (an unsupported feature, a syntax error)."""


@dataclass(frozen=True)
class Grammar:
    """What a sequence must produce: `kind` is "json_schema" (source: the schema as JSON text), "lark" or
    "regex". Frozen and hashable, so it can sit in `SamplingParams` and in response-cache keys."""

    kind: Literal["json_schema", "lark", "regex"]
    source: str

    @classmethod
    def json_schema(cls, schema: dict[str, Any] | bool) -> Grammar:
        """Any JSON value the schema accepts (`{"type": "object"}`: any JSON object)."""
        return cls("json_schema", json.dumps(schema, sort_keys=False))

    @classmethod
    def lark(cls, text: str) -> Grammar:
        """A Lark grammar in llguidance's dialect (`%json {schema}` embeds a JSON schema as a rule)."""
        return cls("lark", text)

    def compiled(self) -> str:
        """llguidance's grammar description of this grammar."""
        from llguidance import LLMatcher

        if self.kind == "json_schema":
            return LLMatcher.grammar_from_json_schema(self.source, overrides=JSON_OPTIONS)  # type: ignore[arg-type]
        if self.kind == "lark":
            return LLMatcher.grammar_from_lark(self.source)
        return LLMatcher.grammar_from_regex(self.source)


class TokenMask:
    """One sequence's grammar state: which tokens may come next, advanced by each sampled token."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int) -> None:
        self.matcher = matcher
        self.vocab_size = vocab_size

    def allowed(self) -> Tensor:
        """(V,) bool: the tokens the grammar allows next."""
        bias = np.frombuffer(self.matcher.compute_logit_bias(), dtype=np.uint8)  # 200 allowed, 0 forbidden
        allowed = torch.zeros(self.vocab_size, dtype=torch.bool)
        n = min(len(bias), self.vocab_size)  # the model may have more rows than the tokenizer has tokens
        allowed[:n] = torch.from_numpy(bias[:n].copy()) != 0
        return allowed

    def apply(self, logits: Tensor) -> Tensor:
        """Row logits (V,) with every forbidden token at -inf."""
        if self.matcher.is_error():
            raise GrammarError(f"the grammar failed: {self.matcher.get_error()}")
        allowed = self.allowed().to(logits.device)
        if not bool(allowed.any()):
            raise GrammarError("the grammar allows no token here")
        return logits.masked_fill(~allowed, float("-inf"))

    def accept(self, token: int) -> None:
        """Advance past a sampled token (which `apply` allowed, so this fails only on a bug)."""
        if not self.matcher.consume_token(token):
            raise GrammarError(f"token {token} was not allowed by the grammar: {self.matcher.get_error()}")

    @property
    def done(self) -> bool:
        """The grammar is complete and allows nothing more (the sequence can end without an end token)."""
        return self.matcher.is_stopped()

    @property
    def accepting(self) -> bool:
        """What was produced so far is a whole match (more may still be allowed)."""
        return self.matcher.is_accepting()


class GrammarCompiler:
    """Compiles grammars against one tokenizer. Building llguidance's view of a vocabulary takes about a
    second, so it is done once, on first use."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._ll: llguidance.LLTokenizer | None = None

    @property
    def ll_tokenizer(self) -> llguidance.LLTokenizer:
        if self._ll is None:
            import llguidance

            eos = sorted(self.tokenizer.stop_ids) or None
            self._ll = llguidance.LLTokenizer(self.tokenizer.backend.to_str(), n_vocab=self.vocab_size, eos_token=eos)
        return self._ll

    def check(self, grammar: Grammar) -> None:
        """Raise `GrammarError` with llguidance's explanation if the grammar cannot be used."""
        from llguidance import LLMatcher

        try:
            compiled = grammar.compiled()
        except ValueError as exc:  # not JSON at all
            raise GrammarError(str(exc)) from None
        is_error, messages = LLMatcher.validate_grammar_with_warnings(compiled, self.ll_tokenizer)
        if is_error:
            raise GrammarError(messages[0] if messages else "the grammar is invalid")

    def mask(self, grammar: Grammar) -> TokenMask:
        """A fresh per-sequence state for `grammar` (call `check` first to turn errors into messages)."""
        from llguidance import LLMatcher

        matcher = LLMatcher(self.ll_tokenizer, grammar.compiled(), log_level=0)
        if matcher.is_error():
            raise GrammarError(matcher.get_error())
        return TokenMask(matcher, self.vocab_size)
