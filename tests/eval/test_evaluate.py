"""`mini-claude eval`: its perplexity is a direct computation's, its BLEU/ROUGE are the reference packages' on
the replies it reports, `--compare` switches the adapter off and on, and `--split val` is fine-tuning's split."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from helpers import TINY_VOCAB, tiny_tokenizer
from mini_claude.checkpoint import load_model, save_model_dir
from mini_claude.config import PRESETS
from mini_claude.engine import Engine
from mini_claude.eval.evaluate import EvaluationError, evaluate, generation_case
from mini_claude.generate import SamplingParams
from mini_claude.lora import LoRAConfig, apply_lora, load_adapter, save_adapter
from mini_claude.model import Transformer
from mini_claude.tokenizer import Tokenizer
from mini_claude.train.data import IGNORE_INDEX, encode_chat, load_records
from mini_claude.train.finetune import load_data
from mini_claude.train.trainer import TrainingError

pytestmark = pytest.mark.one_thread  # tiny models: a second thread only adds barrier waits


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(tiny_tokenizer(), eos_token="<|im_end|>")


@pytest.fixture(scope="module")
def run(tok: Tokenizer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny model dir, a random (non-zero) adapter for it, and a chat data file."""
    root = tmp_path_factory.mktemp("eval")
    torch.manual_seed(0)
    model = Transformer(PRESETS["tiny-llama"].replace(vocab_size=TINY_VOCAB, max_seq_len=128))
    model.init_weights(std=0.3, generator=torch.Generator().manual_seed(0))
    model_dir = save_model_dir(root / "model", model, tok, "tiny")
    # Dropout on: evaluation must switch it off, or perplexity and replies would be random.
    apply_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.3, target_modules="all-linear", init_lora_weights=False))
    adapter = save_adapter(model, root / "adapter")
    rows = [
        {"messages": [{"role": "user", "content": f"Name a colour number {i}."}, {"role": "assistant", "content": c}]}
        for i, c in enumerate(["red", "green and blue", "a deep shade of purple", "yellow", "white", "grey"] * 2)
    ]
    rows[3]["messages"] += [{"role": "user", "content": "Another?"}, {"role": "assistant", "content": "black"}]
    data = root / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    return {"model": model_dir, "adapter": adapter, "data": data, "root": root}


def direct_perplexity(model: torch.nn.Module, examples: list[dict[str, list[int]]]) -> float:
    """One example at a time, no padding, log-softmax written out: the definition, not the batched code."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ex in examples:
            logits = model(torch.tensor([ex["input_ids"]]))[0].double()  # (T, V)
            logp = logits.log_softmax(-1)
            for t in range(len(ex["input_ids"]) - 1):
                target = ex["labels"][t + 1]
                if target != IGNORE_INDEX:
                    total -= float(logp[t, target])
                    count += 1
    return math.exp(total / count)


def test_generation_case_splits_prompt_and_first_reply(tok: Tokenizer) -> None:
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello there"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye"},
    ]
    case = generation_case(encode_chat(tok, messages), tok)
    assert case is not None
    assert case.prompt_ids == tok.apply_chat_template(messages[:1], add_generation_prompt=True)
    assert case.reference == "Hello there"
    text_window = {"input_ids": [5, 6, 7], "labels": [5, 6, 7]}  # plain text: every token a target
    assert generation_case(text_window, tok) is None


def test_compare_reports_direct_perplexity_and_reference_scores(run: dict[str, Path], tok: Tokenizer) -> None:
    import sacrebleu
    from rouge_score import rouge_scorer

    out = run["root"] / "eval.json"
    report = evaluate(
        data=str(run["data"]), model=str(run["model"]), adapter=str(run["adapter"]), compare=True, samples=4,
        max_tokens=6, batch_size=3, out=str(out), dtype="float32", skip_safety_filter=True, quiet=True,
    )  # fmt: skip
    assert json.loads(out.read_text())["results"] == report["results"]

    # Perplexity: base and base + adapter, each against the definition on the same examples.
    examples = load_data(str(run["data"]), tok, 512, 0.0, 0, safety_filter=False).train
    assert report["examples"] == len(examples) == 12
    base, _, _ = load_model(run["model"])
    assert report["results"]["base"]["perplexity"] == pytest.approx(direct_perplexity(base, examples), rel=1e-5)
    adapted = load_adapter(base, run["adapter"]).eval()
    expected = direct_perplexity(adapted, examples)
    assert report["results"]["adapter"]["perplexity"] == pytest.approx(expected, rel=1e-5)
    assert report["results"]["adapter"]["perplexity"] != pytest.approx(report["results"]["base"]["perplexity"])

    # BLEU / ROUGE: the reference packages on the replies and references the report shows.
    samples = report["samples"]
    assert len(samples) == report["generated"] == 4
    for run_name in ("base", "adapter"):
        preds, refs = [s[run_name] for s in samples], [s["reference"] for s in samples]
        assert report["results"][run_name]["bleu"] == pytest.approx(sacrebleu.corpus_bleu(preds, [refs]).score)
        scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
        rouge1 = sum(scorer.score(r, p)["rouge1"].fmeasure for p, r in zip(preds, refs, strict=True)) / len(preds)
        assert report["results"][run_name]["rouge1"] == pytest.approx(rouge1)

    # The adapter's replies are what a plain greedy generation with the adapted model gives, one at a time.
    engine = Engine(adapted.eval(), tok)
    first = generation_case(examples[0], tok)
    assert first is not None
    alone = engine.complete(first.prompt_ids, SamplingParams(max_new_tokens=6, temperature=0.0)).text.strip()
    assert samples[0]["adapter"] == alone


def test_val_split_is_the_finetuning_split(run: dict[str, Path], tok: Tokenizer) -> None:
    report = evaluate(
        data=str(run["data"]), model=str(run["model"]), split="val", val_fraction=0.25, seed=3, samples=0,
        out=str(run["root"] / "val.json"), dtype="float32", skip_safety_filter=True, quiet=True,
    )  # fmt: skip
    val = load_data(str(run["data"]), tok, 512, 0.25, 3, safety_filter=False).val
    assert report["examples"] == len(val) == 3
    assert "bleu" not in report["results"]["base"]
    base, _, _ = load_model(run["model"])
    assert report["results"]["base"]["perplexity"] == pytest.approx(direct_perplexity(base, val), rel=1e-5)
    assert len(load_records(run["data"])) == 12


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"compare": True}, "--compare needs --adapter"),
        ({"adapter": "no/such/adapter"}, "needs adapter_config.json"),
        ({"data": "missing.jsonl"}, "data file not found"),
        ({"samples": -1}, "samples must be >= 0"),
    ],
)
def test_user_mistakes_are_one_line_value_errors(run: dict[str, Path], kwargs, message) -> None:
    args = {"data": str(run["data"]), "model": str(run["model"]), "out": str(run["root"] / "x.json"), **kwargs}
    with pytest.raises(ValueError, match=message) as info:
        evaluate(dtype="float32", skip_safety_filter=True, quiet=True, **args)
    assert "\n" not in str(info.value)
    assert isinstance(info.value, EvaluationError | TrainingError)  # the classes the CLI shows as one line
