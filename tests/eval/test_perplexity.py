"""Text perplexity with llama-perplexity's windows: the windows, the scoring, the statistics, and `mini-claude eval
--data FILE.txt` through the engine (dense, int4 on its kernels, with an adapter)."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from helpers import TINY_VOCAB, tiny_tokenizer
from mini_claude.__main__ import main
from mini_claude.checkpoint import load_model, save_model_dir
from mini_claude.config import PRESETS
from mini_claude.eval.perplexity import (
    KLStats,
    TextTooShortError,
    check_ctx,
    read_text,
    scored_range,
    text_perplexity,
    text_windows,
    window_logits,
    window_starts,
)
from mini_claude.lora import LoRAConfig, apply_lora, merge_lora, save_adapter
from mini_claude.model import Transformer
from mini_claude.quantize import DENSE_ROWS, Int4Linear, quantize_model
from mini_claude.tokenizer import Tokenizer

pytestmark = pytest.mark.one_thread

TEXT = (
    "To be, or not to be, that is the question: Whether 'tis nobler in the mind to suffer The slings and arrows "
    "of outrageous fortune, Or to take arms against a sea of troubles And by opposing end them. To die: to sleep; "
    "No more; and by a sleep to say we end The heart-ache and the thousand natural shocks That flesh is heir to.\n"
) * 3  # 972 characters: 972 byte tokens with the tiny tokenizer


@pytest.fixture(scope="module")
def tiny() -> Transformer:
    model = Transformer(PRESETS["tiny-llama"].replace(vocab_size=TINY_VOCAB))
    model.init_weights(std=0.3, generator=torch.Generator().manual_seed(0))
    return model.eval()


def random_tokens(n: int, seed: int = 0) -> list[int]:
    return torch.randint(0, TINY_VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


# ------------------------------------------------------------------------------------------------ windows


def test_windows_are_back_to_back_and_a_partial_tail_is_not_scored() -> None:
    assert window_starts(10, 4) == [0, 4]  # tokens 8 and 9 are a partial window: dropped, as llama-perplexity does
    assert window_starts(8, 4) == [0, 4]
    assert window_starts(4, 4) == [0]  # one window is enough here (llama-perplexity wants two)
    with pytest.raises(TextTooShortError, match="3 tokens, fewer than one window of 4"):
        window_starts(3, 4)
    with pytest.raises(ValueError, match="at least 3"):
        check_ctx(2)


@pytest.mark.parametrize(("ctx", "expected"), [(512, (256, 511)), (5, (2, 4)), (4, (2, 3)), (3, (1, 2))])
def test_the_second_half_of_each_window_is_scored(ctx: int, expected: tuple[int, int]) -> None:
    """perplexity.cpp: first = n_ctx / 2, and the logits of positions first .. n_ctx - 2 are scored."""
    first, last = scored_range(ctx)
    assert (first, last) == expected
    assert last - first == ctx - ctx // 2 - 1  # tokens scored per window: 255 of 512


def test_bos_replaces_the_first_token_of_every_window() -> None:
    tokens = list(range(100, 111))
    assert text_windows(tokens, 4) == [[100, 101, 102, 103], [104, 105, 106, 107]]
    assert text_windows(tokens, 4, bos_id=1) == [[1, 101, 102, 103], [1, 105, 106, 107]]


def test_read_text_drops_one_trailing_newline_and_nothing_else(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_bytes(b"line\r\nzwei\n\n")
    assert read_text(tmp_path / "a.txt") == "line\r\nzwei\n"


# ----------------------------------------------------------------------------------------------- scoring


@pytest.mark.parametrize("bos_id", [None, 0])
def test_perplexity_is_the_direct_computation(tiny: Transformer, bos_id: int | None) -> None:
    """exp(mean NLL) of the scored tokens of each full window, computed here from the definition. With the same
    forward and the same cross-entropy the per-token NLLs are the same numbers, so only the order of float64
    additions differs; the float64 log-softmax written out agrees to float32 rounding."""
    ctx = 16
    tokens = random_tokens(3 * ctx + 5)  # three windows and a partial tail
    result = text_perplexity(tiny, tokens, ctx, bos_id)
    first = ctx // 2
    nlls, nlls64 = [], []
    with torch.no_grad():
        for s in (0, ctx, 2 * ctx):
            ids = tokens[s : s + ctx]
            if bos_id is not None:
                ids[0] = bos_id
            logits = tiny(torch.tensor([ids]))[0]  # (ctx, V)
            targets = torch.tensor(ids[first + 1 :])
            nlls.append(F.cross_entropy(logits[first : ctx - 1], targets, reduction="none"))
            logp = logits.double().log_softmax(-1)
            nlls64 += [-float(logp[p, ids[p + 1]]) for p in range(first, ctx - 1)]
    nll = torch.cat(nlls).double()
    assert (result.windows, result.scored, result.tokens, result.bos) == (3, 3 * (ctx - first - 1), 53, bos_id == 0)
    assert result.nll == pytest.approx(float(nll.mean()), rel=1e-14)
    assert result.ppl == pytest.approx(math.exp(float(nll.mean())), rel=1e-14)
    var = float((nll * nll).mean() - nll.mean() ** 2)
    assert result.ppl_se == pytest.approx(result.ppl * math.sqrt(var / (nll.numel() - 1)), rel=1e-9)
    assert result.ppl == pytest.approx(math.exp(sum(nlls64) / len(nlls64)), rel=1e-6)


def test_scoring_ignores_tokens_after_the_last_full_window(tiny: Transformer) -> None:
    tokens = random_tokens(40)
    a = text_perplexity(tiny, tokens[:32], ctx=16)
    b = text_perplexity(tiny, tokens, ctx=16)  # 8 more tokens: a partial window
    assert (a.ppl, a.scored) == (b.ppl, b.scored)
    with pytest.raises(TextTooShortError):
        text_perplexity(tiny, tokens[:15], ctx=16)


def test_a_window_fed_through_the_kv_cache_gives_the_one_forward_logits(tiny: Transformer) -> None:
    ids = random_tokens(21, seed=1)
    with torch.inference_mode():
        whole = window_logits(tiny, ids)
        for rows in (1, 3, 8):
            torch.testing.assert_close(window_logits(tiny, ids, rows), whole, rtol=1e-4, atol=1e-4)


def test_int4_kernels_give_one_window_the_same_logits_in_one_forward_or_through_the_cache(tiny: Transformer) -> None:
    """bench_quality frees int4 layers' dense copies and runs a window in one forward; `mini-claude eval` feeds it
    8 rows at a time through the cache. Both are the int4 kernel on the same values."""
    model = quantize_model(copy.deepcopy(tiny), "int4")
    for module in model.modules():
        if isinstance(module, Int4Linear):
            module.dense = None
    ids = random_tokens(24, seed=2)
    with torch.inference_mode():
        whole, steps = window_logits(model, ids), window_logits(model, ids, DENSE_ROWS)
    scale = whole.abs().max()
    torch.testing.assert_close(whole / scale, steps / scale, rtol=0, atol=2e-2)  # bf16 activations
    assert (whole.argmax(-1) == steps.argmax(-1)).float().mean() >= 0.9


def test_kl_divergence_and_top1_agreement() -> None:
    ref = torch.randn(50, TINY_VOCAB, generator=torch.Generator().manual_seed(0))
    same = KLStats()
    same.add(ref, ref.clone())
    assert same.summary()["kld_mean"] == pytest.approx(0.0, abs=1e-12) and same.summary()["same_top"] == 1.0
    other = ref + 0.5 * torch.randn(50, TINY_VOCAB, generator=torch.Generator().manual_seed(1))
    stats = KLStats()
    stats.add(ref[:20], other[:20], rows=7)  # in two parts, as windows arrive, and in row chunks
    stats.add(ref[20:], other[20:])
    want = F.kl_div(other.double().log_softmax(-1), ref.double().log_softmax(-1), log_target=True, reduction="none")
    summary = stats.summary()
    assert summary["tokens"] == 50
    assert summary["kld_mean"] == pytest.approx(float(want.sum(-1).mean()), rel=1e-5)  # float32 sums
    assert summary["same_top"] == int((ref.argmax(-1) == other.argmax(-1)).sum()) / 50


# --------------------------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def text_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny model dir (byte tokens, 256-token context), a text file, and a random non-zero adapter."""
    root = tmp_path_factory.mktemp("text-eval")
    model = Transformer(PRESETS["tiny-llama"].replace(vocab_size=TINY_VOCAB))
    model.init_weights(std=0.1, generator=torch.Generator().manual_seed(0))  # logits of a sane size
    model_dir = save_model_dir(root / "model", model, Tokenizer(tiny_tokenizer(), eos_token="<|im_end|>"), "tiny")
    (root / "hamlet.txt").write_text(TEXT)
    model, _, _ = load_model(model_dir, torch.float32)
    apply_lora(model, LoRAConfig(r=4, alpha=8, target_modules="all-linear", init_lora_weights=False))
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    return {"model": model_dir, "text": root / "hamlet.txt", "adapter": save_adapter(model, root / "adapter")}


def run_eval(args: list[str], capsys: pytest.CaptureFixture[str], tmp_path: Path) -> dict:
    assert main(["eval", *args, "--json", "--out", str(tmp_path / "eval.json")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert json.loads((tmp_path / "eval.json").read_text()) == report
    return report


def test_eval_of_a_text_file_is_text_perplexity_of_the_loaded_model(text_run, capsys, tmp_path: Path) -> None:
    args = ["--data", str(text_run["text"]), "--model", str(text_run["model"]), "--ctx", "64"]
    report = run_eval([*args, "--quantize", "none", "--dtype", "float32"], capsys, tmp_path)
    model, tokenizer, _ = load_model(text_run["model"], torch.float32)
    tokens = tokenizer.encode(read_text(text_run["text"]))
    want = text_perplexity(model, tokens, ctx=64)
    got = report["results"]["base"]
    assert got == want.to_dict()  # the same arithmetic: the same numbers
    assert (report["quantize"], report["dtype"], report["ctx"], report["rows_per_forward"]) == (
        "none", "float32", 64, None
    )  # fmt: skip
    assert got["tokens"] == len(TEXT) - 1 and got["windows"] == (len(TEXT) - 1) // 64 and got["scored"] == 15 * 31
    # Without --json: the PPL with its standard error.
    assert main(["eval", *args, "--quantize", "none", "--dtype", "float32", "--out", str(tmp_path / "e2.json")]) == 0
    assert f"PPL = {want.ppl:.4f} +/- {want.ppl_se:.5f}" in capsys.readouterr().out


def test_int4_eval_runs_the_int4_kernels(text_run, capsys, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rows_seen: list[int] = []
    forward = Int4Linear.forward

    def spy(self: Int4Linear, x: torch.Tensor) -> torch.Tensor:
        rows_seen.append(x.reshape(-1, x.shape[-1]).shape[0])
        return forward(self, x)

    monkeypatch.setattr(Int4Linear, "forward", spy)
    args = ["--data", str(text_run["text"]), "--model", str(text_run["model"]), "--ctx", "64", "--quantize", "int4"]
    report = run_eval(args, capsys, tmp_path)
    assert report["quantize"] == "int4" and report["rows_per_forward"] == DENSE_ROWS
    assert rows_seen and max(rows_seen) <= DENSE_ROWS  # never the dense prefill copy
    dense = run_eval([*args[:-1], "none"], capsys, tmp_path)["results"]["base"]["ppl"]
    assert report["results"]["base"]["ppl"] == pytest.approx(dense, rel=0.05)


def test_eval_compare_serves_the_adapter_as_the_engine_does(text_run, capsys, tmp_path: Path) -> None:
    args = ["--data", str(text_run["text"]), "--model", str(text_run["model"]), "--ctx", "64", "--quantize", "none"]
    report = run_eval(
        [*args, "--dtype", "float32", "--adapter", str(text_run["adapter"]), "--compare"], capsys, tmp_path
    )
    base, adapted = report["results"]["base"]["ppl"], report["results"]["adapter"]["ppl"]
    assert base == run_eval([*args, "--dtype", "float32"], capsys, tmp_path)["results"]["base"]["ppl"]
    model, tokenizer, _ = load_model(text_run["model"], torch.float32)
    from mini_claude.lora import load_adapter

    merged = merge_lora(load_adapter(model, text_run["adapter"]))
    tokens = tokenizer.encode(read_text(text_run["text"]))
    assert adapted != base
    assert adapted == pytest.approx(text_perplexity(merged, tokens, ctx=64).ppl, rel=1e-4)


def test_text_eval_mistakes_are_one_line_errors(text_run, capsys, tmp_path: Path) -> None:
    (tmp_path / "short.txt").write_text("too short")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    model = ["--model", str(text_run["model"]), "--quantize", "none", "--out", str(tmp_path / "e.json")]
    cases = {
        "short": (["--data", str(tmp_path / "short.txt"), "--ctx", "64"], "fewer than one window of 64"),
        "ctx too small": (["--data", str(text_run["text"]), "--ctx", "2"], "ctx must be at least 3"),
        "ctx too big": (["--data", str(text_run["text"]), "--ctx", "4096"], "context window of 256"),
        "not utf-8": (["--data", str(tmp_path / "latin1.txt")], "can't decode"),
        "two files": (["--data", f'["{text_run["text"]}", "chatterbot"]'], "one --data FILE"),
    }
    for name, (args, message) in cases.items():
        assert main(["eval", *args, *model]) == 1, name
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("mini-claude: error:") and message in err, (name, err)


def test_tokenizer_bos_rule_decides_the_window_start(tiny: Transformer) -> None:
    """A model that adds BOS gets it at the start of every window (the text's own first token is replaced)."""
    tok = Tokenizer(tiny_tokenizer(), bos_token="<|endoftext|>", eos_token="<|im_end|>", add_bos=True)
    tokens = tok.encode(TEXT)
    assert tokens[0] == tok.bos_id
    windows = text_windows(tokens, 64, tok.bos_id)
    assert all(w[0] == tok.bos_id for w in windows) and windows[1][1:] == tokens[65:128]
