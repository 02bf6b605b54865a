"""What the server caches: prefixes of prompts (keys/values), whole deterministic answers (opt-in), and what
/metrics says about them; and one failing stream among others.

Expected text comes from the engine itself, generating the same prompt alone with no cache at all.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from fastapi.testclient import TestClient

from mini_claude.engine import Engine
from mini_claude.generate import SamplingParams
from mini_claude.lora import LoRAConfig, apply_lora, save_adapter

SYSTEM = "You are a terse assistant who answers every question in one short sentence, politely."


def metric(client: TestClient | httpx.Client, name: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.split()[-1])
    raise AssertionError(f"{name} is not in /metrics")


def chat(question: str, **extra: Any) -> dict[str, Any]:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    return {"messages": messages, "max_tokens": 10, "temperature": 0, "store": False, **extra}


def alone(engine: Engine, question: str, max_tokens: int = 10) -> str:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    return engine.complete(engine.encode_chat(messages), SamplingParams(temperature=0, max_new_tokens=max_tokens)).text


def stream_events(client: TestClient, body: dict[str, Any]) -> list[dict[str, Any]]:
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
        assert response.status_code == 200
        lines = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_requests_sharing_a_system_prompt_reuse_its_keys(
    make_client: Callable[..., TestClient], engine: Engine
) -> None:
    client = make_client()
    first = client.post("/v1/chat/completions", json=chat("What is the capital of France?")).json()
    second = client.post("/v1/chat/completions", json=chat("Why is the sky blue?")).json()
    assert first["choices"][0]["message"]["content"] == alone(engine, "What is the capital of France?")
    assert second["choices"][0]["message"]["content"] == alone(engine, "Why is the sky blue?")
    assert metric(client, "mini_claude_prefix_cache_lookups_total") == 2
    assert metric(client, "mini_claude_prefix_cache_hits_total") == 1
    reused = metric(client, "mini_claude_prefix_cache_reused_tokens_total")
    assert reused >= len(SYSTEM) // 16 * 16  # byte-level tokenizer: the system prompt alone spans that many
    assert metric(client, "mini_claude_kv_cache_used_bytes") == 0  # nothing runs now
    assert 0 < metric(client, "mini_claude_kv_cache_cached_bytes") <= metric(client, "mini_claude_kv_cache_bytes")


def test_response_cache_answers_identical_deterministic_requests(
    make_client: Callable[..., TestClient], new_engine: Callable[..., Engine], tmp_path: Path
) -> None:
    engine = new_engine()
    client = make_client(engine=engine, response_cache_size=4)
    live = stream_events(client, chat("Tell me about caches."))
    steps_before = client.app.state.service.scheduler.stats.steps  # type: ignore[attr-defined]
    cached = stream_events(client, chat("Tell me about caches."))
    assert client.app.state.service.scheduler.stats.steps == steps_before, "the model ran for a cached answer"  # type: ignore[attr-defined]

    def shape(events: list[dict[str, Any]]) -> list[Any]:
        return [(e["object"], e["model"], e["choices"]) for e in events]

    assert shape(cached) == shape(live)  # the same chunks, one by one: it streams like a real answer
    # (How many chunks the live answer came in depends on how fast tokens arrive against how fast the client
    # reads: the scheduler joins tokens that queued up. The replay repeats whatever the live stream was.)
    assert any(e["choices"] and e["choices"][0]["delta"].get("content") for e in live)
    plain = client.post("/v1/chat/completions", json=chat("Tell me about caches.")).json()  # not streamed: a hit too
    assert plain["choices"][0]["message"]["content"] == "".join(
        e["choices"][0]["delta"].get("content") or "" for e in live if e["choices"]
    )
    assert metric(client, "mini_claude_response_cache_hits_total") == 2
    assert metric(client, "mini_claude_response_cache_entries") == 1
    client.post("/v1/chat/completions", json=chat("Tell me about caches.", temperature=0.9))  # sampled, no seed
    client.post("/v1/chat/completions", json=chat("Tell me about caches.", temperature=0.9))
    assert metric(client, "mini_claude_response_cache_hits_total") == 2
    seeded = [client.post("/v1/chat/completions", json=chat("Seeded?", temperature=0.9, seed=5)).json()
              for _ in range(2)]  # fmt: skip
    assert seeded[0]["choices"] == seeded[1]["choices"]
    assert metric(client, "mini_claude_response_cache_hits_total") == 3

    model = apply_lora(copy.deepcopy(engine.model), LoRAConfig(r=2, alpha=4, init_lora_weights=False))
    engine.load_adapter(save_adapter(model, tmp_path / "other", base_model_name="tiny"))  # the models changed
    client.post("/v1/chat/completions", json=chat("Tell me about caches."))
    assert metric(client, "mini_claude_response_cache_hits_total") == 3
    assert metric(client, "mini_claude_response_cache_entries") == 1


def test_the_response_cache_is_off_by_default(make_client: Callable[..., TestClient]) -> None:
    client = make_client()
    for _ in range(2):
        client.post("/v1/chat/completions", json=chat("Again?"))
    assert metric(client, "mini_claude_response_cache_hits_total") == 0
    assert metric(client, "mini_claude_response_cache_misses_total") == 0


def test_one_failing_stream_ends_alone(
    make_live: Callable[..., Any], new_engine: Callable[..., Engine], engine: Engine, tmp_path: Path
) -> None:
    """A stream whose adapter is removed mid-generation gets an error event; the stream beside it goes on."""
    served = new_engine(eos=False)
    model = apply_lora(copy.deepcopy(served.model), LoRAConfig(r=2, alpha=4, init_lora_weights=False))
    served.load_adapter(save_adapter(model, tmp_path / "doomed", base_model_name="tiny"))
    server = make_live(served)
    long = {"max_tokens": 200, "temperature": 0, "stream": True, "store": False}
    base_body = {"model": "tiny", "messages": [{"role": "user", "content": "keep going"}], **long}
    doomed_body = {"model": "doomed", "messages": [{"role": "user", "content": "me too"}], **long}
    with httpx.Client(base_url=server.url, timeout=60) as client:
        with client.stream("POST", "/v1/chat/completions", json=base_body) as base, client.stream(
            "POST", "/v1/chat/completions", json=doomed_body
        ) as doomed:  # fmt: skip
            doomed_lines = doomed.iter_lines()
            for line in doomed_lines:  # wait until it really generates
                if '"content":"' in line and '"role"' not in line:
                    break
            served.adapters.unload("doomed")
            rest = list(doomed_lines)
            base_text = "".join(
                (json.loads(line[6:])["choices"] or [{}])[0].get("delta", {}).get("content") or ""
                for line in base.iter_lines() if line.startswith("data: {")
            )  # fmt: skip
        errors = [json.loads(line[6:]) for line in rest if line.startswith("data: {") and '"error"' in line]
        assert errors and errors[0]["error"]["type"] == "server_error"
        assert rest[-1] == "data: [DONE]" or rest[-2:] == ["data: [DONE]", ""]
        assert metric(client, "mini_claude_sequences_failed_total") == 1
    expected = new_engine(eos=False).complete(
        served.encode_chat(base_body["messages"]), SamplingParams(temperature=0, max_new_tokens=200)
    )
    assert base_text == expected.text
