"""Serving LoRA adapters: many adapters on one frozen base model, chosen per sequence of a batch.

Training wraps `nn.Linear` layers in `lora.LoRALinear`: one adapter, trainable, mergeable. Serving asks for
something else:

- The base weights may be int4 or int8 (`quantize.py`). An update merged into them would have to be
  re-quantized, and a rank-8 update is far below int4's rounding step: it would mostly vanish.
- One decode batch holds sequences for different adapters and for the plain base model. Merging cannot
  serve that; adding each row's own low-rank term can (the idea of S-LoRA and Punica, Sheng et al. and
  Chen et al., 2023): the expensive base matmul is shared by every row, and row i then adds
  `scaling_k * B_k (A_k x_i)` for its adapter k, which costs r * (in + out) per token instead of in * out.

So `AdapterLinear` wraps any linear layer (nn.Linear, Int8Linear, Int4Linear) with a table of low-rank
updates, and `AdapterSet` owns those layers for one model: it loads PEFT-format adapter dirs (written by
`mini-claude finetune`, by `lora.save_adapter` or by `peft`) into them, and `route()` tells every wrapped
layer which rows of the next forward use which adapter. A layer no adapter touches stays unwrapped, and a
batch routed to no adapter computes exactly the base model.

Adapters are added while a server runs: `load()` reads and checks the files first (a bad dir changes
nothing), then installs under the same lock `route()` holds for a forward, so a new adapter never appears
halfway through one.
"""

from __future__ import annotations

import itertools
import json
import re
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from mini_claude.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, LoRAConfig, read_adapter_files

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}")


class AdapterError(ValueError):
    """An adapter that cannot be loaded or used here: a user error, with a message that says why."""


@dataclass(frozen=True)
class AdapterInfo:
    """What a loaded adapter is, as `/v1/models` and `mini-claude models` report it."""

    name: str
    path: str
    rank: int
    alpha: float
    scaling: float
    modules: tuple[str, ...]  # our module names, e.g. layers.0.self_attn.q_proj
    parameters: int
    base_model: str | None  # what the adapter says it was trained on (PEFT's base_model_name_or_path)

    @property
    def targets(self) -> list[str]:
        """The distinct projection names adapted, e.g. ['q_proj', 'v_proj']."""
        return sorted({m.rsplit(".", 1)[-1] for m in self.modules})


@dataclass
class _Route:
    """Which adapters the rows of the current forward use: one for every row (`adapter`), or, for a batch
    that mixes them, (adapter id, row mask) pairs (`groups`). Neither set: the base model alone."""

    adapter: int | None = None
    groups: tuple[tuple[int, Tensor], ...] = ()  # mask: (B, 1, 1) bool, True for the adapter's rows
    # The rows that reach the layers after the model keeps only some rows (its `logits_rows`): the output head
    # sees fewer rows than the blocks, and picks its masks' rows with this.
    rows: Tensor | None = None


class AdapterLinear(nn.Module):
    """A frozen linear layer plus per-row low-rank updates: y_i = base(x_i) + s_k B_k A_k x_i for row i's k.

    The updates live in a plain dict (adapter id -> (A, (s B)ᵀ)), not as parameters: they are inference state
    that comes and goes while the model runs, and must never be trained or saved with the model. The scaling
    is folded into B, so a batch that uses one adapter costs two small matmuls per layer and an add. They stay
    float32 even under a bf16 model, as in training, and for speed: on a CPU, a (1 x 576) @ (576 x 8) matmul
    takes about 5 us in float32 and about 45 us in bf16 (oneDNN's per-call overhead), and a decode step makes
    hundreds of them. A batch that mixes adapters computes each adapter's update for every row and masks out
    the rows that did not ask for it: the wasted arithmetic is r * (in + out) per row, far cheaper than
    gathering rows or per-row weight copies.
    """

    def __init__(self, base_layer: nn.Module, route: _Route) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.route = route  # shared by every AdapterLinear of the model; AdapterSet.route() fills it
        self.updates: dict[int, tuple[Tensor, Tensor]] = {}  # id -> A (r, in), (scaling * B)ᵀ (r, out)

    @property
    def in_features(self) -> int:
        return int(self.base_layer.in_features)

    @property
    def out_features(self) -> int:
        return int(self.base_layer.out_features)

    def forward(self, x: Tensor) -> Tensor:
        y = self.base_layer(x)  # (B, T, out)
        route = self.route
        if route.adapter is not None:
            update = self.updates.get(route.adapter)
            if update is None:  # this adapter does not touch this layer
                return y
            a, bt = update
            h = torch.mm(x.reshape(-1, a.shape[1]).to(a.dtype), a.t())  # (B*T, r)
            return y + torch.mm(h, bt).view_as(y).to(y.dtype)
        delta = None
        for adapter, mask in route.groups:
            if (update := self.updates.get(adapter)) is not None:
                a, bt = update
                if mask.shape[0] != x.shape[0] and route.rows is not None:
                    mask = mask[route.rows]
                d = torch.matmul(torch.matmul(x.to(a.dtype), a.t()), bt)  # (B, T, out)
                # zero off its rows by selection, not by a product: a NaN or inf of one adapter stays in its rows
                d = torch.where(mask, d, 0.0)
                delta = d if delta is None else delta + d
        return y if delta is None else y + delta.to(y.dtype)

    def extra_repr(self) -> str:
        return f"adapters={sorted(self.updates)}"


class AdapterSet:
    """The adapters loaded on one model, by name; see the module docstring."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._route = _Route()
        self._ids: dict[str, int] = {}
        self._info: dict[str, AdapterInfo] = {}
        self._loads = itertools.count(1)
        self.version = 0  # changes whenever an adapter is loaded or removed (caches of outputs check it)
        self._lock = threading.Lock()

    def __contains__(self, name: object) -> bool:
        return name in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    @property
    def names(self) -> list[str]:
        return list(self._ids)

    def info(self, name: str) -> AdapterInfo:
        if name not in self._info:
            raise AdapterError(f"no adapter named {name!r} is loaded (loaded: {', '.join(self._ids) or 'none'})")
        return self._info[name]

    def check(self, name: str | None) -> None:
        """Raise `AdapterError` unless `name` is None (the base model) or a loaded adapter."""
        if name is not None:
            self.info(name)

    def uid(self, name: str) -> int:
        """A number for this load of adapter `name`, never given to another load (a new adapter under an old name
        gets a new one): what caches of keys and values are keyed by."""
        self.info(name)
        return self._ids[name]

    # ---------------------------------------------------------------------------------------- loading
    def load(self, path: str | Path, name: str | None = None, reserved: Sequence[str] = ()) -> AdapterInfo:
        """Load the PEFT-format adapter in `path` under `name` (default: the dir's name, or its parent's name
        when the dir is a fine-tuning run's `adapter/`). `reserved` are names it may not take (the base model).
        """
        path = Path(path).expanduser()
        name = name or default_adapter_name(path)
        if not NAME_PATTERN.fullmatch(name):
            raise AdapterError(f"adapter name {name!r} must be 1-128 letters, digits or ._:/@+- (no spaces)")
        if name in self._ids or name in reserved:
            raise AdapterError(f"the name {name!r} is already taken; give the adapter another name")
        config, tensors, base_model = read_adapter(path)
        layers = self._check_fit(path, tensors)
        scaling = config.scaling
        device = self._device()
        updates = {  # A (r, in) and (scaling * B)ᵀ (r, out), float32 (see AdapterLinear)
            module: (a.to(device, torch.float32).contiguous(), (b.float() * scaling).t().to(device).contiguous())
            for module, (a, b) in layers.items()
        }
        with self._lock:
            adapter_id = next(self._loads)  # never reused, so a removed adapter's rows cannot reach a new one
            for module, (a, bt) in updates.items():
                self._wrapped(module).updates[adapter_id] = (a, bt)
            info = AdapterInfo(
                name=name, path=str(path), rank=config.r, alpha=config.alpha, scaling=scaling,
                modules=tuple(sorted(layers)), parameters=sum(a.numel() + b.numel() for a, b in updates.values()),
                base_model=base_model,
            )  # fmt: skip
            self._ids[name], self._info[name] = adapter_id, info
            self.version += 1
        return info

    def unload(self, name: str) -> None:
        """Remove adapter `name`: its updates leave every layer (under the lock, so never mid-forward). Sequences
        still running with it end with an error at their next step; new ones cannot ask for it."""
        with self._lock:
            adapter_id = self._ids.pop(self.info(name).name)
            del self._info[name]
            for module in self.model.modules():
                if isinstance(module, AdapterLinear):
                    module.updates.pop(adapter_id, None)
            self.version += 1

    def _check_fit(self, path: Path, tensors: dict[str, Tensor]) -> dict[str, tuple[Tensor, Tensor]]:
        """Pair lora_A/lora_B by module and check each against the model's layer; all problems in one message."""
        found: dict[str, dict[str, Tensor]] = {}
        problems = []
        modules = dict(self.model.named_modules())
        for key, tensor in tensors.items():
            module, _, kind = key.rpartition(".lora_")
            if key.endswith(".base_layer.weight"):  # PEFT's copy of a targeted head's base weight
                problem = self._check_base_copy(key.removesuffix(".base_layer.weight"), tensor, modules)
                problems += [problem] if problem else []
            elif kind not in ("A.weight", "B.weight"):
                problems.append(f"unexpected tensor {key} (only lora_A/lora_B weights can be served side by side)")
            else:
                found.setdefault(module, {})[kind[0]] = tensor
        pairs: dict[str, tuple[Tensor, Tensor]] = {}
        for module, parts in sorted(found.items()):
            layer = modules.get(module)
            if layer is None:
                problems.append(f"the model has no layer {module}")
            elif not hasattr(layer, "in_features") or not hasattr(layer, "out_features"):
                problems.append(f"{module} is a {type(layer).__name__}, not a linear layer")
            elif set(parts) != {"A", "B"}:
                problems.append(f"{module} has lora_{''.join(parts)} but not both lora_A and lora_B")
            else:
                a, b = parts["A"], parts["B"]
                want_a, want_b = (a.shape[0], layer.in_features), (layer.out_features, a.shape[0])
                if a.dim() != 2 or b.dim() != 2 or tuple(a.shape) != want_a or tuple(b.shape) != want_b:
                    problems.append(
                        f"{module}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not fit a "
                        f"{layer.out_features}x{layer.in_features} layer"
                    )
                else:
                    pairs[module] = (a, b)
        if not found and not problems:
            problems.append("it holds no lora_A/lora_B tensors")
        if problems:
            more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
            raise AdapterError(f"the adapter in {path} does not fit this model: {'; '.join(problems[:3])}{more}")
        return pairs

    def _check_base_copy(self, module: str, weight: Tensor, modules: dict[str, nn.Module]) -> str | None:
        """PEFT saves the base weight of a targeted output head or embedding next to its adapter (in case the
        vocabulary was resized). A copy of our own weight is harmless; a different one would need the base
        model changed for every request, so it is refused."""
        layer = modules.get(module)
        if layer is None:
            return f"the model has no layer {module}"
        shape = (getattr(layer, "out_features", None), getattr(layer, "in_features", None))
        if tuple(weight.shape) != shape:
            return (
                f"{module}'s saved base weight is {tuple(weight.shape)}, the model's is {shape} (resized vocabulary?)"
            )
        reference = getattr(layer, "weight", None)
        if not isinstance(reference, Tensor) and getattr(getattr(self.model, "config", None), "tie_embeddings", False):
            reference = getattr(getattr(self.model, "embed_tokens", None), "weight", None)  # a quantized tied head
        if isinstance(reference, Tensor) and reference.is_floating_point() and reference.shape == weight.shape:
            error = (reference.float() - weight.float()).abs().max()
            if error > 1e-2 * reference.float().abs().max():  # allows for bf16 rounding, not for other weights
                return f"{module}'s saved base weight differs from this model's: the adapter was made for another model"
        return None

    def _device(self) -> torch.device:
        """Where the model computes (its embeddings' device): the updates and row masks live there too."""
        embeddings = getattr(self.model, "embed_tokens", None)
        weight = getattr(embeddings, "weight", None)
        return weight.device if isinstance(weight, Tensor) else next(self.model.parameters()).device

    def _wrapped(self, module: str) -> AdapterLinear:
        """The AdapterLinear at `module`, wrapping the layer there first if no adapter has touched it yet."""
        layer = self.model.get_submodule(module)
        if isinstance(layer, AdapterLinear):
            return layer
        wrapper = AdapterLinear(layer, self._route)
        parent, _, child = module.rpartition(".")
        setattr(self.model.get_submodule(parent) if parent else self.model, child, wrapper)
        return wrapper

    # ---------------------------------------------------------------------------------------- routing
    @contextmanager
    def route(self, adapters: Sequence[str | None], rows: Tensor | None = None) -> Iterator[None]:
        """Within this block, row i of the model's input uses adapter `adapters[i]` (None: the base model);
        `rows` are the rows the model keeps for its output head, if it keeps only some (`logits_rows`).

        Holds the set's lock, so loading waits for the forward to finish (and the reverse).
        """
        with self._lock:
            ids = [None if a is None else self._ids.get(a, -1) for a in adapters]
            if -1 in ids:
                unknown = sorted({a for a, i in zip(adapters, ids, strict=True) if i == -1})  # type: ignore[type-var]
                raise AdapterError(f"no adapter named {', '.join(map(repr, unknown))} is loaded")
            if ids and all(i == ids[0] for i in ids):
                self._route.adapter = ids[0]  # None: the base model for every row
            else:
                device = self._device()
                self._route.groups = tuple(
                    (k, torch.tensor([i == k for i in ids], device=device).view(-1, 1, 1))
                    for k in sorted({i for i in ids if i is not None})
                )
            self._route.rows = rows
            try:
                yield
            finally:
                self._route.adapter, self._route.groups, self._route.rows = None, (), None


def parse_adapter_spec(spec: str) -> tuple[str | None, str]:
    """`NAME=DIR` -> (NAME, DIR); a plain `DIR` -> (None, DIR), and the adapter takes the dir's name."""
    name, eq, path = spec.partition("=")
    if eq and name and "/" not in name and not Path(spec).exists():
        return name, path
    return None, spec


def default_adapter_name(path: Path) -> str:
    """`runs/support-bot/adapter` -> `support-bot`; any other dir -> its own name."""
    path = path.resolve()
    return path.parent.name if path.name == "adapter" and path.parent.name else path.name


def read_adapter(path: Path) -> tuple[LoRAConfig, dict[str, Tensor], str | None]:
    """The config, tensors (by our module names) and stated base model of a PEFT-format adapter dir, read by
    `lora.read_adapter_files`; refuses, with the reason, what cannot be read or served."""
    from safetensors import SafetensorError

    if not path.is_dir():
        raise AdapterError(f"adapter dir not found: {path}")
    missing = [f for f in (ADAPTER_CONFIG, ADAPTER_WEIGHTS) if not (path / f).is_file()]
    if missing:
        raise AdapterError(f"{path} is not an adapter dir: it lacks {' and '.join(missing)}")
    try:
        config, tensors, raw = read_adapter_files(path)
    except json.JSONDecodeError as exc:
        raise AdapterError(f"{path / ADAPTER_CONFIG} is not valid JSON: {exc}") from None
    except (SafetensorError, OSError) as exc:
        raise AdapterError(f"{path / ADAPTER_WEIGHTS} cannot be read: {exc}") from None
    except (KeyError, TypeError, ValueError, NotImplementedError) as exc:
        raise AdapterError(f"{path / ADAPTER_CONFIG}: {exc}") from None
    if config.bias != "none":
        raise AdapterError(
            f"{path} trains biases (bias={config.bias!r}), which change the base model for every request; serve a "
            "merged model instead (lora.export_merged)"
        )
    return config, tensors, raw.get("base_model_name_or_path") or None
