"""The engine's `TokenLogprob`s in OpenAI's two wire shapes: chat's per-token objects and the legacy
completions' parallel lists (`tokens`, `token_logprobs`, `top_logprobs`, `text_offset`).

A token's text is its bytes decoded as UTF-8, with U+FFFD for a partial character (a byte-level token may
hold part of one); chat's `bytes` field carries the exact bytes, as OpenAI's does. The legacy shape keeps a
final end-of-sequence token, as OpenAI's does (`<|endoftext|>`): lm-evaluation-harness drops the last entry.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from mini_claude.generate import TokenLogprob
from mini_claude.server.protocol import ChoiceLogprobs, LegacyLogprobs, TokenLogprobInfo, TopLogprob

if TYPE_CHECKING:
    from mini_claude.engine import Engine


def _token(engine: Engine, token_id: int) -> tuple[str, list[int]]:
    raw = engine.token_bytes(token_id)
    return raw.decode("utf-8", errors="replace"), list(raw)


def chat_logprobs(engine: Engine, entries: Sequence[TokenLogprob]) -> ChoiceLogprobs:
    """Chat's shape, which leaves out the end-of-turn token (it is not part of the message)."""
    content = []
    for e in entries:
        if e.token_id in engine.tokenizer.stop_ids:
            continue
        text, raw = _token(engine, e.token_id)
        top = [TopLogprob(token=t, logprob=lp, bytes=b) for t, b, lp in ((*_token(engine, i), lp) for i, lp in e.top)]
        content.append(TokenLogprobInfo(token=text, logprob=e.logprob, bytes=raw, top_logprobs=top))
    return ChoiceLogprobs(content=content)


def legacy_logprobs(engine: Engine, ids: Sequence[int], entries: Sequence[TokenLogprob | None]) -> LegacyLogprobs:
    """`ids[i]`'s entry is `entries[i]` (None for a prompt's first token); offsets count characters from 0."""
    tokens, offsets, offset = [], [], 0
    for token_id in ids:
        text = _token(engine, token_id)[0]
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
    return LegacyLogprobs(
        tokens=tokens,
        token_logprobs=[None if e is None else e.logprob for e in entries],
        top_logprobs=[None if e is None else {_token(engine, i)[0]: lp for i, lp in e.top} for e in entries],
        text_offset=offsets,
    )
