"""Matrix multiply: pure Python vs the same loops under numba vs numpy's BLAS, at several sizes.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python bench/bench_matmul.py
    .venv/bin/python bench/bench_matmul.py --sizes 64,128,256 --python-max 128 --reps 5

Each cell is the median wall time of `--reps` calls on float64 n x n matrices (after one untimed call, which
for numba is the JIT compilation) and the GFLOP/s it implies (2n^3 flops). numba and pure Python run on one
core by construction; BLAS runs with the thread counts in `--blas-threads` (threadpoolctl), so the 1-thread
column is the like-for-like one. Pure Python stops at `--python-max` (it needs ~10 s at n = 512).

Noise check: for every cell the CPU time of the process over the timed calls divided by wall time x threads
is printed as "CPU share"; near 1.0 means the benchmark had its cores, well below means other work took them.
Results: a table on stdout, `bench/results/matmul-<timestamp>.json` and a PNG chart beside it.

Where `OPENBLAS_CORETYPE` is set (older OpenBLAS builds need it on some CPUs), it pins OpenBLAS to an older
kernel; the script prints the kernel threadpoolctl reports, so run it with the variable unset as above.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

from mini_claude.learn.matmul import matmul_numba, matmul_python

RESULTS = Path(__file__).resolve().parent / "results"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def timed(fn: Any, reps: int, threads: int) -> dict[str, float]:
    """Median wall and CPU seconds per call over `reps` calls (one warm-up call first), and the CPU share.

    On a machine shared with other work the wall time includes the time the process waited for a core;
    the CPU time (all threads' user + system time) does not, so for one thread it is the steadier figure.
    """
    fn()
    walls, cpus = [], []
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for _ in range(reps):
        t, c = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
    share = (time.process_time() - cpu0) / ((time.perf_counter() - wall0) * threads)
    return {
        "seconds": statistics.median(walls),
        "cpu_seconds": statistics.median(cpus),
        "cpu_share": share,
        "reps": reps,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="64,128,256,512,1024")
    parser.add_argument("--python-max", type=int, default=512, help="largest n run in pure Python")
    parser.add_argument("--blas-threads", default="1,2")
    parser.add_argument("--reps", type=int, default=5, help="timed calls per cell (pure Python: at most 2)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    blas_threads = [int(t) for t in args.blas_threads.split(",")]
    blas = [
        {k: i.get(k) for k in ("internal_api", "version", "architecture", "num_threads")}
        for i in threadpool_info()
        if i.get("user_api") == "blas"
    ]
    meta = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "numpy": np.__version__,
        "numba": __import__("numba").__version__,
        "blas": blas,
        "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE"),
        "load_avg_start": os.getloadavg(),
    }
    print(f"CPU: {meta['cpu']} ({meta['cores']} cores); BLAS: {blas}; load average {meta['load_avg_start']}")
    if meta["openblas_coretype"]:
        print(f"note: OPENBLAS_CORETYPE={meta['openblas_coretype']} pins OpenBLAS's kernel; see the docstring")

    rng = np.random.default_rng(0)
    rows: list[dict[str, Any]] = []
    for n in sizes:
        a, b = rng.normal(size=(n, n)), rng.normal(size=(n, n))
        row: dict[str, Any] = {"n": n}
        if n <= args.python_max:
            al, bl = a.tolist(), b.tolist()
            row["python"] = timed(lambda al=al, bl=bl: matmul_python(al, bl), min(args.reps, 2), 1)
        row["numba"] = timed(lambda a=a, b=b: matmul_numba(a, b), args.reps, 1)
        for t in blas_threads:
            with threadpool_limits(t, user_api="blas"):
                row[f"numpy-{t}t"] = timed(lambda a=a, b=b: a @ b, args.reps, t)
        for cell in (v for v in row.values() if isinstance(v, dict)):
            cell["gflops"] = 2 * n**3 / cell["seconds"] / 1e9
            cell["gflops_cpu"] = 2 * n**3 / max(cell["cpu_seconds"], 1e-9) / 1e9  # per core-second of CPU time
        rows.append(row)
        print(f"n={n}: " + ", ".join(f"{k} {v['seconds'] * 1e3:.3g} ms" for k, v in row.items() if k != "n"))
    meta["load_avg_end"] = os.getloadavg()

    columns = ["python", "numba", *(f"numpy-{t}t" for t in blas_threads)]
    header = f"{'n':>6} " + "".join(f"{c:>22}" for c in columns) + f"{'numba/python':>14}{'BLAS-1t/numba':>15}"
    lines = [header, f"{'':>6} " + "".join(f"{'ms (GFLOP/s) share':>22}" for _ in columns)]
    for row in rows:
        cells = "".join(
            f"{row[c]['seconds'] * 1e3:>10.3g} ({row[c]['gflops']:>6.3g}) {row[c]['cpu_share']:.2f}"
            if c in row
            else f"{'-':>22}"
            for c in columns
        )
        speedup = f"{row['python']['seconds'] / row['numba']['seconds']:>13.0f}x" if "python" in row else f"{'-':>14}"
        blas1 = f"numpy-{blas_threads[0]}t"
        lines.append(f"{row['n']:>6} {cells}{speedup}{row['numba']['seconds'] / row[blas1]['seconds']:>14.1f}x")
    lines += ["", "CPU time per call, ms (GFLOP per CPU-second): what a core delivers while it runs the code"]
    lines.append(f"{'n':>6} " + "".join(f"{c:>22}" for c in columns))
    for row in rows:
        cells = "".join(
            f"{row[c]['cpu_seconds'] * 1e3:>13.3g} ({row[c]['gflops_cpu']:>6.3g})" if c in row else f"{'-':>22}"
            for c in columns
        )
        lines.append(f"{row['n']:>6} {cells}")
    table = "\n".join(lines)
    print(table)
    print(f"load average at the end {meta['load_avg_end']}")

    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (args.out / f"matmul-{stamp}.json").write_text(json.dumps({"meta": meta, "rows": rows, "table": table}, indent=2))
    chart(rows, columns, meta, args.out / f"matmul-{stamp}.png")
    print(f"wrote {args.out / f'matmul-{stamp}.json'} and .png")


def chart(rows: list[dict[str, Any]], columns: list[str], meta: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    panels = (("gflops", "wall clock: 2n³ / wall time"), ("gflops_cpu", "per CPU-second: 2n³ / CPU time"))
    for ax, (key, title) in zip(axes, panels, strict=True):
        for c in columns:
            pts = [(r["n"], r[c][key]) for r in rows if c in r]
            ax.plot(*zip(*pts, strict=True), marker="o", label=c)
        ax.set(xscale="log", yscale="log", xlabel="n (n x n float64 matrices)", title=title)
        ax.set_xticks([r["n"] for r in rows], [str(r["n"]) for r in rows])
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("GFLOP/s")
    axes[1].legend()
    load = meta["load_avg_start"][0]
    fig.suptitle(f"Matrix multiply: pure Python, numba, BLAS on {meta['cpu']} (load average {load:.1f})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
