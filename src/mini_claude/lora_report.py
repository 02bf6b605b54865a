"""How much of a model LoRA trains (`lora.py`): parameters and bytes per adapted layer, the optimizer state
saved, and the largest rank that fits a parameter budget.

Why a report: LoRA's point is the parameters it does not train. `mini-claude finetune` prints the last lines
(trainable share, how many times fewer than full fine-tuning, Adam state); the table shows where they go.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from mini_claude.lora import find_targets, lora_layers


@dataclass
class LayerParams:
    name: str
    in_features: int
    out_features: int
    r: int

    @property
    def base_params(self) -> int:
        return self.in_features * self.out_features

    @property
    def lora_params(self) -> int:
        return self.r * (self.in_features + self.out_features)


@dataclass
class ParameterReport:
    """How much of the model trains. Counts tied weights once and includes the adapters in `total`."""

    trainable: int
    total: int
    trainable_bytes: int
    total_bytes: int
    layers: list[LayerParams]

    @property
    def trainable_fraction(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    @property
    def reduction(self) -> float:
        """How many times fewer parameters train than in full fine-tuning."""
        return self.total / self.trainable if self.trainable else math.inf

    def __str__(self) -> str:
        width = max([len("layer"), *(len(row.name) for row in self.layers)])
        lines = [f"{'layer':<{width}}  {'shape':>12}  {'r':>4}  {'base':>10}  {'LoRA':>8}  {'LoRA %':>7}"]
        for row in self.layers:
            shape = f"{row.out_features}x{row.in_features}"
            pct = 100 * row.lora_params / row.base_params
            lines.append(
                f"{row.name:<{width}}  {shape:>12}  {row.r:>4}  {row.base_params:>10,}  {row.lora_params:>8,}  "
                f"{pct:>6.2f}%"
            )
        mib = 2**20
        # Adam keeps two float32 moments per trainable parameter: the memory LoRA saves beyond gradients.
        lines += [
            f"trainable {self.trainable:,} of {self.total:,} parameters ({100 * self.trainable_fraction:.3f}%), "
            f"{self.reduction:,.1f}x fewer than full fine-tuning",
            f"trainable {self.trainable_bytes / mib:.2f} MiB of {self.total_bytes / mib:.2f} MiB; Adam state "
            f"{8 * self.trainable / mib:.2f} MiB instead of {8 * self.total / mib:.2f} MiB",
        ]
        return "\n".join(lines)


def parameter_report(model: nn.Module) -> ParameterReport:
    params = list(model.parameters())  # shared (tied) parameters appear once
    trainable = [p for p in params if p.requires_grad]
    layers = [LayerParams(n, m.in_features, m.out_features, m.r) for n, m in lora_layers(model).items()]
    return ParameterReport(
        trainable=sum(p.numel() for p in trainable),
        total=sum(p.numel() for p in params),
        trainable_bytes=sum(p.numel() * p.element_size() for p in trainable),
        total_bytes=sum(p.numel() * p.element_size() for p in params),
        layers=layers,
    )


def rank_for_budget(model: nn.Module, target_modules: Sequence[str] | str, budget_params: int) -> int:
    """The largest r whose adapters on `target_modules` hold at most `budget_params` parameters.

    Each rank costs in + out per adapted layer. r is capped at the smallest min(in, out) of those layers,
    beyond which B A is no longer low-rank and a larger r adds parameters but no expressiveness.
    """
    targets = find_targets(model, target_modules)
    per_rank = sum(m.in_features + m.out_features for m in targets.values())
    r = budget_params // per_rank
    if r < 1:
        raise ValueError(f"a budget of {budget_params:,} parameters is below rank 1 ({per_rank:,} parameters)")
    return min(r, min(min(m.in_features, m.out_features) for m in targets.values()))
