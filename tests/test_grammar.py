"""Constrained decoding on a tiny random model: no sampled token is ever outside the grammar, rows without a
grammar are untouched by their neighbours', and log-probabilities equal a direct forward's log-softmax.

A random model is the hardest user of a grammar (it prefers nothing the grammar wants), so every schema here
bounds its strings and numbers: the point is that whatever it samples, the mask keeps it inside the schema.
"""

from __future__ import annotations

import json

import jsonschema
import llguidance
import pytest
import torch

from mini_claude.engine import Engine
from mini_claude.generate import BatchGenerator, SamplingParams
from mini_claude.grammar import Grammar, GrammarError
from server.conftest import tiny_engine

SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 4}}, "required": ["name"],
     "additionalProperties": False},
    {"type": "object", "additionalProperties": False, "required": ["a", "tags"],
     "properties": {"a": {"type": "integer", "minimum": -5, "maximum": 250},
                    "tags": {"type": "array", "items": {"enum": ["x", "yz", "w"]}, "minItems": 1, "maxItems": 3}}},
    {"type": "object", "additionalProperties": False, "required": ["inner"],
     "properties": {"inner": {"type": "object", "additionalProperties": False, "required": ["ok"],
                              "properties": {"ok": {"type": "boolean"}, "note": {"type": "string", "maxLength": 3}}},
                    "kind": {"enum": ["cat", "dog"]}}},
    {"type": "object", "additionalProperties": False, "required": ["x"],
     "properties": {"x": {"type": "number", "minimum": 0, "maximum": 1}, "n": {"type": "null"}}},
]  # fmt: skip


@pytest.fixture(scope="module")
def engine() -> Engine:
    return tiny_engine(eos=True)


def replay(engine: Engine, grammar: Grammar, tokens: list[int]) -> llguidance.LLMatcher:
    """An independent matcher fed the sampled tokens: each must be accepted in turn."""
    matcher = llguidance.LLMatcher(engine.grammars.ll_tokenizer, grammar.compiled(), log_level=0)
    for t in tokens:
        assert matcher.consume_token(t), f"token {t} was outside the grammar: {matcher.get_error()}"
    return matcher


@pytest.mark.parametrize("schema", SCHEMAS, ids=["string", "array-enum", "nested-optional", "number-bounds"])
def test_masked_sampling_stays_inside_the_schema(engine: Engine, schema: dict) -> None:
    grammar = Grammar.json_schema(schema)
    engine.grammars.check(grammar)
    prompt = engine.encode_chat([{"role": "user", "content": "json please"}])
    finished = 0
    for seed in range(4):
        params = SamplingParams(max_new_tokens=96, temperature=1.5, seed=seed, grammar=grammar)
        c = engine.complete(prompt, params)
        replay(engine, grammar, c.completion_ids)
        if c.finish_reason == "stop":
            jsonschema.validate(json.loads(c.text), schema)
            finished += 1
    assert finished >= 2  # the bounds make most samples finish inside the budget


def test_rows_without_a_grammar_are_untouched(engine: Engine) -> None:
    """A free row decoded beside a constrained one gives exactly what it gives alone."""
    prompt = engine.encode_chat([{"role": "user", "content": "hello"}])
    free = SamplingParams(max_new_tokens=24, temperature=1.0, seed=7)
    alone = engine.complete(prompt, free).completion_ids
    grammar = Grammar.json_schema(SCHEMAS[0])
    gen = BatchGenerator(engine.model, 2, engine.tokenizer.stop_ids, masks=engine.grammars.mask)
    seqs = [gen.new_sequence(prompt, free), gen.new_sequence(prompt, SamplingParams(max_new_tokens=24, seed=1,
                                                                                    grammar=grammar))]  # fmt: skip
    gen.admit(seqs)
    while gen.running:
        gen.step()
    assert [t for t in seqs[0].output_ids if t not in engine.tokenizer.stop_ids] == alone
    replay(engine, grammar, seqs[1].output_ids)


def test_a_grammar_ends_the_sequence_when_complete(engine: Engine) -> None:
    grammar = Grammar.json_schema({"enum": ["yes", "no"]})
    c = engine.complete([1, 2, 3], SamplingParams(max_new_tokens=20, temperature=1.0, seed=0, grammar=grammar))
    assert c.finish_reason == "stop" and c.text in ('"yes"', '"no"')


def test_unsupported_schema_features_are_named(engine: Engine) -> None:
    with pytest.raises(GrammarError, match=r"http://example\.com/x"):
        engine.grammars.check(Grammar.json_schema({"$ref": "http://example.com/x"}))


def test_logprobs_equal_a_direct_forward(engine: Engine) -> None:
    """Sampled tokens' log-probabilities (cached decode) equal the log-softmax of one uncached forward over
    prompt + reply, and `Engine.score` is exactly that forward's."""
    prompt = engine.encode_chat([{"role": "user", "content": "hi"}])
    c = engine.complete(prompt, SamplingParams(max_new_tokens=12, temperature=1.0, seed=3, logprobs=True,
                                               top_logprobs=3, ignore_eos=True))  # fmt: skip
    ids = prompt + c.completion_ids
    with torch.inference_mode():
        logp = torch.log_softmax(engine.model(torch.tensor([ids]))[0].float(), -1)  # (T, V)
    n = len(prompt)
    expected = [logp[n - 1 + i, t].item() for i, t in enumerate(c.completion_ids)]
    torch.testing.assert_close(torch.tensor([e.logprob for e in c.logprobs]), torch.tensor(expected),
                               atol=1e-4, rtol=0)  # fmt: skip
    best = torch.topk(logp[n - 1], 3)
    assert [i for i, _ in c.logprobs[0].top] == best.indices.tolist()

    scores = engine.score(ids, top=2)
    assert scores[0] is None
    got = torch.tensor([s.logprob for s in scores[1:]])
    assert torch.equal(got, logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])])
    assert [i for i, _ in scores[5].top] == torch.topk(logp[4], 2).indices.tolist()
