"""Mini-Claude: run, serve, fine-tune, ground and study small language models on your own CPU."""

import os

# PyTorch's OpenMP threads spin after each parallel region by default. Beside our kernels' own thread pool
# that means three busy threads on a 2-core machine, and when another process holds a core, decode fell from
# ~100 to ~40 tok/s (bench/README.md). Passive waiting costs a wake-up per region instead. It must be set
# before torch is first imported (libgomp reads it then); an explicit setting wins.
_OMP_WAIT_POLICY_IS_OURS = "OMP_WAIT_POLICY" not in os.environ
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def peer_environment() -> dict[str, str]:
    """This process's environment without the OpenMP default set above: for other programs started from here
    (llama.cpp's tools in the benchmarks), which must run with their own defaults to be measured fairly."""
    env = dict(os.environ)
    if _OMP_WAIT_POLICY_IS_OURS:
        env.pop("OMP_WAIT_POLICY", None)
    return env
