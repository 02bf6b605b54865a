"""Mini-Claude: run, serve, fine-tune, ground and study small language models on your own CPU."""

import os

# PyTorch's OpenMP threads spin after each parallel region by default. Beside our kernels' own thread pool
# that means three busy threads on a 2-core machine, and when another process holds a core, decode fell from
# ~100 to ~40 tok/s (bench/README.md). Passive waiting costs a wake-up per region instead. It must be set
# before torch is first imported (libgomp reads it then); an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
