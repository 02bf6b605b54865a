"""Faults, for real (issue 8, item 3): `kill -9` mid-stream, a restart on the same database, two replicas.

Each server here is a real `mini-claude serve` process on a tiny model dir (its model has no end-of-sequence
token, so every reply runs to its `max_tokens` and streams are still running when the process is killed).
What is checked is the database itself after the fact, against what each client saw:

- every user message whose request got its 200 header is stored exactly once, also after a restart and a
  continued conversation;
- a reply is stored only when complete (then it equals what its client received) - a reply cut off by the
  kill is absent, never stored as if finished;
- two replicas on one PostgreSQL share conversations, and a fine-tune job whose runner was killed is taken
  over by the other replica, once (its child training died with its runner, so the job never runs twice).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from mini_claude.checkpoint import save_model_dir
from mini_claude.db import crud, make_engine, session_scope

pytestmark = pytest.mark.slow  # server processes that import torch

CHAT = "/v1/chat/completions"


class Served:
    """A `mini-claude serve` process on a free port, started the way a user starts one."""

    def __init__(self, model_dir: Path, database_url: str, workdir: Path, **env: str) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        environment = {k: v for k, v in os.environ.items() if not k.startswith("MINI_CLAUDE_")}
        environment |= {"MINI_CLAUDE_UI": "false", "MINI_CLAUDE_FINE_TUNE_DIR": str(workdir / "fine-tunes"), **env}
        command = [
            sys.executable, "-m", "mini_claude", "serve", "--model", str(model_dir), "--port", str(self.port),
            "--quantize", "none", "--dtype", "float32", "--threads", "1", "--log-level", "warning",
            "--database-url", database_url,
        ]  # fmt: skip
        self.log = workdir / f"server-{self.port}.log"
        self.process = subprocess.Popen(command, cwd=workdir, env=environment, stdout=self.log.open("wb"),
                                        stderr=subprocess.STDOUT)  # fmt: skip
        deadline = time.monotonic() + 300
        while True:
            assert self.process.poll() is None, self.log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the server did not start"
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.3)

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, new_engine: Callable[..., Any]) -> Path:
    engine = new_engine(eos=False)
    return save_model_dir(tmp_path_factory.mktemp("model") / "tiny", engine.model, engine.tokenizer)


@pytest.fixture
def serve(model_dir: Path, tmp_path: Path) -> Iterator[Callable[..., Served]]:
    started: list[Served] = []

    def start(database_url: str, **env: str) -> Served:
        started.append(Served(model_dir, database_url, tmp_path, **env))
        return started[-1]

    yield start
    for server in started:
        server.stop()


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, sqlite_url: str) -> str:
    return sqlite_url if request.param == "sqlite" else request.getfixturevalue("postgres_url")


def stored(database_url: str, conversation_id: str) -> list[tuple[str, str, str | None]]:
    """(role, content, finish_reason) of a conversation's messages, read from the database itself."""
    engine = make_engine(database_url)
    try:
        with session_scope(engine) as s:
            return [(m.role, m.content, m.finish_reason) for m in crud.list_messages(s, conversation_id)]
    finally:
        engine.dispose()


class Client(threading.Thread):
    """One conversation: a short exchange, then a long streamed reply that the kill cuts off (or not)."""

    def __init__(self, url: str, i: int, streaming: threading.Semaphore) -> None:
        super().__init__(daemon=True)
        self.url, self.i, self.streaming = url, i, streaming
        self.conversation_id = ""
        self.first_reply = ""
        self.header_ok = False
        self.seen: list[str] = []
        self.done = False

    def run(self) -> None:
        first = {"messages": [{"role": "user", "content": f"hello {self.i}"}], "max_tokens": 4, "temperature": 0}
        reply = httpx.post(self.url + CHAT, json=first, timeout=120).json()
        self.conversation_id, self.first_reply = reply["conversation_id"], reply["choices"][0]["message"]["content"]
        body = {"messages": [{"role": "user", "content": f"tell me more, {self.i}"}], "max_tokens": 200,
                "conversation_id": self.conversation_id, "stream": True}  # fmt: skip
        try:
            with httpx.stream("POST", self.url + CHAT, json=body, timeout=120) as response:
                self.header_ok = response.status_code == 200
                for line in response.iter_lines():
                    if line == "data: [DONE]":
                        self.done = True
                    elif line.startswith("data: {"):
                        delta = (json.loads(line[6:])["choices"] or [{}])[0].get("delta", {})
                        self.seen.append(delta.get("content") or "")
                        if len(self.seen) == 3:
                            self.streaming.release()
        except httpx.TransportError:  # the server was killed under us
            pass
        finally:
            if len(self.seen) < 3:
                self.streaming.release()


def test_kill_9_mid_stream_then_restart_stores_each_message_once(
    serve: Callable[..., Served], database_url: str
) -> None:
    server = serve(database_url)
    streaming = threading.Semaphore(0)
    clients = [Client(server.url, i, streaming) for i in range(8)]
    for client in clients:
        client.start()
    for _ in clients:  # every stream has sent a few chunks
        assert streaming.acquire(timeout=300)
    server.kill()
    for client in clients:
        client.join(60)
    assert all(c.header_ok for c in clients)
    assert any(not c.done for c in clients), "every stream finished before the kill: nothing was tested"

    restarted = serve(database_url)
    for c in clients:
        messages = stored(database_url, c.conversation_id)
        users = [content for role, content, _ in messages if role == "user"]
        assert users == [f"hello {c.i}", f"tell me more, {c.i}"]  # each exactly once
        replies = [(content, reason) for role, content, reason in messages if role == "assistant"]
        assert replies[0] == (c.first_reply, "length")
        if c.done:
            assert replies[1:] == [("".join(c.seen), "length")]
        else:  # cut off: absent, never a half reply stored as complete
            assert replies[1:] == [], replies
        more = {"messages": [{"role": "user", "content": "and now?"}], "max_tokens": 3,
                "conversation_id": c.conversation_id}  # fmt: skip
        assert httpx.post(restarted.url + CHAT, json=more, timeout=120).status_code == 200
        assert [r for r, _, _ in stored(database_url, c.conversation_id)].count("user") == 3

    # An idle server uses no CPU: nothing polls (the scheduler and the job runner sleep on condition variables;
    # the job runner looks for other replicas' jobs every few seconds, a query of microseconds).
    time.sleep(1)
    before, start = restarted.cpu_seconds(), time.monotonic()
    time.sleep(4)
    idle = (restarted.cpu_seconds() - before) / (time.monotonic() - start)
    print(f"idle server: {idle:.2%} of a core")
    assert idle < 0.01


def training_processes(job_id: str) -> list[int]:
    """Pids of `mini-claude finetune` children running the job (their --config is in the job's dir)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"finetune" in cmdline and any(job_id.encode() in part for part in cmdline):
                found.append(int(entry.name))
    return found


def test_two_replicas_share_conversations_and_take_over_a_dead_runner_s_job(
    serve: Callable[..., Served], postgres_url: str
) -> None:
    lease = {"MINI_CLAUDE_JOB_LEASE_S": "3"}
    a, b = serve(postgres_url, **lease), serve(postgres_url, **lease)

    started = httpx.post(a.url + CHAT, json={"messages": [{"role": "user", "content": "on a"}], "max_tokens": 3},
                         timeout=120).json()  # fmt: skip
    conversation_id = started["conversation_id"]
    continued = httpx.post(b.url + CHAT, json={"messages": [{"role": "user", "content": "on b"}], "max_tokens": 3,
                                               "conversation_id": conversation_id}, timeout=120)  # fmt: skip
    assert (
        continued.status_code == 200 and continued.json()["usage"]["prompt_tokens"] > started["usage"]["prompt_tokens"]
    )
    detail = httpx.get(f"{b.url}/v1/conversations/{conversation_id}").json()
    assert [m["content"] for m in detail["messages"] if m["role"] == "user"] == ["on a", "on b"]

    records = [{"messages": [{"role": "user", "content": f"{i}?"}, {"role": "assistant", "content": f"{i}!"}]}
               for i in range(8)]  # fmt: skip
    hyper = {"max_steps": 3, "batch_size": 4, "rank": 4, "eval_every": 0, "save_every": 0, "seed": 1}
    job = httpx.post(a.url + "/v1/fine-tunes", json={"training_data": records, "hyperparameters": hyper},
                     timeout=60).json()  # fmt: skip
    deadline = time.monotonic() + 300
    while not training_processes(job["id"]):  # a claimed it (its runner woke at once) and started training
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert httpx.get(f"{a.url}/v1/fine-tunes/{job['id']}").json()["status"] == "running"
    trained_by_a = training_processes(job["id"])
    a.kill()
    while set(trained_by_a) & set(training_processes(job["id"])):  # died with its runner, not orphaned
        assert time.monotonic() < deadline
        time.sleep(0.1)
    most = 0
    while (state := httpx.get(f"{b.url}/v1/fine-tunes/{job['id']}", timeout=30).json())["status"] != "succeeded":
        assert state["status"] in ("running", "queued"), state
        assert time.monotonic() < deadline, state
        most = max(most, len(training_processes(job["id"])))
        time.sleep(0.2)
    assert most <= 1, "the job ran twice at once"  # a's child died with a (PR_SET_PDEATHSIG)
    served = [m["id"] for m in httpx.get(f"{b.url}/v1/models").json()["data"]]
    assert state["fine_tuned_model"] in served
