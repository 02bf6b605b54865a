"""The package's process-wide defaults (`mini_claude/__init__.py`)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# Run in a fresh interpreter: the defaults must be in place before torch is first imported.
_HEAP_AFTER_NEW_SHAPES = """
import ctypes
import mini_claude
import torch
import torch.nn.functional as F

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
torch.manual_seed(0)
weights = [torch.randn(576, 576).bfloat16(), torch.randn(1536, 576).bfloat16()]

def prefill(lengths):
    for t in lengths:
        x = torch.randn(t, 576).bfloat16()
        for w in weights:
            F.linear(x, w)

prefill(range(1, 9))
before = libc.mallinfo2().uordblks
prefill(range(9, 309))  # 300 prompt lengths never seen before, as a server sees over a day
print((libc.mallinfo2().uordblks - before) / 2**20)
"""


def _glibc() -> bool:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallinfo2  # noqa: B018
    except (OSError, AttributeError):
        return False
    return True


@pytest.mark.skipif(not _glibc(), reason="the heap is measured with glibc's mallinfo2")
def test_matmuls_of_new_shapes_do_not_grow_the_heap_without_bound() -> None:
    """oneDNN's and ideep's per-shape caches hold ~0.4 MB each per entry for 1,024 entries unless bounded:
    without the package's defaults this grows by ~250 MB on an AVX512-BF16 CPU."""
    env = {k: v for k, v in os.environ.items() if k not in ("LRU_CACHE_CAPACITY", "ONEDNN_PRIMITIVE_CACHE_CAPACITY")}
    env["OMP_NUM_THREADS"] = "1"
    out = subprocess.run([sys.executable, "-c", _HEAP_AFTER_NEW_SHAPES], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    growth_mb = float(out.stdout.split()[-1])
    assert growth_mb < 64, f"the heap grew by {growth_mb:.0f} MB over 300 new matmul shapes"


def test_peers_run_without_our_defaults() -> None:
    import mini_claude

    env = mini_claude.peer_environment()
    for name in mini_claude._SET_BY_US:
        assert name not in env
