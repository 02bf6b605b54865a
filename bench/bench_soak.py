"""Soak benchmark: N clients abuse a real `mini-claude serve` for M minutes; nothing may break or leak.

Run `python bench/bench_soak.py` (defaults: 32 clients, 5 minutes, the bundled model; see bench/README.md).

Design choices:
- The server is a real process started here (its own SQLite file in the work dir), driven over HTTP. Each
  client keeps one conversation with server-side memory (`conversation_id`) and loops: 10% of its requests
  are invalid (bad JSON, out-of-range fields, an unknown model or conversation: each must be a 4xx), the rest
  are chat turns, half streamed; 20% of the streamed ones disconnect after their first content chunk.
- Reported: requests by status class, 5xx (must be 0), cancellations the server counted (`/metrics`,
  `mini_claude_sequences_total{finish_reason="cancelled"}`), time to first token p50/p95 of streamed turns,
  resident memory after a warm-up and at the end (growth must stay under 10%), and the check that every
  stored conversation equals what its client saw: the user turns in order, each finished reply exactly, and
  each cut-off reply either absent or stored as a prefix-extension of what the client read (the server keeps
  generating until it notices the disconnect, so it may have more than was read, never something else).
- Sampling is seeded per request, so a run can be repeated; the load itself is what a busy day looks like.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

CHAT = "/v1/chat/completions"
INVALID = [  # (body or raw bytes) that must each get a 4xx
    b'{"messages": [{"role": "user", "content": "unterminated',
    {"messages": [{"role": "user", "content": "hi"}], "temperature": 7},
    {"messages": [{"role": "user", "content": "hi"}], "model": "no-such-model"},
    {"messages": [], "max_tokens": 4},
    {"messages": [{"role": "user", "content": "hi"}], "conversation_id": "00000000-0000-4000-8000-000000000000"},
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resident_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS")) / 1024


def cancelled_sequences(url: str) -> float:
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line.startswith("mini_claude_sequences_total{") and 'finish_reason="cancelled"' in line:
            return float(line.split()[-1])
    return 0.0


@dataclass
class Turn:
    user: str
    reply: str
    complete: bool


@dataclass
class Stats:
    statuses: dict[int, int] = field(default_factory=dict)
    ttft: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    disconnects: int = 0

    def count(self, status: int) -> None:
        self.statuses[status] = self.statuses.get(status, 0) + 1


async def chat_turn(
    client: httpx.AsyncClient, body: dict[str, Any], stream: bool, disconnect: bool, stats: Stats
) -> tuple[str, bool, str] | None:
    """Send one turn; (text seen, whether it finished, conversation id), or None if the server refused it."""
    if not stream:
        response = await client.post(CHAT, json=body)
        stats.count(response.status_code)
        if response.status_code != 200:
            stats.errors.append(response.text[:200])
            return None
        reply = response.json()
        return reply["choices"][0]["message"]["content"], True, reply["conversation_id"]
    start, text, done = time.perf_counter(), [], False
    async with client.stream("POST", CHAT, json={**body, "stream": True}) as response:
        stats.count(response.status_code)
        conversation_id = response.headers.get("x-conversation-id", "")
        if response.status_code != 200:
            stats.errors.append((await response.aread()).decode()[:200])
            return None
        async for line in response.aiter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: {"):
                event = json.loads(line[6:])
                if "error" in event:
                    stats.errors.append(line[:200])
                    continue
                content = (event["choices"] or [{}])[0].get("delta", {}).get("content") or ""
                if content:
                    if not text:
                        stats.ttft.append(time.perf_counter() - start)
                    text.append(content)
                    if disconnect:
                        stats.disconnects += 1
                        break  # leaving the block closes the connection mid-stream
    return "".join(text), done, conversation_id


async def user(c: int, url: str, until: float, max_tokens: int, stats: Stats) -> tuple[str | None, list[Turn]]:
    rng = random.Random(c)
    turns: list[Turn] = []
    conversation_id: str | None = None
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        i = 0
        while time.monotonic() < until:
            i += 1
            if rng.random() < 0.10:
                bad = rng.choice(INVALID)
                if isinstance(bad, bytes):
                    response = await client.post(CHAT, content=bad, headers={"Content-Type": "application/json"})
                else:
                    response = await client.post(CHAT, json=bad)
                stats.count(response.status_code)
                continue
            content = f"Client {c}, message {i}: tell me something about the number {rng.randint(1, 999)}."
            body: dict[str, Any] = {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
                                    "seed": rng.randint(0, 2**31 - 1)}  # fmt: skip
            if conversation_id is not None:
                body["conversation_id"] = conversation_id
            stream = rng.random() < 0.5
            try:
                result = await chat_turn(client, body, stream, stream and rng.random() < 0.20, stats)
            except httpx.HTTPError as exc:
                stats.errors.append(f"{type(exc).__name__}: {exc}")
                continue
            if result is None:
                continue
            conversation_id = result[2]  # the first turn created it
            turns.append(Turn(content, result[0], result[1]))
    return conversation_id, turns


async def check(url: str, conversation_id: str | None, turns: list[Turn]) -> bool:
    """Whether the stored conversation is what its client saw (see the module docstring); a mismatch is kept
    in `MISMATCHES` (both sides), for the report."""
    if conversation_id is None:
        return not turns
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        messages = (await client.get(f"/v1/conversations/{conversation_id}")).json()["messages"]
    ok = _matches(messages, turns)
    if not ok:
        MISMATCHES.append({
            "conversation_id": conversation_id,
            "client_saw": [{"user": t.user, "reply": t.reply, "complete": t.complete} for t in turns],
            "stored": [{"role": m["role"], "content": m["content"]} for m in messages],
        })  # fmt: skip
    return ok


MISMATCHES: list[dict[str, Any]] = []


def _matches(messages: list[dict[str, Any]], turns: list[Turn]) -> bool:
    users = [m["content"] for m in messages if m["role"] == "user"]
    if users != [t.user for t in turns]:
        return False
    k = 0
    for turn in turns:  # messages alternate user, [assistant]
        while messages[k]["role"] != "user" or messages[k]["content"] != turn.user:
            k += 1
        after = messages[k + 1] if k + 1 < len(messages) and messages[k + 1]["role"] == "assistant" else None
        if turn.complete and (after is None or after["content"] != turn.reply):
            return False
        if not turn.complete and after is not None and not after["content"].startswith(turn.reply):
            return False
        k += 1
    return True


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else (values[0] if values else 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model file/dir/name (default: the bundled one)")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup-s", type=float, default=20.0, help="load before the starting RSS is taken")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "soak.json")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="soak-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MINI_CLAUDE_")} | {"MINI_CLAUDE_UI": "false"}
    command = [sys.executable, "-m", "mini_claude", "serve", "--port", str(port), "--threads", str(args.threads),
               "--log-level", "warning", "--database-url", f"sqlite:///{workdir / 'soak.db'}"]  # fmt: skip
    if args.model:
        command += ["--model", args.model]
    log = workdir / "server.log"
    server = subprocess.Popen(command, cwd=workdir, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 600
        while True:
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the server did not start: {log.read_text()[-2000:]}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        stats = Stats()

        async def run() -> tuple[float, list[tuple[str | None, list[Turn]]], list[bool]]:
            start = time.monotonic()
            until = start + args.minutes * 60
            tasks = [asyncio.create_task(user(c, url, until, args.max_tokens, stats)) for c in range(args.clients)]
            await asyncio.sleep(min(args.warmup_s, args.minutes * 30))
            rss_start = resident_mb(server.pid)
            results = await asyncio.gather(*tasks)
            checks = await asyncio.gather(*(check(url, cid, turns) for cid, turns in results))
            return rss_start, results, checks

        rss_start, results, checks = asyncio.run(run())
        rss_end = resident_mb(server.pid)
        total = sum(stats.statuses.values())
        server_errors = sum(n for s, n in stats.statuses.items() if s >= 500)
        report = {
            "clients": args.clients, "minutes": args.minutes, "max_tokens": args.max_tokens,
            "requests": total, "statuses": {str(k): v for k, v in sorted(stats.statuses.items())},
            "server_errors_5xx": server_errors, "client_disconnects": stats.disconnects,
            "cancellations_in_metrics": cancelled_sequences(url),
            "ttft_p50_ms": round(percentile(stats.ttft, 50) * 1000, 1),
            "ttft_p95_ms": round(percentile(stats.ttft, 95) * 1000, 1),
            "rss_start_mb": round(rss_start), "rss_end_mb": round(rss_end),
            "rss_growth_pct": round((rss_end - rss_start) / rss_start * 100, 1),
            "conversations": len(results), "conversations_as_seen": sum(checks),
            "stream_errors": stats.errors[:5], "mismatched_conversations": MISMATCHES,
        }  # fmt: skip
    finally:
        server.terminate()
        server.wait(30)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    for key, value in report.items():
        if key == "mismatched_conversations":
            value = f"{len(value)} (both sides in {args.out})"
        print(f"{key:>26}: {value}")
    ok = server_errors == 0 and all(checks) and report["rss_growth_pct"] < 10  # type: ignore[operator]
    print("PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
