"""The service layer (`engine.py`): text streams, stop strings, UTF-8-safe detokenization, prompt fitting.

Two kinds of model drive the engine here:
- a tiny random Llama (vocabulary of SmolLM2's real tokenizer), for properties that must hold whatever the
  model says: streamed text equals the final text, batched equals alone, a stop string cuts where it first
  appears in the unstopped reply;
- a `ScriptedModel` that always predicts the next token of a fixed reply, so the engine can be made to
  "generate" exact text (emoji, CJK, a stop string spread over several tokens) and the expected output is
  known without trusting the engine's own code.
"""

from __future__ import annotations

import copy
import json
import random
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from mini_claude.checkpoint import save_model_dir
from mini_claude.config import PRESETS, ModelConfig
from mini_claude.engine import Completion, Engine, StopStringMatcher, TextChunk, resolve_dtype
from mini_claude.generate import ContextOverflowError, SamplingParams
from mini_claude.model import Transformer
from mini_claude.tokenizer import IncrementalDetokenizer, Tokenizer

pytestmark = pytest.mark.one_thread  # tiny models: a second thread only adds barrier waits

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=30)
EMOJI_TEXT = "héllo 世界 🎉👍🏽"
MIXED_TEXT = "Ünïcödé: naïve café — 日本語のテキスト, 한국어, emoji 👨‍👩‍👧 🇫🇷 and 🧑🏿‍🚀!\nsecond line\ttab ½ ∑ ∞"


@pytest.fixture(scope="module")
def tokenizer(smollm2_tokenizer: Tokenizer) -> Tokenizer:
    """SmolLM2's real byte-level BPE, rebuilt from the bundled GGUF's metadata."""
    return smollm2_tokenizer


@pytest.fixture(scope="module")
def engine(tokenizer: Tokenizer) -> Engine:
    """A tiny random model over SmolLM2's vocabulary; large weights make greedy choices unambiguous."""
    model = Transformer(PRESETS["tiny-llama"].replace(vocab_size=tokenizer.vocab_size))
    model.init_weights(std=1.0, generator=torch.Generator().manual_seed(0))
    return Engine(model.eval(), tokenizer, "tiny")


def chat_prompt(engine: Engine, text: str) -> list[int]:
    return engine.encode_chat([{"role": "user", "content": text}])


def collect(chunks: Iterator[TextChunk], n: int = 1) -> tuple[list[list[TextChunk]], list[Completion]]:
    """Chunks per prompt index, and each prompt's completion (from its final chunk)."""
    per: list[list[TextChunk]] = [[] for _ in range(n)]
    for chunk in chunks:
        assert not per[chunk.index] or per[chunk.index][-1].completion is None, "a chunk after the final one"
        per[chunk.index].append(chunk)
    completions = [c[-1].completion for c in per]
    assert all(c is not None for c in completions)
    return per, completions  # type: ignore[return-value]


class ScriptedModel(nn.Module):
    """A stand-in for `Transformer` that always predicts the next token of `script`.

    The token fed at position p is followed by `script[p + 1 - prompt_len]`, so a prompt of `prompt_len`
    tokens "generates" the script exactly, through the real `BatchGenerator` and `Engine.stream`.
    """

    def __init__(self, vocab_size: int, prompt_len: int, script: Sequence[int], max_seq_len: int = 256) -> None:
        super().__init__()
        self.config = ModelConfig(vocab_size=vocab_size, dim=8, n_layer=1, n_head=1, intermediate_size=8,
                                  max_seq_len=max_seq_len)  # fmt: skip
        self.embed_tokens = nn.Embedding(1, 1)  # only its device is read
        self.prompt_len, self.script = prompt_len, list(script)

    def new_cache(self, n_slots: int = 1, capacity: int = 256) -> None:
        return None

    def forward(
        self, idx: Tensor, positions: Tensor | None = None, cache=None, slots=None, logits_at=None, logits_rows=None
    ) -> Tensor:
        B, T = idx.shape
        if positions is None:
            positions = torch.arange(T).expand(B, T)
        if logits_rows is not None:
            positions, B = positions[logits_rows], len(logits_rows)
        at = logits_at if logits_at is not None else torch.full((B,), T - 1)
        fed = positions[torch.arange(B), at]  # (B,) position of the token whose successor is wanted
        logits = torch.full((B, 1, self.config.vocab_size), float("-inf"))  # any sampling picks the script
        for row, p in enumerate(fed.tolist()):
            k = min(p + 1 - self.prompt_len, len(self.script) - 1)
            logits[row, 0, self.script[k]] = 0.0
        return logits


def scripted_engine(tokenizer: Tokenizer, script: Sequence[int], prompt_len: int = 3) -> Engine:
    return Engine(ScriptedModel(tokenizer.vocab_size, prompt_len, script), tokenizer, "scripted")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ streaming = complete


def test_streamed_chunks_join_to_the_completion(engine: Engine) -> None:
    prompt = chat_prompt(engine, "Tell me something.")
    per, (completion,) = collect(engine.stream([prompt], GREEDY))
    chunks = per[0]
    assert "".join(c.text for c in chunks) == completion.text
    assert [t for c in chunks for t in c.token_ids] == completion.completion_ids
    assert completion.text == engine.tokenizer.decode(completion.completion_ids)
    again = engine.complete(prompt, GREEDY)
    assert (again.text, again.completion_ids) == (completion.text, completion.completion_ids)
    assert chunks[-1].finish_reason == completion.finish_reason == "length"
    assert completion.prompt_ids == prompt
    assert all(c.finish_reason is None and c.completion is None for c in chunks[:-1])


def test_batched_stream_equals_each_prompt_alone(engine: Engine) -> None:
    prompts = [chat_prompt(engine, t) for t in ("Hi", "What is the capital of France, please?", "2+2?")]
    budgets = [SamplingParams(temperature=0.0, max_new_tokens=n) for n in (20, 7, 13)]
    _, completions = collect(engine.stream(prompts, budgets), n=3)
    for p, params, completion in zip(prompts, budgets, completions, strict=True):
        alone = engine.complete(p, params)
        assert completion.text == alone.text
        assert completion.completion_ids == alone.completion_ids
        assert completion.completion_tokens == params.max_new_tokens


def test_chat_renders_the_models_template(engine: Engine) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    _, (completion,) = collect(engine.chat(messages, SamplingParams(temperature=0.0, max_new_tokens=5)))
    assert completion.prompt_ids == engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert engine.tokenizer.decode(completion.prompt_ids, skip_special_tokens=False).endswith("assistant\n")


# ---------------------------------------------------------------------------------------- stop strings


def char_spans(tokenizer: Tokenizer, ids: list[int]) -> list[int]:
    """ends[j] = length of the decoded text of ids[: j + 1] (character offsets where each token ends)."""
    return [len(tokenizer.decode(ids[: j + 1])) for j in range(len(ids))]


def clean_text_and_ids(engine: Engine, prompt: list[int], n: int = 40) -> tuple[str, list[int]]:
    full = engine.complete(prompt, SamplingParams(temperature=0.0, max_new_tokens=n))
    assert "\ufffd" not in full.text[:80], "choose another prompt: the random reply should be clean text early on"
    return full.text, full.completion_ids


@pytest.mark.parametrize(
    ("first", "last", "trim_start", "trim_end"),
    [
        (5, 5, 0, 0),  # exactly one token's text
        (4, 6, 0, 0),  # three whole tokens
        (4, 5, 1, 0),  # starts inside token 4 (its last character), runs through token 5
        (4, 7, 0, 1),  # ends inside token 7 (all but its last character)
        (3, 8, 1, 1),  # inside at both ends, across six tokens
    ],
)
def test_stop_string_ends_reply_and_is_not_included(
    engine: Engine, first: int, last: int, trim_start: int, trim_end: int
) -> None:
    """A stop string cut from the unstopped reply's own text, over tokens first..last, possibly mid-token."""
    prompt = chat_prompt(engine, "Write a sentence.")
    text, ids = clean_text_and_ids(engine, prompt)
    ends = char_spans(engine.tokenizer, ids)
    start = ends[first] - trim_start if trim_start else ends[first - 1]
    stop = text[start : ends[last] - trim_end]
    assert stop.strip(), "the stop string should be visible text"
    cut = text.find(stop)  # the first occurrence is where the reply must end
    j = next(j for j in range(len(ids)) if stop in engine.tokenizer.decode(ids[: j + 1]))  # token completing it
    per, (completion,) = collect(engine.stream([prompt], SamplingParams(temperature=0.0, max_new_tokens=40), [stop]))
    assert completion.text == text[:cut]
    assert stop not in completion.text
    assert completion.finish_reason == "stop"
    assert completion.completion_ids == ids[: j + 1]
    assert "".join(c.text for c in per[0]) == completion.text


def test_earliest_of_several_stop_strings_wins(engine: Engine) -> None:
    prompt = chat_prompt(engine, "Write a sentence.")
    text, ids = clean_text_and_ids(engine, prompt)
    ends = char_spans(engine.tokenizer, ids)
    early, late = text[ends[2] : ends[4]], text[ends[8] : ends[10]]
    for stops in ([late, early], [early, late], ["never generated ☃", early]):
        completion = engine.complete(prompt, SamplingParams(temperature=0.0, max_new_tokens=40), stops)
        assert completion.text == text[: text.find(early)]
    completion = engine.complete(prompt, SamplingParams(temperature=0.0, max_new_tokens=40), ["never generated ☃"])
    assert (completion.text, completion.finish_reason) == (text, "length")


def test_stop_string_in_a_batch_stops_only_its_sequence(engine: Engine) -> None:
    prompts = [chat_prompt(engine, "Write a sentence."), chat_prompt(engine, "Count to ten.")]
    text, ids = clean_text_and_ids(engine, prompts[0])
    ends = char_spans(engine.tokenizer, ids)
    stop = text[ends[3] : ends[5]]
    params = SamplingParams(temperature=0.0, max_new_tokens=40)
    _, completions = collect(engine.stream(prompts, params, [stop]), n=2)
    for p, completion in zip(prompts, completions, strict=True):
        alone = engine.complete(p, params, [stop])
        assert (completion.text, completion.finish_reason) == (alone.text, alone.finish_reason)
    assert completions[0].finish_reason == "stop"
    assert completions[0].completion_tokens < completions[1].completion_tokens


def test_scripted_multi_token_stop_string(tokenizer: Tokenizer) -> None:
    reply = "The answer is 42. END OF ANSWER, and then some more words"
    script = [*tokenizer.encode(reply), *sorted(tokenizer.stop_ids)]
    engine = scripted_engine(tokenizer, script)
    stop = "END OF ANSWER"
    assert len(tokenizer.encode(stop)) >= 3, "the stop string should span several tokens"
    per, (completion,) = collect(engine.stream([[5, 6, 7]], SamplingParams(max_new_tokens=100), [stop]))
    assert completion.text == "The answer is 42. "
    assert completion.finish_reason == "stop"
    assert "".join(c.text for c in per[0]) == completion.text
    assert all("END" not in c.text for c in per[0])


def test_scripted_end_of_sequence_is_not_in_the_text(tokenizer: Tokenizer) -> None:
    eos = next(iter(tokenizer.stop_ids))
    words = tokenizer.encode("Short reply.")
    engine = scripted_engine(tokenizer, [*words, eos, *tokenizer.encode(" never shown")])
    completion = engine.complete([5, 6, 7], SamplingParams(max_new_tokens=50))
    assert completion.text == "Short reply."
    assert completion.completion_ids == words  # the end-of-sequence id is not part of the reply
    assert completion.finish_reason == "stop"
    length = engine.complete([5, 6, 7], SamplingParams(max_new_tokens=2))
    assert (length.text, length.finish_reason) == (tokenizer.decode(words[:2]), "length")


@pytest.mark.parametrize("text", [EMOJI_TEXT, MIXED_TEXT])
def test_scripted_multibyte_text_streams_without_replacement_chars(tokenizer: Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text)
    assert len(ids) > len(text.split()), "byte-level BPE should split these characters over several tokens"
    engine = scripted_engine(tokenizer, [*ids, *sorted(tokenizer.stop_ids)])
    per, (completion,) = collect(engine.stream([[5, 6, 7]], SamplingParams(max_new_tokens=200)))
    pieces = [c.text for c in per[0]]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == completion.text == text == tokenizer.decode(ids)
    assert sum(1 for p in pieces if p == "") > 0, "some tokens carry half a character and must be held back"


def test_scripted_stop_string_made_of_multibyte_characters(tokenizer: Tokenizer) -> None:
    engine = scripted_engine(tokenizer, [*tokenizer.encode(EMOJI_TEXT + " tail"), *sorted(tokenizer.stop_ids)])
    for stop, expected in (("世界", "héllo "), ("🎉", "héllo 世界 "), ("👍🏽 t", "héllo 世界 🎉")):
        completion = engine.complete([5, 6, 7], SamplingParams(max_new_tokens=100), [stop])
        assert (completion.text, completion.finish_reason) == (expected, "stop")


# --------------------------------------------------------------------------------- detokenizer alone


@pytest.mark.parametrize("text", [EMOJI_TEXT, MIXED_TEXT, "plain ascii text, nothing special"])
def test_incremental_detokenizer_emits_whole_characters(tokenizer: Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text)
    detok = IncrementalDetokenizer(tokenizer)
    emitted = ""
    for i, token in enumerate(ids):
        piece = detok.push(token)
        assert "\ufffd" not in piece
        emitted += piece
        so_far = tokenizer.decode(ids[: i + 1])
        assert so_far.startswith(emitted)
        if "\ufffd" not in so_far:  # nothing is held back once the text decodes cleanly
            assert emitted == so_far
    emitted += detok.flush()
    assert emitted == text == tokenizer.decode(ids)


def test_incremental_detokenizer_skips_special_tokens(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("a<|im_start|>b 🎉<|im_end|>")
    detok = IncrementalDetokenizer(tokenizer)
    out = "".join(detok.push(t) for t in ids) + detok.flush()
    assert out == tokenizer.decode(ids) == "ab 🎉"


# ---------------------------------------------------------------------------------- stop-string matcher


def run_matcher(stops: list[str], chunks: list[str]) -> tuple[list[str], bool, str]:
    matcher = StopStringMatcher(stops)
    outs, hit = [], False
    for chunk in chunks:
        out, hit = matcher.feed(chunk)
        outs.append(out)
        if hit:
            break
    return outs, hit, matcher.flush()


@pytest.mark.parametrize(
    ("stops", "chunks", "expected", "hit"),
    [
        (["</s>"], ["Hello <", "/", "s> world"], "Hello ", True),
        (["</s>"], ["Hello <", "b>"], "Hello <b>", False),  # a false start is released
        (["END"], ["E", "N", "D"], "", True),
        (["END"], ["xE", "N", "Dy"], "x", True),
        (["世界"], ["héllo 世", "界 🎉"], "héllo ", True),
        (["🎉👍"], ["a🎉", "👍🏽"], "a", True),
        (["ab", "b"], ["xa", "b"], "x", True),  # both match; "ab" starts earlier
        (["bc", "abcd"], ["ab", "cd"], "", True),  # the earliest start wins, not the first listed
        (["bc", "abcd"], ["xab", "cz"], "xa", True),
        ([""], ["anything"], "anything", False),  # empty stop strings are ignored
    ],
)
def test_stop_string_matcher_on_hand_made_chunks(stops: list[str], chunks: list[str], expected: str, hit: bool) -> None:
    outs, was_hit, rest = run_matcher(stops, chunks)
    assert was_hit is hit
    assert "".join(outs) + ("" if hit else rest) == expected


def test_stop_string_matcher_holds_back_only_possible_starts() -> None:
    matcher = StopStringMatcher(["<|end|>"])
    assert matcher.feed("text <|") == ("text ", False)  # "<|" may become the stop string
    assert matcher.feed("en") == ("", False)
    assert matcher.feed("tire") == ("<|entire", False)
    assert matcher.feed(" <|end|> after") == (" ", True)


@pytest.mark.parametrize("seed", range(20))
def test_stop_string_matcher_on_random_chunkings(seed: int) -> None:
    """Whatever the chunk boundaries, the output is the text up to the first stop string, and a prefix of it."""
    rng = random.Random(seed)
    text = MIXED_TEXT + " STOP here " + EMOJI_TEXT + " 🎉👍 again"
    stops = rng.sample(["STOP", "🎉👍", "here ", "テキスト", "zzz", "ve c"], k=2)
    first = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    cuts = sorted(rng.sample(range(1, len(text)), k=rng.randint(1, 25)))
    chunks = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    matcher = StopStringMatcher(stops)
    emitted, hit = "", False
    for chunk in chunks:
        out, hit = matcher.feed(chunk)
        emitted += out
        assert text[:first].startswith(emitted)
        if hit:
            break
    if not hit:
        emitted += matcher.flush()
    assert emitted == text[:first]
    assert hit is (first < len(text))


# ------------------------------------------------------------------------------------ fitting prompts


def test_fit_prompt_truncation_keeps_newest_tokens(engine: Engine) -> None:
    window = engine.context_window
    ids = list(range(1000, 1000 + window + 44))
    fitted, dropped = engine.fit_prompt(ids, truncate=True)
    assert fitted == ids[-(window - 1) :]  # room for one new token
    assert dropped == len(ids) - len(fitted) == 45
    assert engine.fit_prompt(ids[: window - 1]) == (ids[: window - 1], 0)
    with pytest.raises(ContextOverflowError) as info:
        engine.fit_prompt(ids[:window])
    assert info.value.n_tokens == window


def test_fit_prompt_keeps_bos_when_the_model_adds_one(engine: Engine) -> None:
    tok = copy.copy(engine.tokenizer)
    tok.add_bos = True
    assert tok.bos_id is not None
    with_bos = Engine(engine.model, tok, "bos")
    window = with_bos.context_window
    ids = [tok.bos_id, *range(1000, 1000 + window + 10)]
    fitted, dropped = with_bos.fit_prompt(ids, truncate=True)
    assert fitted[0] == tok.bos_id and fitted[1:] == ids[-(window - 2) :]
    assert len(fitted) == window - 1 and dropped == len(ids) - len(fitted)


def test_truncated_prompt_is_reported_in_the_completion(engine: Engine) -> None:
    ids = list(range(1000, 1000 + engine.context_window + 20))
    with pytest.raises(ContextOverflowError):
        engine.complete(ids, SamplingParams(temperature=0.0, max_new_tokens=3))
    completion = engine.complete(ids, SamplingParams(temperature=0.0, max_new_tokens=3), truncate=True)
    fitted, dropped = engine.fit_prompt(ids, truncate=True)
    assert completion.truncated_prompt_tokens == dropped == 21
    assert completion.prompt_ids == fitted
    assert (
        completion.completion_ids
        == engine.complete(fitted, SamplingParams(temperature=0.0, max_new_tokens=3)).completion_ids
    )


# ------------------------------------------------------------------------------------ results, loading


def test_completion_to_dict_fields(engine: Engine) -> None:
    completion = engine.complete(chat_prompt(engine, "Hi"), SamplingParams(temperature=0.0, max_new_tokens=6))
    d = completion.to_dict()
    assert set(d) == {
        "text", "prompt_ids", "completion_ids", "finish_reason", "ttft_ms", "decode_tokens_per_s",
        "truncated_prompt_tokens", "prompt_tokens", "completion_tokens", "logprobs",
    }  # fmt: skip
    assert not d["logprobs"]  # only when asked for (SamplingParams.logprobs)
    assert d["prompt_tokens"] == len(d["prompt_ids"]) == len(completion.prompt_ids)
    assert d["completion_tokens"] == len(d["completion_ids"]) == 6
    assert d["finish_reason"] == "length" and d["truncated_prompt_tokens"] == 0
    assert d["ttft_ms"] > 0 and d["decode_tokens_per_s"] > 0
    assert json.loads(json.dumps(d)) == d


def test_engine_load_from_a_saved_dir_generates_the_same(engine: Engine, tmp_path: Path) -> None:
    save_model_dir(tmp_path / "tiny", engine.model, engine.tokenizer, name="tiny")
    loaded = Engine.load(tmp_path / "tiny", dtype="float32", quantize="none")
    assert loaded.name == "tiny" and loaded.context_window == engine.context_window
    prompt = chat_prompt(engine, "Hello")
    assert loaded.encode_chat([{"role": "user", "content": "Hello"}]) == prompt
    assert loaded.complete(prompt, GREEDY).completion_ids == engine.complete(prompt, GREEDY).completion_ids


def test_resolve_dtype() -> None:
    assert resolve_dtype("float32") is torch.float32
    assert resolve_dtype("bfloat16") is torch.bfloat16
    assert resolve_dtype("auto") in (torch.float32, torch.bfloat16)
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("int3")


def test_scoring_from_a_position_gives_the_same_log_probabilities_as_scoring_all(engine: Engine) -> None:
    """`score(start=k)` projects only positions k-1.. onto the vocabulary; the scores it gives are the whole
    text's from k on (the same layers; only the vocabulary matmul has fewer rows)."""
    ids = chat_prompt(engine, "Name three colours of the rainbow, please.")
    whole = engine.score(ids, top=2)
    part = engine.score(ids, top=2, start=7)
    assert part[:7] == [None] * 7 and len(part) == len(whole) == len(ids)
    for a, b in zip(whole[7:], part[7:], strict=True):
        assert a is not None and b is not None and a.token_id == b.token_id
        assert b.logprob == pytest.approx(a.logprob, abs=1e-4) and [t for t, _ in a.top] == [t for t, _ in b.top]
    assert engine.score(ids, start=0)[0] is None and engine.score(ids, start=10_000)[1:] == [None] * (len(ids) - 1)
