"""Mini-Claude's own CPU kernels: a C++ extension built on the machine that runs it, with a PyTorch fallback.

Why our own: one decode step of a 135M model reads ~95 MB of weights and does little arithmetic, yet eager
PyTorch spends most of it elsewhere: its int4 kernel dequantizes every weight to float32 (instruction-bound
at a third of memory bandwidth), attention of a single query costs ~90 us a call, and a Llama block is ~200
small ops of a few microseconds each. So this extension provides, as torch custom ops
(`torch.ops.mini_claude.*`, traceable by torch.compile) and as plain functions for eager calls:

- `q4_linear` / `q8_linear`: weight-only int4 (Q4_0/Q4_1) and int8 (Q8_0) blocks of 32, for a few rows of
  activations. The activations are quantized once to int16 per row; integer dot products per block are exact
  (AVX512-VNNI `vpdpwssd`), then one float32 multiply-add per block applies its scale (and its minimum
  through the block sums of x). Layouts are made at load time by `quantize.py`.
- `decode_attention`: one query per sequence over its cached keys, in paged form (a block table per
  sequence; today's cache is the case of one block per sequence), softmax in float32.
- `rope_kv_write`, `rms_norm`, `silu_mul`: the small ops of a decode step, one call each.
- `DecodeStack`: the decode step of every block in one call, making the module loop's exact calls from C++
  (see `model.Transformer.decode_stack`).

Each has a PyTorch reference it is tested against (`tests/test_kernels.py`). The extension is compiled by
`torch.utils.cpp_extension.load` with `-O3 -march=native` into `~/.cache/mini-claude/kernels/<hash>`, the hash
covering sources, flags, the CPU's features and the torch version, so a rebuild happens only when one of
those changes; `make setup` builds it (`python -m mini_claude.kernels`). When it cannot be built (no
compiler) or is disabled (`MINI_CLAUDE_KERNELS=0`), `load()` returns None with a one-line warning and the
model runs PyTorch's own kernels.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import platform
import shutil
import sys
import sysconfig
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import torch

CSRC = Path(__file__).parent / "csrc"
SOURCES = ("ops.cpp", "lowbit.cpp", "decode.cpp", "pool.cpp", "stack.cpp")
HEADERS = ("kernels.h",)
CFLAGS = ("-O3", "-march=native", "-fopenmp", "-Wno-unused-function")
LDFLAGS = ("-fopenmp",)
NAME = "mini_claude_kernels"

_ext: ModuleType | None = None
_tried = False
_reason = ""


def _cpu_features() -> str:
    """The CPU's model and feature flags: -march=native compiles for exactly these."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    keep = [line for line in lines if line.startswith(("model name", "flags"))][:2]
    return "\n".join(keep)


def build_dir() -> Path:
    """Where this combination of sources, flags, CPU and torch is (or will be) compiled."""
    h = hashlib.sha256()
    for name in SOURCES + HEADERS:
        h.update((CSRC / name).read_bytes())
    # The sources' location and sys.prefix too: torch's build.ninja names the source paths, so two checkouts
    # (or virtual environments) sharing one directory would rebuild it in turn, each time the other loads.
    identity = (CFLAGS, LDFLAGS, torch.__version__, sys.version_info[:2], str(CSRC), sys.prefix, _cpu_features())
    h.update(repr(identity).encode())
    root = Path(os.environ.get("MINI_CLAUDE_KERNELS_DIR", Path.home() / ".cache" / "mini-claude" / "kernels"))
    return root / h.hexdigest()[:16]


def load(verbose: bool = False) -> ModuleType | None:
    """The compiled extension (building it on first use), or None if it cannot be had; never raises."""
    global _ext, _tried, _reason
    if _tried:
        return _ext
    _tried = True
    if os.environ.get("MINI_CLAUDE_KERNELS", "1").lower() in ("0", "false", "off", "no"):
        _reason = "disabled by MINI_CLAUDE_KERNELS=0"
        return None
    try:
        from torch.utils.cpp_extension import load as load_extension

        directory = build_dir()
        directory.mkdir(parents=True, exist_ok=True)
        with _build_lock(directory), _own_ninja():
            _ext = load_extension(
                name=NAME,
                sources=[str(CSRC / s) for s in SOURCES],
                extra_cflags=list(CFLAGS),
                extra_ldflags=list(LDFLAGS),
                build_directory=str(directory),
                verbose=verbose,
            )
        _register_fakes()
    except Exception as exc:  # no compiler, no ninja, a failed build: run PyTorch's kernels instead
        _ext = None
        _reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
        warnings.warn(f"mini-claude kernels unavailable ({_reason}); using PyTorch's kernels", stacklevel=2)
    return _ext


@contextlib.contextmanager
def _build_lock(directory: Path) -> Iterator[None]:
    """Serialise builds of one directory with a kernel-held lock, which dies with its process.

    torch's own guard is a `lock` file that a build creates and deletes; a build killed in between leaves it
    behind, and every later build then waits for it forever (a CI run hung here). Holding an flock on our
    own file, no other build of this directory is running, so a `lock` file found now is stale: remove it.
    """
    with open(directory / ".flock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            (directory / "lock").unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def _own_ninja() -> Iterator[None]:
    """Build with this environment's `ninja` (a dependency of the package), whatever PATH finds first.

    torch runs `ninja` from PATH, and ninja 1.12 changed the hash of commands that its log keeps: a system
    ninja 1.11 and pip's 1.13 each take the other's log for changed commands and rebuild everything. So a
    process started with the venv's bin/ on PATH (an activated venv, `mini-claude` run from a shell that has
    it) and one started as `.venv/bin/python ...` without it rebuilt the kernels in turn, minutes each time
    on two cores (the test suite paid it several times a run). Pinning one ninja per environment ends that.
    """
    scripts = sysconfig.get_path("scripts")
    ninja = shutil.which("ninja", path=scripts)
    path = os.environ.get("PATH", "")
    if ninja is None or path.split(os.pathsep)[0] == scripts:
        yield
        return
    os.environ["PATH"] = scripts + os.pathsep + path
    try:
        yield
    finally:
        os.environ["PATH"] = path


def available() -> bool:
    return load() is not None


def vectorized() -> bool:
    """Whether the kernels run vector code here (AVX-512 or AVX2), not only their portable C++."""
    ext = load()
    return ext is not None and ext.isa() != "portable"


def status() -> str:
    """One line: which kernels run here and why."""
    ext = load()
    if ext is None:
        return f"PyTorch kernels ({_reason})"
    return f"mini-claude kernels ({ext.isa()}), built in {build_dir()}"


def _register_fakes() -> None:
    """Shape-only implementations, so torch.compile and torch.export can trace through the custom ops."""
    lib = "mini_claude::"
    if getattr(_register_fakes, "done", False):
        return

    @torch.library.register_fake(lib + "q4_linear")
    def _(x, qweight, scales, mins, bias, out_features, out_dtype=None):
        return x.new_empty((*x.shape[:-1], out_features), dtype=out_dtype or x.dtype)

    @torch.library.register_fake(lib + "q8_linear")
    def _(x, qweight, scales, bias, out_features, out_dtype=None):
        return x.new_empty((*x.shape[:-1], out_features), dtype=out_dtype or x.dtype)

    @torch.library.register_fake(lib + "decode_attention")
    def _(q, k_pool, v_pool, block_tables, lengths, scale):
        return torch.empty_like(q)

    @torch.library.register_fake(lib + "rope_kv_write")
    def _(qkv, positions, cos, sin, k_pool, v_pool, block_tables, n_head, n_kv_head):
        B, T, _ = qkv.shape
        return qkv.new_empty((B, T, n_head, k_pool.shape[-1]))

    @torch.library.register_fake(lib + "rms_norm")
    def _(x, weight, eps):
        return torch.empty_like(x)

    @torch.library.register_fake(lib + "silu_mul")
    def _(gate_up):
        return gate_up.new_empty((*gate_up.shape[:-1], gate_up.shape[-1] // 2))

    _register_fakes.done = True  # type: ignore[attr-defined]
