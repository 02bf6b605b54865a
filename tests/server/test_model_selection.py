"""LoRA adapters served as models: listed in /v1/models, chosen by the `model` field of every entry point.

Expected text comes from the engine itself, generating with the same adapter (whose per-row path
`tests/test_adapters.py` checks against PEFT); the server must return exactly that.
"""

from __future__ import annotations

import copy
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from mini_claude.engine import Engine
from mini_claude.generate import SamplingParams
from mini_claude.lora import LoRAConfig, apply_lora, save_adapter

MESSAGES = [{"role": "user", "content": "hello adapters"}]


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory: pytest.TempPathFactory, engine: Engine) -> Path:
    """A random (init_lora_weights=False) adapter on the tiny model's q/v projections, in PEFT's format."""
    model = apply_lora(copy.deepcopy(engine.model), LoRAConfig(r=4, alpha=8, init_lora_weights=False))
    return save_adapter(model, tmp_path_factory.mktemp("runs") / "tuned" / "adapter", base_model_name="tiny")


def served(new_engine: Callable[..., Engine], adapter_dir: Path) -> Engine:
    engine = new_engine()
    engine.load_adapter(adapter_dir)
    return engine


def expected(engine: Engine, adapter: str | None, max_tokens: int = 12, **sampling: Any) -> str:
    params = SamplingParams(max_new_tokens=max_tokens, temperature=0.0, **sampling)
    return engine.complete(engine.encode_chat(MESSAGES), params, adapter=adapter).text


def test_models_lists_each_adapter_as_a_model(
    make_client: Callable[..., TestClient], new_engine: Callable[..., Engine], adapter_dir: Path
) -> None:
    client = make_client(engine=served(new_engine, adapter_dir))
    cards = client.get("/v1/models").json()["data"]
    assert [c["id"] for c in cards] == ["tiny", "tuned"]
    assert cards[0]["parent"] is None and cards[1]["parent"] == "tiny" and cards[1]["root"] == str(adapter_dir)
    assert client.get("/v1/models/tuned").json()["id"] == "tuned"
    details = {m["id"]: m for m in client.get("/models").json()["models"]}
    assert details["tuned"]["adapter"]["rank"] == 4 and details["tuned"]["adapter"]["targets"] == ["q_proj", "v_proj"]
    assert details["tuned"]["parameters"] == details["tiny"]["parameters"] + details["tuned"]["adapter"]["parameters"]

    missing = client.get("/v1/models/other")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def test_the_model_field_selects_the_adapter(
    make_client: Callable[..., TestClient], new_engine: Callable[..., Engine], engine: Engine, adapter_dir: Path
) -> None:
    client = make_client(engine=served(new_engine, adapter_dir))
    reference = served(new_engine, adapter_dir)
    tuned_text, base_text = expected(reference, "tuned"), expected(reference, None)
    assert tuned_text != base_text  # the adapter changes the reply, so the checks below can fail

    body = {"messages": MESSAGES, "temperature": 0, "max_tokens": 12}
    tuned = client.post("/v1/chat/completions", json={**body, "model": "tuned"}).json()
    base = client.post("/v1/chat/completions", json={**body, "model": "tiny"}).json()
    default = client.post("/v1/chat/completions", json=body).json()
    assert (tuned["model"], tuned["choices"][0]["message"]["content"]) == ("tuned", tuned_text)
    assert (base["model"], base["choices"][0]["message"]["content"]) == ("tiny", base_text)
    assert default["choices"][0]["message"]["content"] == base_text

    conversation = client.get(f"/v1/conversations/{tuned['conversation_id']}").json()
    assert conversation["model"] == "tuned"

    prompt = reference.tokenizer.decode(reference.encode_chat(MESSAGES))
    completion = client.post("/v1/completions", json={"model": "tuned", "prompt": prompt, "temperature": 0,
                                                      "max_tokens": 12}).json()  # fmt: skip
    ids = reference.encode_text(prompt)
    want = reference.complete(ids, SamplingParams(12, temperature=0.0), adapter="tuned").text
    assert (completion["model"], completion["choices"][0]["text"]) == ("tuned", want)

    with client.stream("POST", "/v1/chat/completions", json={**body, "model": "tuned", "stream": True}) as response:
        lines = [line for line in response.iter_lines() if line.startswith("data: {")]
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines]
    assert {c["model"] for c in chunks} == {"tuned"}
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) == tuned_text

    unknown = client.post("/v1/chat/completions", json={**body, "model": "nope"})
    assert unknown.status_code == 404
    assert unknown.json()["error"] | {"message": ""} == {
        "message": "", "type": "invalid_request_error", "param": "model", "code": "model_not_found",
    }  # fmt: skip
    assert "'tiny', 'tuned'" in unknown.json()["error"]["message"]


def test_websocket_and_ui_turns_choose_the_model_too(
    make_client: Callable[..., TestClient], new_engine: Callable[..., Engine], adapter_dir: Path
) -> None:
    client = make_client(engine=served(new_engine, adapter_dir))
    reference = served(new_engine, adapter_dir)
    want = expected(reference, "tuned", 10, top_p=0.9, repetition_penalty=1.1)  # the chat defaults
    with client.websocket_connect("/chat/stream") as ws:
        ws.send_json({"message": MESSAGES[0]["content"], "temperature": 0, "max_tokens": 10, "model": "tuned"})
        text = ""
        while (message := ws.receive_json())["type"] in ("start", "token"):
            text += message.get("content", "")
        assert message["type"] == "done" and text == want
        ws.send_json({"message": "hi", "model": "nope"})
        error = ws.receive_json()
        assert error["type"] == "error" and "'nope' does not exist" in error["message"]


def test_serve_settings_load_adapters(tmp_path: Path, adapter_dir: Path, engine: Engine, settings_for: Any) -> None:
    """`mini-claude serve --adapter` / MINI_CLAUDE_ADAPTERS: plain dirs and NAME=DIR, loaded with the model."""
    from mini_claude.checkpoint import save_model_dir
    from mini_claude.server.app import load_engine

    model_dir = save_model_dir(tmp_path / "tiny", engine.model, engine.tokenizer)
    settings = settings_for("sqlite://", model=str(model_dir), quantize="none", dtype="float32",
                            adapters=f"{adapter_dir},support={adapter_dir}")  # fmt: skip
    loaded = load_engine(settings)
    assert loaded.adapters.names == ["tuned", "support"]
    assert expected(loaded, "support") == expected(loaded, "tuned") != expected(loaded, None)


def test_deleting_an_adapter_lets_its_running_requests_finish_first(
    make_live: Callable[..., Any], new_engine: Callable[..., Engine], adapter_dir: Path
) -> None:
    engine = new_engine(eos=False)
    engine.load_adapter(adapter_dir)
    engine.model.register_forward_pre_hook(lambda *_: time.sleep(0.02))  # ~2.4 s for the stream: still running
    reference = new_engine(eos=False)
    reference.load_adapter(adapter_dir)
    server = make_live(engine)
    body = {"model": "tuned", "messages": MESSAGES, "max_tokens": 120, "temperature": 0, "stream": True,
            "store": False}  # fmt: skip
    deleted: dict[str, Any] = {}
    with httpx.Client(base_url=server.url, timeout=120) as client:
        base = client.delete("/v1/models/tiny")
        assert base.status_code == 400 and base.json()["error"]["code"] == "model_not_deletable"
        assert client.delete("/v1/models/nothing").status_code == 404
        with client.stream("POST", "/v1/chat/completions", json=body) as stream:
            lines = stream.iter_lines()
            seen = [next(line for line in lines if '"content":"' in line and '"role"' not in line)]

            def delete() -> None:
                with httpx.Client(base_url=server.url, timeout=120) as other:
                    deleted["response"] = other.delete("/v1/models/tuned")
                    deleted["at"] = time.monotonic()

            deleter = threading.Thread(target=delete)
            deleter.start()
            while "tuned" in [m["id"] for m in client.get("/v1/models").json()["data"]]:
                time.sleep(0.05)  # the removal has begun: the adapter is no longer offered
            assert "response" not in deleted  # ... but it waits for the stream
            refused = client.post("/v1/chat/completions", json={**body, "stream": False})  # new ones: refused
            assert refused.status_code == 404 and refused.json()["error"]["code"] == "model_not_found"
            seen += [line for line in lines if line]
            finished = time.monotonic()
        deleter.join(60)
        assert deleted["response"].status_code == 200 and deleted["response"].json() == {
            "id": "tuned", "object": "model", "deleted": True}  # fmt: skip
        assert deleted["at"] >= finished - 0.5  # the delete waited for the stream
        assert client.delete("/v1/models/tuned").status_code == 404
    text = "".join(
        (json.loads(line[6:])["choices"] or [{}])[0].get("delta", {}).get("content") or ""
        for line in seen if line.startswith("data: {")
    )  # fmt: skip
    assert '"error"' not in "".join(seen) and seen[-1] == "data: [DONE]"
    params = SamplingParams(max_new_tokens=120, temperature=0.0)
    assert text == reference.complete(reference.encode_chat(MESSAGES), params, adapter="tuned").text
    assert "tuned" not in engine.adapters
