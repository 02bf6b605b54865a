"""`python -m mini_claude.kernels`: build the C++ kernels now (make setup runs it) and say which ones run."""

from __future__ import annotations

import sys
import time

from mini_claude import kernels


def main() -> int:
    start = time.perf_counter()
    kernels.load(verbose="-v" in sys.argv)
    print(f"{kernels.status()} ({time.perf_counter() - start:.1f} s)")
    return 0  # a missing compiler is not an install failure: the model then runs PyTorch's kernels


if __name__ == "__main__":
    sys.exit(main())
