"""The LoRA training loop: AdamW, warmup + cosine, accumulation, clipping, mixed precision, DDP, exact resume.

Design choices:

- **One loss definition for every way of splitting a batch.** The loss of an optimizer step is the mean
  negative log-likelihood over every target token of the *global* batch (all micro-batches of all
  processes). Each micro-batch contributes its *summed* NLL divided by the global batch's target count, which
  every process knows in advance because each holds the whole (small) tokenized dataset. So batch 8, batch 4
  x 2 accumulation steps and 2 processes x batch 4 give the same gradient up to float rounding. Averaging
  per-micro-batch means instead would weigh a token of a short batch more than a token of a long one.
- **The data position is the step.** The training examples form an endless stream of seeded per-epoch
  permutations, and step s takes stream positions [s*G, (s+1)*G) for a global batch of G examples; process r
  takes its contiguous share of those, micro-batch by micro-batch. A checkpoint therefore needs only the step
  count to know where the data is, and a resumed run sees exactly the batches it would have seen.
- **Checkpoints resume exactly.** `checkpoints/step-NNNNNN/` holds the adapter in PEFT's format (so every
  checkpoint is also a usable adapter), the optimizer, scheduler and grad-scaler states, the step, the
  cumulative training time, and each process's RNG states (torch, CUDA, Python, NumPy: LoRA dropout draws
  from torch's). It is written under a temporary name and renamed, so a crash never leaves half a
  checkpoint. On resume the metrics log is cut back to the checkpoint's step and continues from there.
- **Mixed precision as PEFT/Lightning do it.** The frozen base weights may be stored in bf16 (half the memory
  and AMX/AVX512-BF16 matmuls on CPU); the adapter weights and Adam's moments stay float32 (`lora.py` keeps
  adapters of a bf16 model in float32), and `torch.autocast` runs the forward in bf16. The cross-entropy is
  computed in float32 on the target positions only. fp16 (CUDA only) adds a `GradScaler`, because fp16
  gradients underflow where bf16 ones, with float32's exponent range, do not.
- **Schedule**: linear warmup from 0, then a cosine decay to `min_lr_ratio * lr` (Loshchilov & Hutter, 2017).
  With `min_lr_ratio=0` it is exactly `transformers.get_cosine_schedule_with_warmup`, a test checks that.
- **Data parallel**: `torch.nn.parallel.DistributedDataParallel` over the process group `torchrun` sets up
  (gloo on CPU, NCCL on CUDA). DDP *averages* gradients over processes, so each process scales its loss by the
  world size to keep the global-token mean. Accumulation micro-batches run under `no_sync()` so gradients are
  all-reduced once per step. Evaluation is sharded over processes and the NLL sums are all-reduced. Only
  rank 0 writes files or draws the progress bar.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from mini_claude.lora import ADAPTER_WEIGHTS, from_peft_key, lora_config_of, lora_state_dict, save_adapter
from mini_claude.train.data import IGNORE_INDEX, collate

Example = dict[str, list[int]]
Precision = Literal["float32", "bfloat16", "float16"]
AMP_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
METRICS_FILE, PLOT_FILE, CHECKPOINTS_DIR = "metrics.jsonl", "loss.png", "checkpoints"


class TrainingError(ValueError):
    """A mistake in what the user asked for (a bad value, a missing file or checkpoint); shown as one line."""


@dataclass
class TrainConfig:
    """How to train. Batch sizes are per process: a step sees batch_size * grad_accum * processes examples."""

    steps: int = 0  # optimizer steps; 0 means enough for `epochs` passes over the training examples
    epochs: float = 1.0
    lr: float = 2e-4
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio rather than 0: the last steps still learn
    warmup_steps: int = 10
    weight_decay: float = 0.0  # PEFT's and litgpt's LoRA default: the adapter is small and starts at zero
    beta1: float = 0.9
    beta2: float = 0.999
    max_grad_norm: float = 1.0  # 0 turns clipping off
    batch_size: int = 8
    grad_accum: int = 1
    eval_every: int = 50  # 0: evaluate only before and after training
    save_every: int = 100  # 0: checkpoint only at the end
    eval_batch_size: int = 0  # 0: batch_size
    seed: int = 0
    precision: Precision = "float32"  # autocast dtype; float32 means no autocast

    def __post_init__(self) -> None:
        checks = [
            (self.steps >= 0, f"steps must be >= 0, got {self.steps}"),
            (self.epochs > 0 or self.steps > 0, f"epochs must be > 0, got {self.epochs}"),
            (self.lr > 0 and math.isfinite(self.lr), f"lr must be a positive number, got {self.lr}"),
            (0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}"),
            (self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "beta1 and beta2 must be in [0, 1)"),
            (self.max_grad_norm >= 0, f"max_grad_norm must be >= 0, got {self.max_grad_norm}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.grad_accum >= 1, f"grad_accum must be >= 1, got {self.grad_accum}"),
            (self.eval_every >= 0, f"eval_every must be >= 0, got {self.eval_every}"),
            (self.save_every >= 0, f"save_every must be >= 0, got {self.save_every}"),
            (self.eval_batch_size >= 0, f"eval_batch_size must be >= 0, got {self.eval_batch_size}"),
            (self.precision in ("float32", "bfloat16", "float16"), f"unknown precision {self.precision!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise TrainingError(message)


def lr_factor(step: int, warmup: int, total: int, min_ratio: float = 0.0) -> float:
    """Multiplier of the peak learning rate for optimizer step `step` (0-based): linear warmup, then cosine."""
    if step < warmup:
        return step / max(1, warmup)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def summed_nll(logits: Tensor, labels: Tensor) -> Tensor:
    """Sum of -log p(target) over target tokens, in float32. logits (B, T, V); labels (B, T) aligned with
    the inputs (position t predicts label t+1), -100 where there is no target."""
    targets = labels[:, 1:]  # (B, T-1)
    keep = targets != IGNORE_INDEX
    picked = logits[:, :-1][keep]  # (N, V): only target positions are cast to float32
    return F.cross_entropy(picked.float(), targets[keep], reduction="sum")


def n_targets(example: Example) -> int:
    """How many tokens of an example are predicted (labels shifted by one, as the loss sees them)."""
    return sum(1 for t in example["labels"][1:] if t != IGNORE_INDEX)


def data_fingerprint(examples: Sequence[Example]) -> str:
    """A short hash of the tokenized training set, so a resume on different data is refused."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(np.asarray(ex["input_ids"], dtype=np.int64).tobytes())
        h.update(np.asarray(ex["labels"], dtype=np.int64).tobytes())
        h.update(b"|")
    return h.hexdigest()[:16]


def distributed_info() -> tuple[int, int]:
    """(rank, world size) of the current process group, or (0, 1) without one."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def rng_state() -> dict[str, Any]:
    """Every RNG a training step might draw from, in types `torch.load(weights_only=True)` accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The checkpoint with the highest step under `out_dir/checkpoints`, or None."""
    found = sorted((Path(out_dir) / CHECKPOINTS_DIR).glob("step-[0-9]*"))
    found = [p for p in found if p.is_dir() and not p.name.endswith(".tmp")]
    return found[-1] if found else None


# ------------------------------------------------------------------------------------------ trainer


class Trainer:
    """Trains the LoRA parameters of `model` on tokenized examples (`input_ids`, `labels`; see `train.data`).

    Call `fit()`; or `train_step()` / `evaluate()` / `save_checkpoint()` one at a time. Run under `torchrun`
    after `torch.distributed.init_process_group` for data parallelism; every process must be given the same
    model and examples.
    """

    def __init__(
        self,
        model: nn.Module,
        train: Sequence[Example],
        val: Sequence[Example],
        config: TrainConfig,
        out_dir: str | Path,
        pad_id: int = 0,
        base_model_name: str = "",
        progress: bool = True,
        log: Callable[[str], None] | None = None,
    ) -> None:
        if not train:
            raise TrainingError("no training examples")
        lora_config_of(model)  # a LoRA model, or a clear error
        self.model, self.config = model, config
        self.train_data, self.val_data = list(train), list(val)
        self.out = Path(out_dir)
        self.pad_id, self.base_model_name = pad_id, base_model_name
        self.rank, self.world = distributed_info()
        self.progress = progress and self.rank == 0
        self.log = log or print
        self.device = next(model.parameters()).device
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise TrainingError("the model has no trainable parameters")
        if config.precision == "float16" and self.device.type != "cuda":
            raise TrainingError("float16 training needs a CUDA GPU; use bfloat16 on CPU")
        self.ddp: nn.Module | None = None
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = nn.parallel.DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)

        self.per_rank = config.batch_size * config.grad_accum
        self.global_batch = self.per_rank * self.world
        self.total_steps = config.steps or math.ceil(config.epochs * len(self.train_data) / self.global_batch)
        self.optimizer = torch.optim.AdamW(
            self.params, lr=config.lr, betas=(config.beta1, config.beta2), weight_decay=config.weight_decay
        )
        warmup, total, floor = config.warmup_steps, self.total_steps, config.min_lr_ratio
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, warmup, total, floor)
        )
        self.scaler = torch.amp.GradScaler("cuda") if config.precision == "float16" else None
        self.targets = [n_targets(ex) for ex in self.train_data]
        self.fingerprint = data_fingerprint(self.train_data)
        self.step = 0
        self.elapsed = 0.0  # training seconds over all sessions of this run (evaluation and saving excluded)
        self.history: list[dict[str, Any]] = []
        self._order_cache: tuple[int, list[int]] = (-1, [])

    # ------------------------------------------------------------------------------------------- data
    def _epoch_order(self, epoch: int) -> list[int]:
        if self._order_cache[0] != epoch:
            order = list(range(len(self.train_data)))
            random.Random(self.config.seed * 1_000_003 + epoch).shuffle(order)
            self._order_cache = (epoch, order)
        return self._order_cache[1]

    def batch_indices(self, step: int) -> list[int]:
        """The example indices of global batch `step`: positions [step*G, (step+1)*G) of the example stream."""
        n = len(self.train_data)
        return [
            self._epoch_order(pos // n)[pos % n]
            for pos in range(step * self.global_batch, (step + 1) * self.global_batch)
        ]

    def _micro_batches(self, indices: list[int]) -> Iterator[dict[str, Tensor]]:
        """This process's share of a global batch, cut into micro-batches of `batch_size`."""
        mine = indices[self.rank * self.per_rank : (self.rank + 1) * self.per_rank]
        b = self.config.batch_size
        for start in range(0, len(mine), b):
            batch = collate([self.train_data[i] for i in mine[start : start + b]], self.pad_id)
            yield {k: v.to(self.device) for k, v in batch.items()}

    def _autocast(self) -> AbstractContextManager[Any]:
        dtype = AMP_DTYPES.get(self.config.precision)
        return torch.autocast(self.device.type, dtype=dtype) if dtype is not None else nullcontext()

    # ----------------------------------------------------------------------------------------- steps
    def train_step(self) -> dict[str, Any]:
        """One optimizer step over the next global batch; returns the step's metrics (loss over all processes)."""
        self.model.train()
        indices = self.batch_indices(self.step)
        n_global = sum(self.targets[i] for i in indices)
        scale = self.world / max(1, n_global)  # DDP averages over processes; undo that to keep a token mean
        stats = torch.zeros(2, dtype=torch.float64)  # summed NLL, non-pad tokens of this process
        forward = self.ddp or self.model
        for m, batch in enumerate(self._micro_batches(indices)):
            last = m == self.config.grad_accum - 1
            with self.ddp.no_sync() if self.ddp is not None and not last else nullcontext():  # type: ignore[operator]
                with self._autocast():
                    logits = forward(batch["input_ids"])  # (B, T, V)
                nll = summed_nll(logits, batch["labels"])
                loss = nll * scale
                (self.scaler.scale(loss) if self.scaler else loss).backward()
            stats += torch.tensor([nll.item(), batch["attention_mask"].sum().item()], dtype=torch.float64)
        if self.world > 1:
            dist.all_reduce(stats)
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        max_norm = self.config.max_grad_norm or math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
        lr = self.optimizer.param_groups[0]["lr"]
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        loss_value = float(stats[0]) / max(1, n_global)
        return {"step": self.step, "loss": loss_value, "lr": lr, "grad_norm": grad_norm, "tokens": int(stats[1])}

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Token-weighted loss and perplexity over the validation examples (sharded over processes)."""
        was_training = self.model.training
        self.model.eval()
        # Sorted by length so batches pad little; a token-weighted sum does not depend on the order.
        shard = sorted(self.val_data[self.rank :: self.world], key=lambda ex: len(ex["input_ids"]))
        size = self.config.eval_batch_size or self.config.batch_size
        stats = torch.zeros(2, dtype=torch.float64)  # summed NLL, target tokens
        for start in range(0, len(shard), size):
            batch = collate(shard[start : start + size], self.pad_id)
            labels = batch["labels"].to(self.device)
            with self._autocast():
                logits = self.model(batch["input_ids"].to(self.device))  # (B, T, V)
            n = int((labels[:, 1:] != IGNORE_INDEX).sum())
            stats += torch.tensor([summed_nll(logits, labels).item(), n], dtype=torch.float64)
        if self.world > 1:
            dist.all_reduce(stats)
        self.model.train(was_training)
        if stats[1] == 0:
            raise TrainingError("the validation examples have no target tokens")
        loss = float(stats[0] / stats[1])
        return {"step": self.step, "val_loss": loss, "val_ppl": math.exp(loss)}

    def fit(self) -> list[dict[str, Any]]:
        """Train to `total_steps`, evaluating, checkpointing and logging on the way; returns the metrics history."""
        from tqdm.auto import tqdm

        self._restart_metrics_log()
        if self.step == 0 and self.val_data:
            self._record(self.evaluate())  # the starting point: B = 0, so this is the base model
        bar = tqdm(
            total=self.total_steps, initial=self.step, unit="step", disable=not self.progress, dynamic_ncols=True
        )
        rate = None
        while self.step < self.total_steps:
            start = time.perf_counter()
            record = self.train_step()
            took = time.perf_counter() - start
            self.elapsed += took
            step_rate = record["tokens"] / took
            rate = step_rate if rate is None else 0.9 * rate + 0.1 * step_rate  # smoothed for display
            epoch = self.step * self.global_batch / len(self.train_data)
            self._record(
                {**record, "total_steps": self.total_steps, "tokens_per_s": step_rate, "epoch": epoch,
                 "elapsed_s": self.elapsed}
            )  # fmt: skip
            bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{rate:.0f}", lr=f"{record['lr']:.2e}", refresh=False)
            bar.update(1)
            done = self.step == self.total_steps
            if self.val_data and (done or (self.config.eval_every and self.step % self.config.eval_every == 0)):
                ev = self._record(self.evaluate())
                line = f"step {self.step}: val loss {ev['val_loss']:.4f}, perplexity {ev['val_ppl']:.2f}"
                bar.write(line) if self.progress else self.log(line)
            if done or (self.config.save_every and self.step % self.config.save_every == 0):
                self.save_checkpoint()
        bar.close()
        if self.rank == 0:
            plot_metrics(self.history, self.out / PLOT_FILE)
        return self.history

    # -------------------------------------------------------------------------------------- logging
    def _record(self, record: dict[str, Any]) -> dict[str, Any]:
        self.history.append(record)
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            with (self.out / METRICS_FILE).open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        return record

    def _restart_metrics_log(self) -> None:
        """Keep the log's records up to the current step (all of them after a resume, none on a fresh run).

        Only rank 0 owns the file; the other processes start their history empty."""
        path = self.out / METRICS_FILE
        self.history = []
        if self.rank != 0:
            return
        if self.step > 0 and path.exists():
            rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            self.history = [r for r in rows if r["step"] <= self.step]
        self.out.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in self.history), encoding="utf-8")

    # ---------------------------------------------------------------------------------- checkpoints
    def _barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def save_checkpoint(self) -> Path:
        """Write `checkpoints/step-NNNNNN/` (see the module docstring); every process must call this."""
        final = self.out / CHECKPOINTS_DIR / f"step-{self.step:06d}"
        tmp = final.with_name(final.name + ".tmp")
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self._barrier()
        torch.save(rng_state(), tmp / f"rng-rank{self.rank}.pt")
        if self.rank == 0:
            save_adapter(self.model, tmp / "adapter", base_model_name=self.base_model_name)
            state = {
                "step": self.step,
                "elapsed_s": self.elapsed,
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler else None,
                "config": asdict(self.config),
                "global_batch": self.global_batch,
                "data_fingerprint": self.fingerprint,
            }
            torch.save(state, tmp / "trainer_state.pt")
        self._barrier()
        if self.rank == 0:
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
        self._barrier()
        return final

    def load_checkpoint(self, path: str | Path) -> None:
        """Continue from a checkpoint: same adapter, optimizer, schedule, RNG and data position."""
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / "trainer_state.pt").exists():
            raise TrainingError(f"{path} is not a training checkpoint (no trainer_state.pt)")
        state = torch.load(path / "trainer_state.pt", weights_only=True)
        if state["global_batch"] != self.global_batch:
            raise TrainingError(
                f"the checkpoint was trained with a global batch of {state['global_batch']} examples, this run has "
                f"{self.global_batch} (batch_size x grad_accum x processes); use the same to resume"
            )
        if state["data_fingerprint"] != self.fingerprint or state["config"]["seed"] != self.config.seed:
            raise TrainingError("the checkpoint was trained on other data or with another seed; use the same to resume")
        params = dict(self.model.named_parameters())
        saved = {from_peft_key(k): t for k, t in load_file(str(path / "adapter" / ADAPTER_WEIGHTS)).items()}
        if set(saved) != set(lora_state_dict(self.model)):
            raise TrainingError(f"the adapter in {path} does not fit this model's LoRA layers (rank or targets differ)")
        with torch.no_grad():
            for name, tensor in saved.items():
                params[name].copy_(tensor)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        # The schedule is this run's (a resume may raise --steps); with unchanged settings this changes nothing.
        self.scheduler.base_lrs = [self.config.lr for _ in self.optimizer.param_groups]
        factor = lr_factor(state["step"], self.config.warmup_steps, self.total_steps, self.config.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = self.config.lr * factor
        if self.scaler and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.elapsed = state["step"], state["elapsed_s"]
        rng_file = path / f"rng-rank{self.rank}.pt"
        if rng_file.exists():  # a rank the earlier run did not have starts from its seed instead
            set_rng_state(torch.load(rng_file, weights_only=True))


# --------------------------------------------------------------------------------------------- plot


def plot_metrics(history: Sequence[dict[str, Any]], path: str | Path) -> Path | None:
    """Training loss per step (raw and smoothed) and validation loss, as a PNG; None if there is nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in history if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in history if "val_loss" in r]
    if not train and not val:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    if train:
        steps, losses = zip(*train, strict=True)
        ax.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=1, label="train loss (per step)")
        w = max(1, len(losses) // 25)  # a centred running mean: a trend line that does not lag behind
        if w > 1:
            smooth = np.convolve(losses, np.ones(w) / w, mode="valid")
            ax.plot(
                steps[w // 2 : w // 2 + len(smooth)],
                smooth,
                color="tab:blue",
                linewidth=2,
                label=f"train loss (mean of {w})",
            )
    if val:
        steps, losses = zip(*val, strict=True)
        ax.plot(steps, losses, "o-", color="tab:orange", linewidth=2, label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats / target token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
