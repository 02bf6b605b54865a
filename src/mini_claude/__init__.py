"""Mini-Claude: run, serve, fine-tune, ground and study small language models on your own CPU."""

import os

# PyTorch's OpenMP threads spin after each parallel region by default. Beside our kernels' own thread pool
# that means three busy threads on a 2-core machine, and when another process holds a core, decode fell from
# ~100 to ~40 tok/s (bench/README.md). Passive waiting costs a wake-up per region instead. It must be set
# before torch is first imported (libgomp reads it then); an explicit setting wins.
#
# A bf16 matmul goes through oneDNN, and two caches keep one entry per (input shape, weight shape), 1,024 each
# by default: ideep's op cache (LRU_CACHE_CAPACITY) and oneDNN's primitive cache. An entry holds ~0.4 MB of
# heap for this model's layers, and a server prefills prompts of every length, so both filled up over a soak:
# +500 MB of live heap for 300 new prompt lengths (bench/README.md, "Soak"), a high-water mark never returned.
# 64 entries keep the repeated shapes (decode batches, common prompt lengths) and bound the rest.
_OURS = {"OMP_WAIT_POLICY": "PASSIVE", "LRU_CACHE_CAPACITY": "64", "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "64"}
_SET_BY_US = [name for name in _OURS if name not in os.environ]
for _name in _SET_BY_US:
    os.environ[_name] = _OURS[_name]


def peer_environment() -> dict[str, str]:
    """This process's environment without the defaults set above: for other programs started from here
    (llama.cpp's tools in the benchmarks), which must run with their own defaults to be measured fairly."""
    env = dict(os.environ)
    for name in _SET_BY_US:
        env.pop(name, None)
    return env
