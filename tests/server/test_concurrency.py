"""Concurrency through one scheduler: concurrent clients get what each would get alone, a stalled client
blocks nobody, and a client that goes away stops its own generation."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import httpx
from openai import AsyncOpenAI

from mini_claude.db import crud, make_engine, session_scope
from mini_claude.engine import Engine
from mini_claude.generate import SamplingParams

PROMPTS = ["hello there", "a", "the quick brown fox", "12345", "zzz", "Once upon a time", "x y", "emoji 🎉"]


def alone(engine: Engine, prompt: str, params: SamplingParams) -> str:
    return engine.complete(engine.encode_chat([{"role": "user", "content": prompt}]), params).text


def test_eight_concurrent_streams_each_get_what_they_would_get_alone(live: Any, engine: Engine) -> None:
    kwargs = [{"temperature": 0, "max_tokens": 8 + 3 * i} for i in range(len(PROMPTS))]
    kwargs[2] = {"temperature": 1.0, "seed": 11, "max_tokens": 20}  # sampled, seeded
    kwargs[5] = {"temperature": 0.8, "seed": 3, "top_p": 0.8, "max_tokens": 16}
    expected = [
        alone(
            engine,
            p,
            SamplingParams(max_new_tokens=k["max_tokens"], **{n: v for n, v in k.items() if n != "max_tokens"}),
        )
        for p, k in zip(PROMPTS, kwargs, strict=True)
    ]
    stats = live.app.state.service.scheduler.stats
    batches_before = dict(stats.batch_sizes)

    async def main() -> list[str]:
        client = AsyncOpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0, timeout=60)

        async def one(prompt: str, params: dict[str, Any]) -> str:
            stream = await client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": prompt}], stream=True, **params
            )
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

        try:
            return await asyncio.gather(*(one(p, k) for p, k in zip(PROMPTS, kwargs, strict=True)))
        finally:
            await client.close()

    assert asyncio.run(main()) == expected
    batched = {size: n - batches_before.get(size, 0) for size, n in stats.batch_sizes.items()}
    assert max(size for size, n in batched.items() if n > 0) > 1, "the clients were never decoded together"


def test_a_stalled_client_does_not_block_others(live: Any, engine: Engine) -> None:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "stall"}], "max_tokens": 200, "stream": True}
    with httpx.Client(base_url=live.url, timeout=60) as slow, slow.stream("POST", "/v1/chat/completions", json=body):
        # the slow client read nothing at all; another one must still be served in full
        quick = httpx.post(
            f"{live.url}/v1/chat/completions", timeout=60,
            json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "temperature": 0},
        )  # fmt: skip
        assert quick.status_code == 200
        expected = alone(engine, "hi", SamplingParams(temperature=0, max_new_tokens=6))
        assert quick.json()["choices"][0]["message"]["content"] == expected


def cancelled_count(metrics_text: str) -> float:
    for line in metrics_text.splitlines():
        if line.startswith('mini_claude_sequences_total{finish_reason="cancelled"}'):
            return float(line.split()[-1])
    return 0.0


def eventually(condition: Any, timeout: float = 30) -> None:
    """Wait for the server's side of a disconnect (metrics, the partial reply's store) to be done."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the condition never came true"
        time.sleep(0.02)


def wait_until_idle(scheduler: Any, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while scheduler.stats.running or scheduler.stats.waiting:
        assert time.monotonic() < deadline, "the generation was not stopped"
        time.sleep(0.02)


def test_disconnect_mid_stream_cancels_the_generation(make_live: Any, new_engine: Any, tmp_path: Any) -> None:
    """The engine has no end-of-sequence token, so only the disconnect can end this 2000-token reply early."""
    url = f"sqlite:///{tmp_path / 'cancel.db'}"
    server = make_live(new_engine(context=2048, eos=False), database_url=url)
    scheduler = server.app.state.service.scheduler
    body = {"messages": [{"role": "user", "content": "go on forever"}], "max_tokens": 2000, "stream": True}
    tokens_before = scheduler.stats.tokens
    received = ""
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as r:
        conversation_id = r.headers["x-conversation-id"]
        for line in r.iter_lines():
            if '"content":"' in line and '"role"' not in line:
                received += line
                if received.count("data:") >= 3:
                    break  # leave mid-stream: closing the response closes the connection
    wait_until_idle(scheduler)
    generated = scheduler.stats.tokens - tokens_before
    assert 3 <= generated < 2000
    eventually(lambda: cancelled_count(httpx.get(f"{server.url}/metrics").text) == 1)
    # what was generated is kept, marked as cancelled; the user's message is stored once
    db = make_engine(url)

    def stored() -> list[tuple[str, str | None, str]]:
        with session_scope(db) as s:
            return [(m.role, m.finish_reason, m.content) for m in crud.list_messages(s, conversation_id)]

    eventually(lambda: len(stored()) == 2)
    (user, _, _), (assistant, reason, partial) = stored()
    assert (user, assistant, reason) == ("user", "assistant", "cancelled") and partial
    db.dispose()


def test_disconnect_while_waiting_for_a_full_response_cancels_too(make_live: Any, new_engine: Any) -> None:
    server = make_live(new_engine(context=2048, eos=False))
    scheduler = server.app.state.service.scheduler
    body = {"messages": [{"role": "user", "content": "long"}], "max_tokens": 2000}

    async def leave_early() -> None:
        async with httpx.AsyncClient(base_url=server.url) as client:
            with contextlib.suppress(TimeoutError):  # the client gives up and closes its connection
                await asyncio.wait_for(client.post("/v1/chat/completions", json=body), timeout=0.5)

    tokens_before = scheduler.stats.tokens
    asyncio.run(leave_early())
    wait_until_idle(scheduler)
    assert scheduler.stats.tokens - tokens_before < 2000
    eventually(lambda: cancelled_count(httpx.get(f"{server.url}/metrics").text) == 1)
