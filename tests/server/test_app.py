"""The app around the API: API keys, /health, /metrics, the WebSocket chat, settings, and `mini-claude serve`."""

from __future__ import annotations

import gc
import importlib.util
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from starlette.websockets import WebSocketDisconnect

from mini_claude.catalog import BUNDLED_NAME
from mini_claude.db import make_engine
from mini_claude.engine import Engine
from mini_claude.generate import SamplingParams
from mini_claude.server import create_app
from mini_claude.settings import Settings
from server.conftest import app_settings

CHAT = "/v1/chat/completions"
HI = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "temperature": 0}


# ------------------------------------------------------------------------------------------------ API keys


def test_api_keys_guard_everything_but_health(make_client: Callable[..., TestClient]) -> None:
    client = make_client(api_keys=["key-one", "key-two"])
    for method, path, body in [("POST", CHAT, HI), ("GET", "/v1/models", None), ("GET", "/models", None),
                               ("GET", "/v1/conversations", None), ("GET", "/metrics", None)]:  # fmt: skip
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "key-one"},
                        {"Authorization": "Basic key-one"}):  # fmt: skip
            response = client.request(method, path, json=body, headers=headers)
            assert response.status_code == 401, (path, headers)
            assert response.json()["error"]["code"] == "invalid_api_key"
            assert response.headers["www-authenticate"] == "Bearer"
        for key in ("key-one", "key-two"):
            ok = client.request(method, path, json=body, headers={"Authorization": f"Bearer {key}"})
            assert ok.status_code == 200, (path, ok.text)
    assert client.get("/health").status_code == 200


def test_websocket_needs_a_key_too(make_client: Callable[..., TestClient]) -> None:
    client = make_client(api_keys=["sesame"])
    with pytest.raises(WebSocketDisconnect), client.websocket_connect("/chat/stream") as ws:
        ws.receive_json()
    with client.websocket_connect("/chat/stream?api_key=sesame") as ws:
        ws.send_json({"type": "ping"})
        assert ws.receive_json() == {"type": "pong"}
    with client.websocket_connect("/ws", headers={"Authorization": "Bearer sesame"}) as ws:
        ws.send_json({"type": "ping"})
        assert ws.receive_json() == {"type": "pong"}


def test_api_keys_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MINI_CLAUDE_API_KEYS", " a1, b2 ,")
    assert Settings(_env_file=None).api_keys == ["a1", "b2"]  # type: ignore[call-arg]
    monkeypatch.setenv("MINI_CLAUDE_API_KEYS", '["x,y"]')
    assert Settings(_env_file=None).api_keys == ["x,y"]  # type: ignore[call-arg]
    monkeypatch.setenv("MINI_CLAUDE_API_KEYS", "")
    assert Settings(_env_file=None).api_keys == []  # type: ignore[call-arg]


# -------------------------------------------------------------------------------------------------- health


def test_health(client: TestClient) -> None:
    response = client.get("/health")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "healthy" and body["model"] == "tiny"
    assert body["database"] == "ok" and body["scheduler"] == "running"


def test_health_is_503_when_the_database_is_unreachable(client: TestClient) -> None:
    service = client.app.state.service  # type: ignore[attr-defined]
    working = service.db
    service.db = make_engine("postgresql+psycopg://nobody@127.0.0.1:1/nothing?connect_timeout=2")
    try:
        response = client.get("/health")
        assert response.status_code == 503
        assert response.json()["status"] == "unhealthy" and response.json()["database"] == "unreachable"
        chat = client.post(CHAT, json=HI)  # storing the exchange is impossible: say so, do not pretend
        assert chat.status_code == 503 and chat.json()["error"]["code"] == "database_unavailable"
        assert client.post(CHAT, json={**HI, "store": False}).status_code == 200  # generation still works
    finally:
        service.db.dispose()
        service.db = working
    assert client.get("/health").status_code == 200


def test_health_is_503_when_the_scheduler_has_stopped(client: TestClient) -> None:
    client.app.state.service.scheduler.close()  # type: ignore[attr-defined]
    response = client.get("/health")
    assert response.status_code == 503 and response.json()["scheduler"] == "stopped"
    assert client.post(CHAT, json=HI).status_code == 503


# ------------------------------------------------------------------------------------------------- metrics


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_count_what_happened(client: TestClient) -> None:
    usages = [client.post(CHAT, json={**HI, "max_tokens": 4 + i}).json()["usage"] for i in range(3)]
    streamed = client.post(CHAT, json={**HI, "stream": True, "n": 2})
    assert streamed.status_code == 200
    client.post(CHAT, json={**HI, "temperature": 5})
    client.post(CHAT, json={**HI, "model": "nope"})
    client.get("/v1/conversations/not-there")
    m = samples(client.get("/metrics").text)

    def requests(route: str, status: int, method: str = "POST") -> float:
        return m.get(
            ("mini_claude_http_requests_total", (("method", method), ("route", route), ("status", str(status)))), 0
        )

    assert requests(CHAT, 200) == 4 and requests(CHAT, 400) == 1 and requests(CHAT, 404) == 1
    assert requests("/v1/conversations/{conversation_id}", 404, "GET") == 1
    assert m[("mini_claude_http_request_duration_seconds_count", (("route", CHAT),))] == 6
    assert m[("mini_claude_errors_total", (("type", "http_400"),))] == 1
    sequences = m[("mini_claude_sequences_total", (("finish_reason", "length"),))] + m.get(
        ("mini_claude_sequences_total", (("finish_reason", "stop"),)), 0
    )
    assert sequences == 5  # 3 single replies + 2 streamed choices
    assert m[("mini_claude_time_to_first_token_seconds_count", ())] == 5
    assert m[("mini_claude_prompt_tokens_total", ())] == 5 * usages[0]["prompt_tokens"]
    assert m[("mini_claude_generated_tokens_total", ())] >= sum(u["completion_tokens"] for u in usages)
    assert m[("mini_claude_decode_tokens_per_second_count", ())] >= 3
    assert m[("mini_claude_http_requests_in_flight", ())] == 1  # the /metrics request itself
    assert m[("mini_claude_scheduler_waiting", ())] == 0 and m[("mini_claude_scheduler_running", ())] == 0


def test_each_app_has_its_own_registry(make_client: Callable[..., TestClient]) -> None:
    first, second = make_client(), make_client()
    first.post(CHAT, json=HI)
    key = ("mini_claude_http_requests_total", (("method", "POST"), ("route", CHAT), ("status", "200")))
    assert samples(first.get("/metrics").text)[key] == 1
    assert key not in samples(second.get("/metrics").text)


# ----------------------------------------------------------------------------------------------- WebSocket


def greedy_chat(engine: Engine, messages: list[dict[str, str]], max_tokens: int) -> Any:
    """The WebSocket's sampling defaults are the chat CLI's; at temperature 0 only the penalty matters."""
    params = SamplingParams(temperature=0, max_new_tokens=max_tokens, top_p=0.9, repetition_penalty=1.1)
    return engine.complete(engine.encode_chat(messages), params)


def receive_reply(ws: Any) -> tuple[dict[str, Any], str, dict[str, Any]]:
    start = ws.receive_json()
    assert start["type"] == "start", start
    text = ""
    while (message := ws.receive_json())["type"] == "token":
        assert message["conversation_id"] == start["conversation_id"]
        text += message["content"]
    return start, text, message


def test_websocket_chat_protocol(client: TestClient, engine: Engine) -> None:
    with client.websocket_connect("/chat/stream") as ws:
        ws.send_json({"message": "hello socket", "temperature": 0, "max_tokens": 10})
        start, text, done = receive_reply(ws)
        ref = greedy_chat(engine, [{"role": "user", "content": "hello socket"}], 10)
        assert text == ref.text
        assert done["type"] == "done" and done["finish_reason"] == ref.finish_reason
        assert done["usage"]["prompt_tokens"] == ref.prompt_tokens
        assert done["usage"]["completion_tokens"] == ref.completion_tokens
        conversation_id = start["conversation_id"]

        bad_messages = [
            "not json", '["a list"]', '{"type": "bogus"}', '{"message": ""}', '{"message": "x", "temperature": 7}',
            '{"message": "x", "conversation_id": "nope"}',
        ]  # fmt: skip
        for bad in bad_messages:
            ws.send_text(bad)
            error = ws.receive_json()
            assert error["type"] == "error" and error["message"], bad
        ws.send_bytes(b"\xff\xfe")
        assert ws.receive_json()["type"] == "error"

        # the socket is still usable, and the conversation continues with its history
        ws.send_json({"message": "and more", "conversation_id": conversation_id, "temperature": 0, "max_tokens": 8})
        start2, text2, done2 = receive_reply(ws)
        stored_text = text.replace("\x00", "\ufffd")  # how the reply is stored (see below), so remembered
        history = [{"role": "user", "content": "hello socket"}, {"role": "assistant", "content": stored_text},
                   {"role": "user", "content": "and more"}]  # fmt: skip
        ref2 = greedy_chat(engine, history, 8)
        assert start2["conversation_id"] == conversation_id
        assert (text2, done2["usage"]["prompt_tokens"]) == (ref2.text, ref2.prompt_tokens)
    stored = client.get(f"/v1/conversations/{conversation_id}").json()["messages"]
    # NUL (which random models emit and PostgreSQL cannot store) is kept as U+FFFD on every backend
    assert [m["content"] for m in stored] == [
        t.replace("\x00", "\ufffd") for t in ("hello socket", text, "and more", text2)
    ]


def wait_until_stopped(scheduler: Any) -> None:
    deadline = time.monotonic() + 30
    while scheduler.stats.running or scheduler.stats.waiting:
        assert time.monotonic() < deadline, "the generation was not stopped"
        time.sleep(0.02)


def test_websocket_cancel(make_client: Callable[..., TestClient], new_engine: Callable[..., Engine]) -> None:
    client = make_client(engine=new_engine(context=2048, eos=False))
    scheduler = client.app.state.service.scheduler  # type: ignore[attr-defined]
    with client.websocket_connect("/ws") as ws:
        ws.send_json({"message": "never stop", "max_tokens": 2000})
        start = ws.receive_json()
        assert ws.receive_json()["type"] == "token"
        ws.send_json({"message": "a second one at once"})  # one reply at a time
        ws.send_json({"type": "cancel"})
        received = []
        while (message := ws.receive_json())["type"] != "done":
            received.append(message["type"])
        assert set(received) <= {"token", "error"} and received.count("error") == 1
        assert message["finish_reason"] == "cancelled" and message["conversation_id"] == start["conversation_id"]
        ws.send_json({"type": "cancel"})  # nothing to cancel: ignored
        ws.send_json({"type": "ping"})
        assert ws.receive_json() == {"type": "pong"}
    wait_until_stopped(scheduler)  # the scheduler applies a cancel at its next step
    assert scheduler.stats.tokens < 2000
    stored = client.get(f"/v1/conversations/{start['conversation_id']}").json()["messages"]
    assert [m["role"] for m in stored] == ["user", "assistant"] and 0 < len(stored[1]["content"]) < 2000


def test_websocket_disconnect_cancels(
    make_client: Callable[..., TestClient], new_engine: Callable[..., Engine]
) -> None:
    client = make_client(engine=new_engine(context=2048, eos=False))
    scheduler = client.app.state.service.scheduler  # type: ignore[attr-defined]
    with client.websocket_connect("/chat/stream") as ws:
        ws.send_json({"message": "never stop", "max_tokens": 2000})
        ws.receive_json()
        ws.receive_json()
    wait_until_stopped(scheduler)
    assert scheduler.stats.tokens < 2000


# ------------------------------------------------------------------------------------------------ the rest


@pytest.mark.slow  # mounting the UI imports Gradio
def test_root_redirects_to_the_ui_or_the_docs(make_client: Callable[..., TestClient]) -> None:
    api_only = make_client(ui=False).get("/", follow_redirects=False)
    assert api_only.status_code in (302, 307) and api_only.headers["location"] == "/docs"
    if importlib.util.find_spec("gradio") is not None and importlib.util.find_spec("mini_claude.ui") is not None:
        with_ui = make_client(ui=True).get("/", follow_redirects=False)
        assert with_ui.headers["location"] == "/ui"
        # with API keys the page needs one too, as a Basic-auth password (browsers prompt for it)
        guarded = make_client(ui=True, api_keys=["sesame"])
        refused = guarded.get("/ui/")
        assert refused.status_code == 401 and refused.headers["www-authenticate"].startswith("Basic")
        assert guarded.get("/ui/", auth=("anyone", "wrong")).status_code == 401
        assert guarded.get("/ui/", auth=("anyone", "sesame")).status_code == 200
        assert guarded.get("/ui/", headers={"Authorization": "Bearer sesame"}).status_code == 200


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_mini_claude_serve_answers_health(tmp_path: Path, bundled_gguf: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MINI_CLAUDE_")}
    command = [sys.executable, "-m", "mini_claude", "serve", "--port", str(port),
               "--database-url", f"sqlite:///{tmp_path / 'serve.db'}", "--log-level", "warning"]  # fmt: skip
    process = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + 180
        while True:
            assert process.poll() is None, process.stdout.read()  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "the server did not come up"
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
                break
            except httpx.TransportError:
                time.sleep(0.5)
        assert health.status_code == 200 and health.json()["model"] == BUNDLED_NAME
        chat = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json={**HI, "max_tokens": 4}, timeout=120)
        assert chat.status_code == 200 and chat.json()["usage"]["completion_tokens"] >= 1
    finally:
        process.terminate()
        process.wait(30)
    assert (tmp_path / "serve.db").exists()


def test_start_up_objects_are_frozen_while_serving_and_thawed_after(engine: Engine, sqlite_url: str) -> None:
    """The objects start-up made are kept out of the collector's full passes while the server runs (it walks
    only what serving made), and given back to it at shutdown, for a process that goes on."""
    gc.unfreeze()
    with TestClient(create_app(app_settings(sqlite_url), engine=engine)) as client:
        assert client.get("/health").status_code == 200
        assert gc.get_freeze_count() > 10_000
    assert gc.get_freeze_count() == 0
