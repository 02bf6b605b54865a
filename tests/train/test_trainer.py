"""The training loop: it learns, its schedule is transformers', accumulation and DDP do not change the result,
checkpoints resume the identical loss curve, and the command writes what it promises."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import TINY_VOCAB, tiny_tokenizer
from mini_claude.checkpoint import load_model, save_model_dir
from mini_claude.config import PRESETS
from mini_claude.lora import LoRAConfig, apply_lora, load_adapter
from mini_claude.model import Transformer
from mini_claude.tokenizer import Tokenizer
from mini_claude.train.data import encode_chat
from mini_claude.train.finetune import finetune
from mini_claude.train.trainer import TrainConfig, Trainer, TrainingError, lr_factor

pytestmark = pytest.mark.one_thread  # tiny models: a second thread only adds barrier waits
CONFIG = PRESETS["tiny-llama"].replace(vocab_size=TINY_VOCAB, max_seq_len=128)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(tiny_tokenizer(), eos_token="<|im_end|>")


def conversations(n: int) -> list[tuple[str, str]]:
    """Question/answer pairs of varied lengths, so token-weighting across micro-batches matters."""
    return [
        (f"What is {a} times {a % 3 + 1}?", f"{a} times {a % 3 + 1} is {a * (a % 3 + 1)}." + " ok" * (a % 4))
        for a in range(n)
    ]


@pytest.fixture(scope="module")
def examples(tok: Tokenizer) -> list[dict[str, list[int]]]:
    chats = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in conversations(12)]
    return [encode_chat(tok, c) for c in chats]


def tiny_lora_model(dropout: float = 0.0, dtype: torch.dtype = torch.float32) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(CONFIG)
    model.init_weights(std=0.05, generator=torch.Generator().manual_seed(0))
    model.to(dtype)
    return apply_lora(model, LoRAConfig(r=4, alpha=8, dropout=dropout, target_modules="all-linear"))  # type: ignore[return-value]


def make_trainer(examples, out: Path, dropout: float = 0.0, precision: str = "float32", **overrides) -> Trainer:
    settings = dict(steps=6, lr=5e-3, warmup_steps=2, batch_size=4, eval_every=3, save_every=3, precision=precision)
    settings.update(overrides)
    dtype = torch.bfloat16 if precision == "bfloat16" else torch.float32
    model = tiny_lora_model(dropout, dtype)
    return Trainer(model, examples[:8], examples[8:], TrainConfig(**settings), out, progress=False, log=lambda _: None)


def train_losses(history: list[dict]) -> list[float]:
    return [r["loss"] for r in history if "loss" in r]


def adapter_tensors(out_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out_dir / "adapter_model.safetensors"))


# --------------------------------------------------------------------------------------------- schedule


def test_schedule_is_transformers_cosine_with_warmup() -> None:
    from transformers import get_cosine_schedule_with_warmup

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    reference = get_cosine_schedule_with_warmup(opt, num_warmup_steps=5, num_training_steps=40)
    for step in range(41):  # past the end HF climbs the cosine again; we stay at the floor
        assert lr_factor(step, 5, 40) == pytest.approx(reference.get_last_lr()[0], abs=1e-12), step
        opt.step()
        reference.step()
    # With a floor, the curve is rescaled into [floor, 1] and ends at the floor.
    assert lr_factor(40, 5, 40, 0.1) == pytest.approx(0.1)
    assert lr_factor(5, 5, 40, 0.1) == pytest.approx(1.0)


# --------------------------------------------------------------------------------------------- learning


def test_training_reduces_loss(examples, tmp_path: Path) -> None:
    trainer = make_trainer(examples, tmp_path, steps=30, lr=2e-2, eval_every=30, save_every=0)
    history = trainer.fit()
    losses = train_losses(history)
    evals = [r["val_loss"] for r in history if "val_loss" in r]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses
    assert evals[-1] < evals[0]


def test_gradient_accumulation_equals_one_large_batch(examples, tmp_path: Path) -> None:
    """The loss is a mean over the global batch's tokens, however the batch is cut into micro-batches."""
    runs = {}
    for batch, accum in [(4, 1), (2, 2), (1, 4)]:
        trainer = make_trainer(
            examples, tmp_path / f"{batch}x{accum}", batch_size=batch, grad_accum=accum, save_every=0
        )
        history = trainer.fit()
        norms = [r["grad_norm"] for r in history if "grad_norm" in r]
        params = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        runs[batch, accum] = (train_losses(history), norms, params)
    ref_losses, ref_norms, ref_params = runs[4, 1]
    for key, (losses, norms, params) in runs.items():
        assert losses == pytest.approx(ref_losses, rel=1e-5), key
        assert norms == pytest.approx(ref_norms, rel=1e-5), key  # Adam would hide a wrong gradient scale
        for name, value in params.items():
            torch.testing.assert_close(value, ref_params[name], rtol=1e-4, atol=1e-6, msg=f"{key} {name}")


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_resume_continues_the_identical_loss_curve(examples, tmp_path: Path, precision: str) -> None:
    # Dropout makes the RNG state part of what must be restored.
    full = make_trainer(examples, tmp_path / "full", dropout=0.2, precision=precision)
    full_history = full.fit()
    part = make_trainer(examples, tmp_path / "part", dropout=0.2, precision=precision)
    save = part.save_checkpoint

    def save_then_crash() -> Path:  # the run dies right after its step-3 checkpoint
        save()
        raise KeyboardInterrupt

    part.save_checkpoint = save_then_crash  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        part.fit()
    assert part.step == 3
    # A new process: a fresh model (from another RNG state) continues from the step-3 checkpoint.
    torch.manual_seed(1234)
    resumed = make_trainer(examples, tmp_path / "part", dropout=0.2, precision=precision)
    resumed.load_checkpoint(tmp_path / "part" / "checkpoints" / "step-000003")
    assert resumed.step == 3
    history = resumed.fit()
    assert train_losses(history) == train_losses(full_history)  # exact, step for step
    assert [r["val_loss"] for r in history if "val_loss" in r] == [
        r["val_loss"] for r in full_history if "val_loss" in r
    ]
    final_full = adapter_tensors(tmp_path / "full" / "checkpoints" / "step-000006" / "adapter")
    final_resumed = adapter_tensors(tmp_path / "part" / "checkpoints" / "step-000006" / "adapter")
    assert final_full.keys() == final_resumed.keys()
    for name in final_full:
        assert torch.equal(final_full[name], final_resumed[name]), name
    # The metrics log of the resumed run reads as one uninterrupted run.
    logged = [json.loads(line) for line in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in logged if "loss" in r] == train_losses(full_history)


def test_resume_refuses_a_different_global_batch(examples, tmp_path: Path) -> None:
    make_trainer(examples, tmp_path, steps=3).fit()
    other = make_trainer(examples, tmp_path, batch_size=2)
    with pytest.raises(TrainingError, match="global batch of 4"):
        other.load_checkpoint(tmp_path / "checkpoints" / "step-000003")


# ------------------------------------------------------------------------------------- the command


def write_tiny_run_inputs(root: Path, tok: Tokenizer) -> tuple[Path, Path]:
    model = Transformer(CONFIG)
    model.init_weights(std=0.05, generator=torch.Generator().manual_seed(0))
    model_dir = save_model_dir(root / "model", model, tok, "tiny")
    rows = [{"instruction": q, "output": a} for q, a in conversations(20)]
    data = root / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    return model_dir, data


# No dropout: its masks depend on how a batch is split over processes, so only then can runs agree exactly.
RUN = dict(dropout=0.0, steps=5, lr=5e-3, warmup_steps=1, eval_every=2, save_every=0, dtype="float32", rank=4,
           targets="all-linear", skip_safety_filter=True, quiet=True, max_length=128)  # fmt: skip


def test_finetune_writes_adapter_metrics_and_plot(tok: Tokenizer, tmp_path: Path) -> None:
    model_dir, data = write_tiny_run_inputs(tmp_path, tok)
    out = tmp_path / "out"
    summary = finetune(data=str(data), out=str(out), model=str(model_dir), batch_size=4, **RUN)

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5]
    assert all({"lr", "grad_norm", "tokens", "tokens_per_s", "elapsed_s"} <= r.keys() for r in train)
    assert [r["step"] for r in evals] == [0, 2, 4, 5]
    assert all(r["val_ppl"] == pytest.approx(math.exp(r["val_loss"])) for r in evals)
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert summary["val_ppl_before"] == evals[0]["val_ppl"] and summary["val_ppl_after"] == evals[-1]["val_ppl"]
    assert json.loads((out / "summary.json").read_text())["steps"] == 5

    # The adapter dir is PEFT's format and loads onto a fresh base model.
    base, _, _ = load_model(model_dir)
    adapted = load_adapter(base, out / "adapter")
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["peft_type"] == "LORA"
    assert any(p.abs().sum() > 0 for n, p in adapted.named_parameters() if "lora_B" in n)  # it trained

    # A second run into the same dir must be asked for explicitly.
    with pytest.raises(TrainingError, match="--resume"):
        finetune(data=str(data), out=str(out), model=str(model_dir), batch_size=4, **RUN)


def test_finetune_augment_adds_training_copies_only(tok: Tokenizer, tmp_path: Path) -> None:
    model_dir, data = write_tiny_run_inputs(tmp_path, tok)
    plain = finetune(data=str(data), out=str(tmp_path / "plain"), model=str(model_dir), batch_size=4, **RUN)
    run = {**RUN, "steps": 2}
    augmented = finetune(
        data=str(data), out=str(tmp_path / "aug"), model=str(model_dir), batch_size=4, augment="rules", **run
    )
    assert augmented["val_examples"] == plain["val_examples"]
    assert plain["train_examples"] < augmented["train_examples"] <= 2 * plain["train_examples"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"data": "no/such/file.jsonl"}, "data file not found: no/such/file.jsonl"),
        ({"lr": 0.0}, "lr must be a positive number"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"rank": 0}, "rank r must be >= 1"),
        ({"targets": ["no_such_proj"]}, "match no module"),
        ({"resume": True}, "nothing to resume"),
        ({"val_fraction": 1.5}, "val_fraction must be in"),
    ],
)
def test_user_mistakes_are_one_line_value_errors(tok: Tokenizer, tmp_path: Path, overrides, message) -> None:
    model_dir, data = write_tiny_run_inputs(tmp_path, tok)
    kwargs = {**RUN, "data": str(data), "out": str(tmp_path / "out"), "model": str(model_dir), **overrides}
    with pytest.raises(ValueError, match=message) as info:
        finetune(**kwargs)
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------------------------- DDP

DDP_SCRIPT = """
import sys
from mini_claude.train.finetune import finetune
data, out, model = sys.argv[1:4]
finetune(data=data, out=out, model=model, batch_size=2, threads=1, **{run})
"""


@pytest.mark.slow
def test_two_process_ddp_equals_one_process(tok: Tokenizer, tmp_path: Path) -> None:
    """torchrun with 2 gloo processes x batch 2 == 1 process x batch 4: same losses, same adapter."""
    model_dir, data = write_tiny_run_inputs(tmp_path, tok)
    script = tmp_path / "ddp_finetune.py"
    script.write_text(DDP_SCRIPT.format(run=repr(RUN)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [*cmd, str(data), str(tmp_path / "ddp"), str(model_dir)], capture_output=True, text=True, env=env, timeout=240
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    finetune(data=str(data), out=str(tmp_path / "single"), model=str(model_dir), batch_size=4, **RUN)

    def metrics(out: str) -> list[dict]:
        return [json.loads(line) for line in (tmp_path / out / "metrics.jsonl").read_text().splitlines()]

    ddp, single = metrics("ddp"), metrics("single")
    assert [r["step"] for r in ddp] == [r["step"] for r in single]
    for a, b in zip(ddp, single, strict=True):
        for key in ("loss", "grad_norm", "val_loss"):  # Adam hides a gradient scale error; the norm does not
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-5), (key, a["step"])
    assert json.loads((tmp_path / "ddp" / "summary.json").read_text())["processes"] == 2
    ddp_adapter, single_adapter = (
        adapter_tensors(tmp_path / "ddp" / "adapter"),
        adapter_tensors(tmp_path / "single" / "adapter"),
    )
    for name, value in single_adapter.items():
        torch.testing.assert_close(ddp_adapter[name], value, rtol=1e-4, atol=1e-6)
