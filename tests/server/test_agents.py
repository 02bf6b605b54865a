"""Agents: `/v1/agents` CRUD, invalid definitions as 400s that name the field, `agents/NAME.yaml` loaded at
start, and `model: NAME` in chat, completions and speech, with the merge rule request > agent > server.

The reference for every generated text is the engine itself, given the prompt the agent should produce (its
system prompt, then its few-shots, then the conversation) and its sampling values; an agent on an upstream
is checked against what an echoing fake upstream received.
"""

from __future__ import annotations

import asyncio
import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from mini_claude.agents import Retrieval
from mini_claude.engine import Engine
from mini_claude.generate import SamplingParams
from mini_claude.lora import LoRAConfig, apply_lora, save_adapter
from mini_claude.server.agents import Grounding

SYSTEM = "You are Ada, a terse helper."
FEW_SHOTS = [{"role": "user", "content": "Ping?"}, {"role": "assistant", "content": "Pong."}]
AGENT = {"name": "ada", "description": "test agent", "adapter": "tuned", "system": SYSTEM, "messages": FEW_SHOTS,
         "params": {"temperature": 0, "max_tokens": 7}, "voice": {"voice": "hibari:heart", "speed": 1.25}}  # fmt: skip
YAML = """\
FROM: tiny
SYSTEM: You answer in one word.
PARAMETER:
  num_predict: 5
  temperature: 0
  repeat_penalty: 1.3
MESSAGE:
  - role: user
    content: Colour of the sky?
  - role: assistant
    content: Blue.
"""
SKY = [{"role": "user", "content": "Colour of the sky?"}, {"role": "assistant", "content": "Blue."}]


def echo_app() -> FastAPI:
    """An upstream whose reply is the JSON body it received."""
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> dict[str, Any]:
        body = await request.json()
        message = {"role": "assistant", "content": json.dumps(body)}
        usage = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
        return {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "message": message, "finish_reason": "stop"}], "usage": usage}  # fmt: skip

    return app


@pytest.fixture(scope="module")
def served(engine: Engine, new_engine: Any, tmp_path_factory: pytest.TempPathFactory) -> Engine:
    """The tiny engine with a random adapter `tuned` on it (the reference, and a copy is served)."""
    model = apply_lora(copy.deepcopy(engine.model), LoRAConfig(r=4, alpha=8, init_lora_weights=False))
    path = save_adapter(model, tmp_path_factory.mktemp("runs") / "tuned" / "adapter", base_model_name="tiny")
    reference = new_engine()
    reference.load_adapter(path)
    reference.adapter_path = path  # type: ignore[attr-defined]
    return reference


@pytest.fixture(scope="module")
def client(
    served: Engine, new_engine: Any, settings_for: Any, serve_app: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TestClient]:
    from mini_claude.server import create_app

    root = tmp_path_factory.mktemp("agents")
    (root / "agents").mkdir()
    (root / "agents" / "oneword.yaml").write_text(YAML)
    (root / "agents" / "broken.yaml").write_text("FROM: tiny\nPARAMETER: {temperature: 9}\n")
    echo = serve_app(echo_app())
    engine = new_engine()
    engine.load_adapter(served.adapter_path)  # type: ignore[attr-defined]
    settings = settings_for(f"sqlite:///{root / 'agents.db'}", agents_dir=str(root / "agents"),
                            upstreams=[{"name": "echo", "base_url": f"{echo.url}/v1", "models": ["m"]}])  # fmt: skip
    with TestClient(create_app(settings, engine)) as test_client:
        yield test_client
    echo.stop()


def reference(engine: Engine, messages: list[dict[str, str]], adapter: str | None = None, **params: Any) -> str:
    return engine.complete(engine.encode_chat(messages), SamplingParams(**params), adapter=adapter).text


def chat(client: TestClient, **body: Any) -> dict[str, Any]:
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def test_crud(client: TestClient) -> None:
    created = client.post("/v1/agents", json=AGENT)
    assert created.status_code == 200, created.text
    body = created.json()
    assert body["object"] == "agent" and body["name"] == "ada" and body["params"]["max_tokens"] == 7
    assert client.post("/v1/agents", json=AGENT).status_code == 409
    assert "ada" in [a["name"] for a in client.get("/v1/agents").json()["data"]]
    assert client.get("/v1/agents/ada").json()["messages"] == FEW_SHOTS
    changed = client.post("/v1/agents/ada", json={"description": "changed"}).json()
    assert changed["description"] == "changed" and changed["system"] == SYSTEM
    temp = client.post("/v1/agents", json={"name": "temp"})
    assert temp.status_code == 200
    assert client.delete("/v1/agents/temp").json() == {"id": "temp", "object": "agent.deleted", "deleted": True}
    missing = client.get("/v1/agents/temp")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "agent_not_found"


@pytest.mark.parametrize(
    ("definition", "param", "words"),
    [
        ({"name": "a", "params": {"temperature": 3}}, "params.temperature", "less than or equal to 2"),
        ({"name": "a", "tempurature": 1}, "tempurature", "Extra inputs are not permitted"),
        ({"name": "a", "template": "{{ .Prompt }}"}, "template", "chat template"),
        ({"name": "a/b"}, "name", "should match pattern"),
        ({"name": "a", "model": "nope"}, "model", "this server serves"),
        ({"name": "a", "model": "other/m"}, "model", "no upstream is named 'other'"),
        ({"name": "a", "adapter": "nope"}, "adapter", "no adapter 'nope'"),
        ({"name": "a", "model": "echo/m", "adapter": "tuned"}, None, "upstream model cannot take a local LoRA"),
        ({"name": "tiny"}, "name", "already a served model"),
        ({"name": "a", "knowledge": ["ok", "bad name!"]}, "knowledge", "not a collection id"),
    ],
)
def test_invalid_definitions_are_400s_naming_the_field(
    client: TestClient, definition: dict[str, Any], param: str | None, words: str
) -> None:
    response = client.post("/v1/agents", json=definition)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert words in error["message"]
    if param is not None:
        assert error["param"] == param


def test_chat_with_an_agent_is_its_prompt_on_its_adapter(client: TestClient, served: Engine) -> None:
    client.post("/v1/agents", json=AGENT)
    user = [{"role": "user", "content": "Who are you?"}]
    resp = chat(client, model="ada", messages=user)
    prompt = [{"role": "system", "content": SYSTEM}, *FEW_SHOTS, *user]
    assert resp["model"] == "ada"
    assert resp["choices"][0]["message"]["content"] == reference(served, prompt, "tuned", temperature=0,
                                                                 max_new_tokens=7)  # fmt: skip
    assert resp["usage"]["prompt_tokens"] == len(served.encode_chat(prompt))

    # The request wins over the agent (max_tokens), and its system message is added after the agent's.
    mine = [{"role": "system", "content": "Answer in French."}, *user]
    resp = chat(client, model="ada", messages=mine, max_tokens=3)
    prompt = [{"role": "system", "content": f"{SYSTEM}\n\nAnswer in French."}, *FEW_SHOTS, *user]
    assert resp["choices"][0]["message"]["content"] == reference(served, prompt, "tuned", temperature=0,
                                                                 max_new_tokens=3)  # fmt: skip

    # A stored conversation keeps the agent's framing on every turn.
    conversation_id = chat(client, model="ada", messages=user)["conversation_id"]
    nxt = [{"role": "user", "content": "And?"}]
    first = client.get(f"/v1/conversations/{conversation_id}").json()["messages"]
    resp = chat(client, model="ada", messages=nxt, conversation_id=conversation_id)
    history = [{"role": m["role"], "content": m["content"]} for m in first]
    prompt = [{"role": "system", "content": SYSTEM}, *FEW_SHOTS, *history, *nxt]
    assert resp["choices"][0]["message"]["content"] == reference(served, prompt, "tuned", temperature=0,
                                                                 max_new_tokens=7)  # fmt: skip


def test_completions_take_the_agent_s_adapter_and_sampling(client: TestClient, served: Engine) -> None:
    client.post("/v1/agents", json=AGENT)
    resp = client.post("/v1/completions", json={"model": "ada", "prompt": "Once upon"}).json()
    ids = served.encode_text("Once upon")
    expected = served.complete(ids, SamplingParams(temperature=0, max_new_tokens=7), adapter="tuned").text
    assert resp["model"] == "ada" and resp["choices"][0]["text"] == expected


def test_agents_are_models_and_yaml_files_are_loaded(client: TestClient, served: Engine) -> None:
    client.post("/v1/agents", json=AGENT)
    cards = {c["id"]: c for c in client.get("/v1/models").json()["data"]}
    assert cards["ada"]["owned_by"] == "agent" and cards["ada"]["parent"] == "tuned"
    assert cards["echo/m"]["owned_by"] == "echo"
    loaded = client.get("/v1/agents/oneword").json()
    assert loaded["model"] == "tiny" and loaded["source"].endswith("oneword.yaml")
    assert loaded["params"] == {"temperature": 0.0, "max_tokens": 5, "repetition_penalty": 1.3, "top_p": None,
                                "top_k": None, "seed": None, "stop": None}  # fmt: skip
    assert client.get("/v1/agents/broken").status_code == 404  # logged and skipped, never half-loaded
    user = [{"role": "user", "content": "Colour of grass?"}]
    prompt = [{"role": "system", "content": "You answer in one word."}, *SKY, *user]
    resp = chat(client, model="oneword", messages=user)
    assert resp["choices"][0]["message"]["content"] == reference(served, prompt, temperature=0, max_new_tokens=5,
                                                                 repetition_penalty=1.3)  # fmt: skip


def test_the_knowledge_hook_grounds_the_prompt(client: TestClient, served: Engine) -> None:
    service = client.app.state.service  # type: ignore[attr-defined]
    seen: list[tuple[list[str], str, int | None]] = []

    class Sources:
        async def ground(self, collections: list[str], retrieval: Retrieval, messages: list[dict[str, str]],
                         count: Any = None, budget: int | None = None,
                         adapter: str | None = None) -> Grounding:  # fmt: skip
            assert adapter is None  # the agent answers with the base model, so its reranker would too
            seen.append((collections, retrieval.citations, budget))
            return Grounding([{"role": "system", "content": "[1] The grass is green."}, *messages[1:]])

    agent = {"name": "grassy", "model": "tiny", "system": "You answer in one word.", "messages": SKY,
             "params": {"temperature": 0, "max_tokens": 5, "repetition_penalty": 1.3}, "knowledge": ["docs"],
             "retrieval": {"citations": "required"}}  # fmt: skip
    assert client.post("/v1/agents", json=agent).status_code == 200
    default, service.knowledge = service.knowledge, Sources()
    try:
        user = [{"role": "user", "content": "Colour of grass?"}]
        resp = chat(client, model="grassy", messages=user)
    finally:
        service.knowledge = default
    assert seen == [(["docs"], "required", served.context_window - 5)]
    prompt = [{"role": "system", "content": "[1] The grass is green."}, *SKY, *user]
    assert resp["choices"][0]["message"]["content"] == reference(served, prompt, temperature=0, max_new_tokens=5,
                                                                 repetition_penalty=1.3)  # fmt: skip
    assert resp["knowledge"]["sources"] == [] and resp["citations"] == []


def test_an_agent_on_an_upstream_sends_its_prompt_and_defaults(client: TestClient) -> None:
    agent = {"name": "remote", "model": "echo/m", "system": "S", "messages": FEW_SHOTS,
             "params": {"temperature": 0.3, "max_tokens": 9, "stop": ["\n\n"]}}  # fmt: skip
    assert client.post("/v1/agents", json=agent).status_code == 200
    resp = chat(client, model="remote", messages=[{"role": "user", "content": "hi"}], top_p=0.5)
    sent = json.loads(resp["choices"][0]["message"]["content"])
    assert resp["model"] == "remote"
    assert sent["model"] == "m" and sent["messages"] == [{"role": "system", "content": "S"}, *FEW_SHOTS,
                                                         {"role": "user", "content": "hi"}]  # fmt: skip
    assert (sent["temperature"], sent["max_tokens"], sent["stop"], sent["top_p"]) == (0.3, 9, ["\n\n"], 0.5)
    assert "conversation_id" not in sent and "store" not in sent


def test_speech_uses_the_agent_s_voice_unless_the_request_names_one(client: TestClient) -> None:
    client.post("/v1/agents", json=AGENT)
    service = client.app.state.service  # type: ignore[attr-defined]
    from mini_claude.server.protocol.audio import SpeechRequest

    async def resolved(body: dict[str, Any]) -> SpeechRequest:
        return await service.audio._with_agent(SpeechRequest.model_validate(body))

    by_agent = asyncio.run(resolved({"model": "ada", "input": "Hi."}))
    assert (by_agent.voice, by_agent.speed, by_agent.model) == ("hibari:heart", 1.25, None)
    mine = asyncio.run(resolved({"model": "ada", "input": "Hi.", "voice": "espeak-ng:en-us", "speed": 2}))
    assert (mine.voice, mine.speed) == ("espeak-ng:en-us", 2)
    no_voice = client.post("/v1/audio/speech", json={"model": "tts-1", "input": "Hi."})
    assert no_voice.status_code == 400 and no_voice.json()["error"]["param"] == "voice"
    assert service.agent_voice("ada") == "hibari:heart" and service.agent_voice("tiny") is None


def test_an_agent_whose_adapter_is_gone_is_a_clear_400(client: TestClient, tmp_path: Path) -> None:
    from mini_claude.db import crud, session_scope

    service = client.app.state.service  # type: ignore[attr-defined]
    with session_scope(service.db) as s:  # stored by a server that had the adapter
        crud.put_agent(s, "stale", {"name": "stale", "adapter": "gone"})
    response = client.post(
        "/v1/chat/completions", json={"model": "stale", "messages": [{"role": "user", "content": "x"}]}
    )
    assert response.status_code == 400 and response.json()["error"]["code"] == "agent_unavailable"
    assert "no adapter 'gone'" in response.json()["error"]["message"]


def test_the_ui_picker_lists_agents_and_its_chat_turn_uses_them(client: TestClient, served: Engine) -> None:
    client.post("/v1/agents", json=AGENT)
    service = client.app.state.service  # type: ignore[attr-defined]
    assert {"tiny", "tuned", "echo/m", "ada", "oneword"} <= set(service.model_ids)

    async def turn() -> list[Any]:
        return [e async for e in service.stream_reply("Who are you?", model="ada", max_tokens=5)]

    events = asyncio.run(turn())
    prompt = [{"role": "system", "content": SYSTEM}, *FEW_SHOTS, {"role": "user", "content": "Who are you?"}]
    text = "".join(e.content for e in events if e.type == "token")
    # The UI's own defaults (top_p 0.9, repetition penalty 1.1) apply where neither the turn nor the agent says.
    assert text == reference(served, prompt, "tuned", temperature=0, max_new_tokens=5, top_p=0.9,
                             repetition_penalty=1.1)  # fmt: skip
    assert events[-1].type == "done"
