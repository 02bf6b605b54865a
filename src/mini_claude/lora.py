"""LoRA: low-rank adapters (Hu et al., 2021), readable and interchangeable with PEFT's.

Fine-tuning every weight of a model means gradients and optimizer state for every weight. LoRA freezes the
pretrained weight W (out, in) and learns a low-rank correction instead:

    y = W x + (alpha / r) * B A x,    A: (r, in), B: (out, r), r << min(in, out)

so a layer trains r * (in + out) numbers instead of in * out. B starts at zero, so before training the
adapted model is exactly the pretrained one.

Design choices:

- `LoRALinear` *wraps* the frozen `nn.Linear` as `base_layer` instead of editing it (as PEFT does). The base
  weights are never touched unless you merge, and removing the adapter gives back the original module.
- Merging folds the update into the base weight (W' = W + scaling * B A) so inference costs nothing extra;
  `unmerge` subtracts it again. `merge(safe=True)` computes W' on a copy and refuses a non-finite result
  before the base weight is touched (an adapter that diverged must not corrupt the model).
- Module names, target matching, initialisation, scaling (`alpha / r`, or `alpha / sqrt(r)` with rsLoRA,
  Kalajdzievski 2023) and the bias modes follow PEFT, and adapters are saved in PEFT's format
  (`adapter_config.json` + `adapter_model.safetensors`, keys like
  `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`), so adapters move both ways between
  this module and `peft` on Hugging Face models. Our names are HF Llama's minus the `model.` prefix, so the
  key map is one prefix. (GPT-2's fused `c_attn` has no per-projection PEFT name; GPT-2 adapters use the
  same key scheme and round-trip through this module only.)
- Only `nn.Linear` layers are adapted; embeddings and quantized layers are refused with a clear error.
- Adapter weights of a bf16/fp16 model are kept in float32, as PEFT does by default: low-rank updates are
  small, and half precision loses them.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from mini_claude.checkpoint import build_model, save_model_dir
from mini_claude.model import Transformer
from mini_claude.tokenizer import Tokenizer

BiasMode = Literal["none", "all", "lora_only"]
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # what PeftModel puts in front of the HF model's own parameter names

# ------------------------------------------------------------------------------------------- config


@dataclass
class LoRAConfig:
    """What to adapt and how; field meanings are PEFT's `LoraConfig` ones (`alpha` is its `lora_alpha`).

    `target_modules` is either a list of module names, each matching a module whose name equals it or ends
    with `.name` (so `"q_proj"` matches every layer's query projection), or one regular expression that must
    match a whole module name, or `"all-linear"` (every Linear but the output head). Names are matched in
    our form (`layers.0.self_attn.q_proj`) and in HF's (`model.layers.0.self_attn.q_proj`), so PEFT configs
    mean the same thing here.
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    # PEFT's default for Llama-family models: adapting queries and values is the paper's main setting.
    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])
    # "none": no bias trains; "all": every bias in the model trains; "lora_only": biases of adapted layers.
    bias: BiasMode = "none"
    use_rslora: bool = False  # scale by alpha / sqrt(r), which keeps updates stable as r grows
    # True: A ~ Kaiming-uniform (as nn.Linear), B = 0. "gaussian": A ~ N(0, 1/r), B = 0. False: A and B both
    # random (the adapter changes the output from the start; used by tests).
    init_lora_weights: bool | Literal["gaussian"] = True

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"rank r must be >= 1, got {self.r}")
        if self.bias not in ("none", "all", "lora_only"):
            raise ValueError(f"bias must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.init_lora_weights not in (True, False, "gaussian"):
            raise ValueError(f"init_lora_weights must be True, False or 'gaussian', got {self.init_lora_weights!r}")
        if not isinstance(self.target_modules, str):
            self.target_modules = list(self.target_modules)

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoRAConfig:
        return cls(**data)

    def to_peft_dict(self, target_modules: list[str] | str, base_model_name: str = "") -> dict[str, Any]:
        """PEFT's `adapter_config.json` keys; features we do not implement are written as their "off" value."""
        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model_name or None,
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": target_modules,
            "bias": self.bias,
            "use_rslora": self.use_rslora,
            "init_lora_weights": self.init_lora_weights,
            "inference_mode": True,
            "fan_in_fan_out": False,
            "modules_to_save": None,
            "layers_to_transform": None,
            "layers_pattern": None,
            "rank_pattern": {},
            "alpha_pattern": {},
            "exclude_modules": None,
            "use_dora": False,
            "lora_bias": False,
            "revision": None,
        }

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any]) -> LoRAConfig:
        """Read PEFT's `adapter_config.json`; raise on features that would change the math and we lack."""
        if data.get("peft_type") != "LORA":
            raise ValueError(f"not a LoRA adapter: peft_type is {data.get('peft_type')!r}")
        unsupported = (
            "use_dora", "lora_bias", "fan_in_fan_out", "modules_to_save", "layers_to_transform", "rank_pattern",
            "alpha_pattern", "exclude_modules", "trainable_token_indices", "target_parameters", "layer_replication",
            "use_qalora", "alora_invocation_tokens", "use_bdlora",
        )  # fmt: skip
        used = [key for key in unsupported if data.get(key)]
        if used:
            raise NotImplementedError(f"adapter uses PEFT features this LoRA does not implement: {', '.join(used)}")
        init = data.get("init_lora_weights", True)
        if init not in (True, False, "gaussian"):  # e.g. PiSSA/OLoRA also rewrite the base weights
            raise NotImplementedError(f"adapter initialised with {init!r}, which changes the base model")
        if not data.get("target_modules"):
            raise ValueError("adapter_config.json names no target_modules")
        return cls(
            r=data["r"],
            alpha=data.get("lora_alpha", 8),
            dropout=data.get("lora_dropout", 0.0),
            target_modules=data["target_modules"],
            bias=data.get("bias", "none"),
            use_rslora=data.get("use_rslora", False),
            init_lora_weights=init,
        )


# -------------------------------------------------------------------------------------------- layer


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` plus a trainable low-rank update: y = base(x) + B(A(dropout(x))) * scaling."""

    def __init__(
        self,
        base_layer: nn.Linear,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init_lora_weights: bool | str = True,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.r, self.alpha = r, alpha
        self.scaling = alpha / (math.sqrt(r) if use_rslora else r)
        w = base_layer.weight
        dtype = torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype
        # PEFT's shapes: lora_A.weight (r, in), lora_B.weight (out, r).
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=w.device, dtype=dtype)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=w.device, dtype=dtype)
        self.lora_dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.enabled = True  # False: the layer computes base(x) only
        self.merged = False  # True: the update lives inside base_layer.weight
        self.reset_lora_parameters(init_lora_weights)

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def weight(self) -> Tensor:
        """The base weight (with the update in it only while merged), for code that reads `linear.weight`."""
        return self.base_layer.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base_layer.bias

    def reset_lora_parameters(self, init: bool | str = True) -> None:
        """B = 0 makes the update start at zero; A must be random, or B's gradient (which is A x) would be 0."""
        if init is False:
            return  # keep nn.Linear's own random init for both
        if init == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1 / self.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # what nn.Linear does
        nn.init.zeros_(self.lora_B.weight)

    def delta_weight(self) -> Tensor:
        """scaling * B A, the update as a dense (out, in) matrix in the base weight's dtype."""
        delta = (self.lora_B.weight @ self.lora_A.weight) * self.scaling  # (out, r) @ (r, in) -> (out, in)
        return delta.to(self.base_layer.weight.dtype)

    def forward(self, x: Tensor) -> Tensor:
        y = self.base_layer(x)  # (..., out)
        if not self.enabled or self.merged:
            return y
        h = self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype)))  # (..., r)
        return y + (self.lora_B(h) * self.scaling).to(y.dtype)

    @torch.no_grad()
    def merge(self, safe: bool = False) -> None:
        """Fold the update into the base weight. Idempotent. With `safe`, check the result before writing it."""
        if self.merged:
            return
        if not self.enabled:
            raise RuntimeError("cannot merge a disabled adapter; enable() it first")
        weight = self.base_layer.weight
        if safe:
            merged = weight + self.delta_weight()  # a copy: the base is untouched until it checks out
            if not torch.isfinite(merged).all():
                raise ValueError("merging this adapter gives non-finite weights; the base layer was left as it was")
            weight.copy_(merged)
        else:
            weight.add_(self.delta_weight())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the update again: the base weight comes back up to float rounding."""
        if not self.merged:
            return
        self.base_layer.weight.sub_(self.delta_weight())
        self.merged = False

    def enable(self) -> None:
        self.enabled = True

    def disable(self) -> None:
        """Compute base(x) only. A merged update is taken out of the weight first, so this always holds."""
        self.unmerge()
        self.enabled = False

    def extra_repr(self) -> str:
        state = ("merged" if self.merged else "enabled") if self.enabled else "disabled"
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, {state}"


# ------------------------------------------------------------------------------------ whole models


def hf_module_name(name: str) -> str:
    """Our module name as it is inside a Hugging Face `*ForCausalLM`: the body sits under `model.`."""
    return name if name == "lm_head" or name.startswith("lm_head.") else f"model.{name}"


def _matches(name: str, targets: Sequence[str] | str) -> bool:
    """PEFT's rule, applied to both our name and HF's: a regex must match a whole name; list entries match a
    name exactly or as its last dotted components."""
    names = (name, hf_module_name(name))
    if isinstance(targets, str):
        return any(re.fullmatch(targets, n) for n in names)
    return any(n == t or n.endswith(f".{t}") for n in names for t in targets)


def _modules_outside_adapters(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """named_modules() without the root and without looking inside LoRA layers (their parts are not targets)."""
    inside: str | None = None
    for name, module in model.named_modules():
        if not name or (inside is not None and name.startswith(inside)):
            continue
        yield name, module
        if isinstance(module, LoRALinear):
            inside = f"{name}."


def find_targets(model: nn.Module, target_modules: Sequence[str] | str) -> dict[str, nn.Module]:
    """The modules `target_modules` selects, by name (LoRA layers count as the Linear they wrap)."""
    if target_modules == "all-linear":
        modules = _modules_outside_adapters(model)
        found = {n: m for n, m in modules if isinstance(m, nn.Linear | LoRALinear) and n != "lm_head"}
    else:
        found = {n: m for n, m in _modules_outside_adapters(model) if _matches(n, target_modules)}
    if not found:
        linears = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"target_modules {target_modules!r} match no module (Linear names: {', '.join(linears)})")
    return found


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def apply_lora(model: nn.Module, config: LoRAConfig) -> nn.Module:
    """Wrap the target Linears in `LoRALinear`, freeze everything but the adapters (and biases per
    `config.bias`), remember `config` as `model.lora_config`, and return the model (changed in place).

    A target whose weight is shared (an `lm_head` tied to the embeddings) gets its own copy first, so that
    merging the head's update cannot change the embeddings; the model's config then says untied.
    """
    if lora_layers(model):
        raise ValueError("the model already has LoRA layers; remove_lora() it first")
    targets = find_targets(model, config.target_modules)
    for name, module in targets.items():
        if type(module) is not nn.Linear:
            raise TypeError(f"LoRA adapts nn.Linear layers only; {name} is a {type(module).__name__}")
    owners = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    for name, linear in targets.items():
        if owners[id(linear.weight)] > 1:
            linear.weight = nn.Parameter(linear.weight.detach().clone())
            if isinstance(model, Transformer) and name == "lm_head":
                model.config = model.config.replace(tie_embeddings=False)
        lora = LoRALinear(linear, config.r, config.alpha, config.dropout, config.use_rslora, config.init_lora_weights)
        lora.train(linear.training)  # a new adapter follows its layer: eval-mode models stay deterministic
        _set_submodule(model, name, lora)

    model.requires_grad_(False)
    for lora in lora_layers(model).values():
        lora.lora_A.weight.requires_grad_(True)
        lora.lora_B.weight.requires_grad_(True)
        if config.bias == "lora_only" and lora.base_layer.bias is not None:
            lora.base_layer.bias.requires_grad_(True)
    if config.bias == "all":
        for name, p in model.named_parameters():
            if name == "bias" or name.endswith(".bias"):
                p.requires_grad_(True)
    model.lora_config = config
    return model


def lora_config_of(model: nn.Module) -> LoRAConfig:
    config = getattr(model, "lora_config", None)
    if not isinstance(config, LoRAConfig):
        raise ValueError("the model has no LoRA adapter (use apply_lora or load_adapter)")
    return config


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapter's tensors by our parameter names: every lora_A/lora_B, plus the biases `config.bias`
    trains (PEFT saves exactly these)."""
    config = lora_config_of(model)
    state: dict[str, Tensor] = {}
    for name, lora in lora_layers(model).items():
        state[f"{name}.lora_A.weight"] = lora.lora_A.weight.detach()
        state[f"{name}.lora_B.weight"] = lora.lora_B.weight.detach()
        if config.bias == "lora_only" and lora.base_layer.bias is not None:
            state[f"{name}.base_layer.bias"] = lora.base_layer.bias.detach()
    if config.bias == "all":
        for name, p in model.named_parameters():
            if name == "bias" or name.endswith(".bias"):
                state[name] = p.detach()
    return state


def merge_lora(model: nn.Module, safe: bool = False) -> nn.Module:
    """Merge every enabled adapter into its base weight (disabled ones stay out)."""
    for lora in lora_layers(model).values():
        if lora.enabled:
            lora.merge(safe)
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    for lora in lora_layers(model).values():
        lora.unmerge()
    return model


def set_lora_enabled(model: nn.Module, enabled: bool) -> nn.Module:
    """Switch every adapter on or off, e.g. to compare with the base model without a copy of it."""
    for lora in lora_layers(model).values():
        lora.enable() if enabled else lora.disable()
    return model


def remove_lora(model: nn.Module, merge: bool = True, safe: bool = False) -> nn.Module:
    """Put the plain Linears back. With `merge`, enabled updates are folded in first, so the returned model
    computes what the adapted one did; without, the base weights come back as they were. Parameters keep
    the frozen flags `apply_lora` gave them (as PEFT's `merge_and_unload`)."""
    for name, lora in lora_layers(model).items():
        if merge and lora.enabled:
            lora.merge(safe)
        else:
            lora.unmerge()
        _set_submodule(model, name, lora.base_layer)
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model


def merged_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The plain model's state dict with enabled updates folded in, computed without changing `model`."""
    state = model.state_dict()
    for name, lora in lora_layers(model).items():
        del state[f"{name}.lora_A.weight"], state[f"{name}.lora_B.weight"]
        weight = state.pop(f"{name}.base_layer.weight")
        if lora.enabled and not lora.merged:
            weight = weight + lora.delta_weight().detach()
        state[f"{name}.weight"] = weight
        if f"{name}.base_layer.bias" in state:
            state[f"{name}.bias"] = state.pop(f"{name}.base_layer.bias")
    return state


# ----------------------------------------------------------------------------------- PEFT-format io


def to_peft_key(name: str) -> str:
    """`layers.0.self_attn.q_proj.lora_A.weight` -> `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`."""
    return PEFT_PREFIX + hf_module_name(name)


def from_peft_key(key: str) -> str:
    return key.removeprefix(PEFT_PREFIX).removeprefix("model.")


def save_adapter(
    model: nn.Module, path: str | Path, config: LoRAConfig | None = None, base_model_name: str = ""
) -> Path:
    """Write PEFT's adapter dir: `adapter_config.json` and the adapter tensors alone in `adapter_model.safetensors`.

    A regex `target_modules` is written as the list of HF names it selected, since PEFT matches regexes
    against HF names only.
    """
    from safetensors.torch import save_file

    config = config or lora_config_of(model)
    layers = lora_layers(model)
    for name, lora in layers.items():
        if lora.r != config.r or not math.isclose(lora.scaling, config.scaling):
            raise ValueError(f"{name} has r={lora.r}, scaling={lora.scaling:g}; the config says otherwise")
    targets = config.target_modules
    if isinstance(targets, str) and targets != "all-linear":
        targets = sorted(hf_module_name(name) for name in layers)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / ADAPTER_CONFIG).write_text(json.dumps(config.to_peft_dict(targets, base_model_name), indent=2))
    tensors = {to_peft_key(k): v.contiguous() for k, v in lora_state_dict(model).items()}
    save_file(tensors, str(path / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return path


def read_adapter_files(path: str | Path) -> tuple[LoRAConfig, dict[str, Tensor], dict[str, Any]]:
    """The config, the tensors by our parameter names, and the raw `adapter_config.json` of a PEFT-format dir.

    Raises FileNotFoundError without both files, ValueError (json.JSONDecodeError included) or
    NotImplementedError for a config we cannot honour, and safetensors' error for an unreadable weights file.
    """
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / ADAPTER_CONFIG).exists() or not (path / ADAPTER_WEIGHTS).exists():
        raise FileNotFoundError(f"{path} needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
    raw = json.loads((path / ADAPTER_CONFIG).read_text())
    config = LoRAConfig.from_peft_dict(raw)
    tensors = {from_peft_key(k): t for k, t in load_file(str(path / ADAPTER_WEIGHTS)).items()}
    return config, tensors, raw


def load_adapter(model: nn.Module, path: str | Path) -> nn.Module:
    """Apply the adapter in a PEFT-format dir (written here or by `peft`) to a model without one.

    Besides lora_A/lora_B (and biases), PEFT may store whole base weights of "embedding layers" it saw in
    the targets (e.g. `lm_head.base_layer.weight`); like PEFT, we load those into the base model.
    """
    path = Path(path)
    config, tensors, _ = read_adapter_files(path)
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    apply_lora(model, config)
    expected = lora_state_dict(model)
    params = dict(model.named_parameters(remove_duplicate=False))
    problems = [f"missing {k}" for k in sorted(set(expected) - set(tensors))]
    problems += [f"unexpected {k}" for k in sorted(set(tensors) - set(expected) - set(params))]
    problems += [
        f"{k} is {tuple(t.shape)} in the adapter, {tuple(params[k].shape)} in the model"
        for k, t in tensors.items()
        if k in params and t.shape != params[k].shape
    ]
    if problems:  # leave the model as it came (up to an untied head, which computes the same)
        remove_lora(model, merge=False)
        for n, p in model.named_parameters():
            p.requires_grad_(requires_grad.get(n, True))
        raise ValueError(f"{path} does not fit this model: {'; '.join(problems[:4])}")
    with torch.no_grad():
        for name, t in tensors.items():
            params[name].copy_(t)
    return model


def export_merged(model: nn.Module, tokenizer: Tokenizer, path: str | Path, name: str = "") -> Path:
    """Write the adapted model as a plain model dir (`save_model_dir`), updates folded in.

    The merged weights are computed on copies, so `model` keeps its adapters and is not changed.
    """
    if not isinstance(model, Transformer):
        raise TypeError("export_merged writes mini_claude Transformer models")
    plain = build_model(model.config, merged_state_dict(model))
    return save_model_dir(path, plain, tokenizer, name)
