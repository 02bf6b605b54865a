"""Upstream models (`UPSTREAM/MODEL`), offline: a second `mini-claude serve` on loopback is the upstream, the
official `openai` client talks to the front server, and a tiny local fake plays the upstreams that refuse our
key, fail, or never answer.

The reference for every proxied answer is the upstream's own answer to the same request (greedy decoding,
so both are the same text): the front server must add only transport, the stored conversation, and metrics.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from openai import OpenAI

from helpers import save_tiny_model_dir

UPSTREAM_MODEL = "tiny-upstream"
MESSAGES = [{"role": "user", "content": "Say something, upstream."}]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`mini-claude serve` in its own process, serving a tiny model dir; its /v1 URL."""
    root = tmp_path_factory.mktemp("upstream")
    model_dir = save_tiny_model_dir(root / UPSTREAM_MODEL)
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MINI_CLAUDE_")}
    # No C++ kernels: the proxy does not need them, and their build lock is shared with every other process.
    env |= {"MINI_CLAUDE_UI": "false", "MINI_CLAUDE_AGENTS_DIR": str(root / "no-agents"), "MINI_CLAUDE_KERNELS": "0"}
    cmd = [sys.executable, "-m", "mini_claude", "serve", "--model", str(model_dir), "--port", str(port),
           "--database_url", f"sqlite:///{root / 'upstream.db'}", "--quantize", "none", "--dtype", "float32",
           "--threads", "1", "--log_level", "warning"]  # fmt: skip
    log = root / "upstream.log"  # a file, not a pipe: a pipe nobody reads would block the server once full
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=log.open("wb"))
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the upstream server exited: {log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the upstream server did not start")
            time.sleep(0.5)
        yield f"{url}/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


def fake_app() -> FastAPI:
    """An upstream that misbehaves on demand: the model name says how."""
    app = FastAPI()

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": "deny", "object": "model"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> JSONResponse:
        model = (await request.json())["model"]
        if model == "deny":
            return JSONResponse({"error": {"message": "Incorrect API key provided.", "type": "invalid_request_error",
                                           "code": "invalid_api_key"}}, 401)  # fmt: skip
        if model == "bad":
            return JSONResponse({"error": {"message": "temperature is too hot", "type": "invalid_request_error",
                                           "param": "temperature", "code": "bad_temperature"}}, 400)  # fmt: skip
        if model == "boom":
            return JSONResponse({"error": {"message": "kaput"}}, 500)
        await asyncio.sleep(10)  # "slow": longer than the front server waits
        return JSONResponse({})

    return app


@pytest.fixture(scope="module")
def front(
    upstream: str, tmp_path_factory: pytest.TempPathFactory, serve_app: Any, settings_for: Any, new_engine: Any
) -> Iterator[Any]:
    from mini_claude.server import create_app

    fake = serve_app(fake_app())
    upstreams = [
        {"name": "up", "base_url": upstream},
        {"name": "fake", "base_url": f"{fake.url}/v1", "models": ["deny", "bad", "boom", "slow"], "timeout_s": 1},
        {"name": "gone", "base_url": "http://127.0.0.1:1/v1", "models": ["m"]},
        {"name": "keyed", "base_url": f"{fake.url}/v1", "api_key_env": "MC_TEST_UNSET_KEY", "models": ["m"]},
    ]
    db = tmp_path_factory.mktemp("front") / "front.db"
    settings = settings_for(f"sqlite:///{db}", upstreams=upstreams, agents_dir=str(db.parent / "none"))
    server = serve_app(create_app(settings, new_engine()))
    yield server
    server.stop()
    fake.stop()


@pytest.fixture(scope="module")
def client(front: Any) -> OpenAI:
    return OpenAI(base_url=f"{front.url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def direct(upstream: str) -> OpenAI:
    return OpenAI(base_url=upstream, api_key="unused", max_retries=0, timeout=60)


MODEL = f"up/{UPSTREAM_MODEL}"


def test_models_of_every_upstream_are_listed(client: OpenAI) -> None:
    ids = [m.id for m in client.models.list().data]
    assert ids[0] == "tiny" and MODEL in ids
    assert {"fake/deny", "fake/bad", "gone/m", "keyed/m"} <= set(ids)
    card = client.models.retrieve(MODEL)
    assert card.owned_by == "up"


def test_chat_is_the_upstream_s_answer_and_is_stored(client: OpenAI, direct: OpenAI, front: Any) -> None:
    resp = client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=8)  # type: ignore[arg-type]
    ref = direct.chat.completions.create(model=UPSTREAM_MODEL, messages=MESSAGES, temperature=0, max_tokens=8,  # type: ignore[arg-type]
                                         extra_body={"store": False})  # fmt: skip
    assert resp.model == MODEL and resp.choices[0].message.content == ref.choices[0].message.content
    assert resp.usage is not None and resp.usage.model_dump() == ref.usage.model_dump()  # type: ignore[union-attr]
    conversation_id = resp.model_extra["conversation_id"]  # type: ignore[index]
    stored = httpx.get(f"{front.url}/v1/conversations/{conversation_id}").json()
    assert stored["model"] == MODEL
    assert [(m["role"], m["content"]) for m in stored["messages"]] == [
        ("user", MESSAGES[0]["content"]), ("assistant", ref.choices[0].message.content),
    ]  # fmt: skip

    # The next turn goes to the upstream with the stored history, exactly as if the client had sent it all.
    nxt = [{"role": "user", "content": "And again?"}]
    second = client.chat.completions.create(model=MODEL, messages=nxt, temperature=0, max_tokens=6,  # type: ignore[arg-type]
                                            extra_body={"conversation_id": conversation_id})  # fmt: skip
    whole = [*MESSAGES, {"role": "assistant", "content": ref.choices[0].message.content}, *nxt]
    ref2 = direct.chat.completions.create(model=UPSTREAM_MODEL, messages=whole, temperature=0, max_tokens=6)  # type: ignore[arg-type]
    assert second.choices[0].message.content == ref2.choices[0].message.content


def test_stream_is_passed_through_with_usage(client: OpenAI, direct: OpenAI) -> None:
    ref = direct.chat.completions.create(model=UPSTREAM_MODEL, messages=MESSAGES, temperature=0, max_tokens=10)  # type: ignore[arg-type]
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=MESSAGES, temperature=0, max_tokens=10, stream=True,  # type: ignore[arg-type]
        stream_options={"include_usage": True},
    ))  # fmt: skip
    assert all(c.model == MODEL for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.model_dump() == ref.usage.model_dump()  # type: ignore[union-attr]

    plain = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=4,  # type: ignore[arg-type]
                                                stream=True))  # fmt: skip
    assert all(c.usage is None for c in plain) and all(c.choices for c in plain)


@pytest.mark.parametrize(
    ("model", "status", "code", "words"),
    [
        ("fake/deny", 502, "upstream_auth_failed", "refused our credentials (401"),
        ("fake/bad", 400, "bad_temperature", "temperature is too hot"),
        ("fake/boom", 502, "upstream_error", "failed (500): kaput"),
        ("fake/slow", 504, "upstream_timeout", "did not answer in time"),
        ("gone/m", 502, "upstream_unreachable", "Could not reach the upstream 'gone'"),
        ("keyed/m", 502, "upstream_auth_failed", "set the environment variable MC_TEST_UNSET_KEY"),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
def test_upstream_errors_keep_openai_s_shape(
    client: OpenAI, model: str, status: int, code: str, words: str, stream: bool
) -> None:
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=4, stream=stream)  # type: ignore[arg-type,call-overload]
    assert caught.value.status_code == status
    error = caught.value.body
    assert isinstance(error, dict) and error["code"] == code and words in error["message"]


def test_unknown_model_of_a_listed_upstream_is_404(client: OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="fake/other", messages=MESSAGES)  # type: ignore[arg-type]


def test_health_reports_each_upstream_and_metrics_are_labelled(front: Any, client: OpenAI) -> None:
    health = httpx.get(f"{front.url}/health").json()
    assert health["status"] == "healthy"
    assert health["upstreams"] == {"up": "ok", "fake": "ok", "gone": "unreachable",
                                   "keyed": "no API key (set MC_TEST_UNSET_KEY)"}  # fmt: skip
    assert "voice" in health
    client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=2)  # type: ignore[arg-type]
    metrics = httpx.get(f"{front.url}/metrics").text
    assert 'mini_claude_upstream_requests_total{status="200",upstream="up"}' in metrics
    assert 'mini_claude_upstream_requests_total{status="504",upstream="fake"}' in metrics
    assert 'mini_claude_upstream_tokens_total{kind="completion",upstream="up"}' in metrics


def test_the_ui_chat_turn_streams_from_an_upstream(front: Any, direct: OpenAI) -> None:
    service = front.app.state.service

    async def turn() -> list[Any]:
        return [e async for e in service.stream_reply("Say something, upstream.", temperature=0.0, max_tokens=6,
                                                      model=MODEL)]  # fmt: skip

    events = asyncio.run(turn())
    ref = direct.chat.completions.create(model=UPSTREAM_MODEL, messages=MESSAGES, temperature=0, max_tokens=6)  # type: ignore[arg-type]
    assert events[0].type == "start" and events[-1].type == "done"
    assert "".join(e.content for e in events if e.type == "token") == ref.choices[0].message.content
    assert service.get_conversation(events[0].conversation_id)["model"] == MODEL


def test_upstreams_setting_reads_json_yaml_and_presets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mini_claude.settings import Settings

    monkeypatch.setenv("MINI_CLAUDE_UPSTREAMS", '[{"name": "openai"}, {"name": "box", "base_url": "http://h:1/v1"}]')
    first, second = Settings(_env_file=None).upstreams  # type: ignore[call-arg]
    assert (first.base_url, first.api_key_env) == ("https://api.openai.com/v1", "OPENAI_API_KEY")
    assert second.api_key_env is None and second.models is None
    path = tmp_path / "upstreams.yaml"
    path.write_text("upstreams:\n  - name: g\n    preset: gemini\n    models: [gemini-2.5-flash]\n")
    monkeypatch.setenv("MINI_CLAUDE_UPSTREAMS", str(path))
    (g,) = Settings(_env_file=None).upstreams  # type: ignore[call-arg]
    assert g.base_url.startswith("https://generativelanguage.googleapis.com/") and g.models == ["gemini-2.5-flash"]
    monkeypatch.setenv("MINI_CLAUDE_UPSTREAMS", "anthropic,ollama,vllm")
    assert [u.base_url for u in Settings(_env_file=None).upstreams] == [  # type: ignore[call-arg]
        "https://api.anthropic.com/v1", "http://127.0.0.1:11434/v1", "http://127.0.0.1:8000/v1",
    ]  # fmt: skip
    monkeypatch.setenv("MINI_CLAUDE_UPSTREAMS", '[{"name": "nowhere"}]')
    with pytest.raises(ValueError, match="base_url: required"):
        Settings(_env_file=None)  # type: ignore[call-arg]
