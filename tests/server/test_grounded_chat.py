"""Grounded chat end to end on the bundled SmolLM2-135M, over a real uvicorn: `knowledge` in a chat request (by
collection name and by vector store id, through the official `openai` client's `extra_body`), agents with
knowledge, the knowledge tool, streams, the context budget, and bad collections.

A 135M model does not reliably write [n] marks, so what is checked is the shape and the bookkeeping, against
references: the answer equals what the engine writes on its own for the grounded prompt that `rag.grounding`
builds from the same search; every citation names a source that was given, with its exact text; a stream
carries the citations exactly once, on its final chunk; sources that do not fit are reported, never dropped.
The served model gets a 1024-token window, so a budget can be exhausted with a few chunks.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI

from mini_claude.engine import Engine
from mini_claude.generate import SamplingParams
from mini_claude.rag.grounding import ground, marks, merge_hits, search_query, strip_unknown
from mini_claude.rag.rerank import QueryLikelihood

pytestmark = pytest.mark.slow
WINDOW = 1024
SECTION = (
    "## {title}\n\n{title} is a step of making bread. " + "The baker watches the dough, the flour, the water and "
    "the time, because each changes how the loaf turns out. " * 6 + "\n\n"
)
STEPS = ("Mixing", "Kneading", "Proofing", "Shaping", "Scoring", "Baking", "Cooling", "Storing")
BREAD = "# Bread\n\n" + "".join(SECTION.format(title=t) for t in STEPS)
PLANETS = "Planets\n=======\n\nJupiter is the largest planet in the solar system, a gas giant with a red storm.\n"
QUESTION = [{"role": "user", "content": "How long should I knead the dough?"}]


def small_window(engine: Engine) -> Engine:
    engine.model.config = engine.model.config.replace(max_seq_len=WINDOW)
    return engine


@pytest.fixture(scope="module")
def reference(bundled_gguf: Path) -> Engine:
    """Its own copy of the weights (the server's scheduler thread never shares a model with the test)."""
    return small_window(Engine.load(bundled_gguf, dtype="float32", quantize="none"))


@pytest.fixture(scope="module")
def server(
    bundled_gguf: Path, settings_for: Any, serve_app: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Any]:
    from mini_claude.server import create_app

    tmp = tmp_path_factory.mktemp("grounded")
    (tmp / "docs").mkdir()
    (tmp / "docs" / "bread.md").write_text(BREAD)
    engine = small_window(Engine.load(bundled_gguf, dtype="float32", quantize="none", name="smol"))
    app = create_app(settings_for(f"sqlite:///{tmp / 'g.db'}", rag_index_dir=str(tmp / "index")), engine)
    live = serve_app(app)
    report = app.state.service.rag.knowledge.ingest([tmp / "docs"], "kitchen")
    assert report.chunks >= 8
    live.bread = (tmp / "docs" / "bread.md").resolve()  # type: ignore[attr-defined]
    yield live
    live.stop()


@pytest.fixture(scope="module")
def client(server: Any) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=300)


def post(server: Any, **body: Any) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=300)


def check_citations(body: dict[str, Any], content: str, server: Any) -> None:
    """Every citation names a source that was given, quotes its document exactly, and is marked in the text."""
    given = {s["n"]: s for s in body["knowledge"]["sources"]}
    assert set(marks(content)) <= set(given), "an unknown [n] reached the client"
    for c in body["citations"]:
        assert c["n"] in given and c["chunk_id"] == given[c["n"]]["chunk_id"] and c["n"] in marks(content)
        text = Path(c["file_id"]).read_text() if c["file_id"].startswith("/") else None
        if text is not None:
            assert text[c["start_char"] : c["end_char"]].startswith(c["quote"])
    assert [c["n"] for c in body["citations"]] == [n for n in marks(content) if n in given]


def test_a_grounded_answer_is_the_engine_s_answer_to_the_numbered_prompt(server: Any, reference: Engine) -> None:
    resp = post(server, messages=QUESTION, knowledge=["kitchen"], max_tokens=24, temperature=0)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    report = body["knowledge"]
    assert report["collections"] == ["kitchen"] and report["mode"] == "retrieve" and report["left_out"] == []
    assert report["query"] == search_query(QUESTION) and len(report["sources"]) == 4
    assert all(s["file_id"] == str(server.bread) and s["filename"] == "bread.md" for s in report["sources"])

    knowledge = server.app.state.service.rag.knowledge
    found = merge_hits({"kitchen": knowledge.search(report["query"], "kitchen", 4)}, 4)
    grounded = ground(QUESTION, found, count=lambda m: len(reference.encode_chat(m)), budget=WINDOW - 24)
    assert [s["chunk_id"] for s in report["sources"]] == [s.hit.chunk_id for s in grounded.sources]
    assert "Sources:\n[1] (bread.md, Bread > " in grounded.messages[0]["content"]
    ids = reference.encode_chat(grounded.messages)
    expected = reference.complete(ids, SamplingParams(temperature=0, max_new_tokens=24)).text
    content = body["choices"][0]["message"]["content"]
    assert content == strip_unknown(expected, grounded.numbers) and body["usage"]["prompt_tokens"] == len(ids)
    check_citations(body, content, server)
    stored = httpx.get(f"{server.url}/v1/conversations/{body['conversation_id']}").json()["messages"]
    assert [m["content"] for m in stored] == [QUESTION[0]["content"], content]  # the question, not the sources


def test_a_stream_carries_the_citations_once_on_its_final_chunk(server: Any) -> None:
    plain = post(server, messages=QUESTION, knowledge=["kitchen"], max_tokens=24, temperature=0).json()
    chunks = []
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", timeout=300, json={
        "messages": QUESTION, "knowledge": ["kitchen"], "max_tokens": 24, "temperature": 0, "stream": True,
        "stream_options": {"include_usage": True},
    }) as resp:  # fmt: skip
        for line in resp.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line.removeprefix("data: ")))
    with_citations = [i for i, c in enumerate(chunks) if "citations" in c]
    assert with_citations == [len(chunks) - 1], "citations must come once, on the final chunk"
    final = chunks[-1]
    assert final["choices"] == [] and final["usage"]["completion_tokens"] == plain["usage"]["completion_tokens"]
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks[:-1] if c["choices"])
    assert content == plain["choices"][0]["message"]["content"]
    assert final["citations"] == plain["citations"] and final["knowledge"]["sources"] == plain["knowledge"]["sources"]
    check_citations(final, content, server)


def test_chunks_that_do_not_fit_the_budget_are_reported(server: Any) -> None:
    body = post(server, messages=QUESTION, knowledge=["kitchen"], retrieval={"top_k": 16}, max_tokens=16,
                temperature=0).json()  # fmt: skip
    report = body["knowledge"]
    assert report["left_out"] and all(s["n"] is None and s["tokens"] > 0 for s in report["left_out"])
    assert [s["n"] for s in report["sources"]] == list(range(1, len(report["sources"]) + 1))
    assert body["usage"]["prompt_tokens"] + 16 <= WINDOW
    assert len(report["sources"]) + len(report["left_out"]) >= 8  # every chunk found is accounted for
    assert "did not fit the context budget" in report["note"]


def test_a_reranked_request_gets_the_sources_the_model_ranks_best(server: Any, reference: Engine) -> None:
    """`retrieval.rerank`: the server's model reads the first 20 hits on its scheduler thread; the sources are
    those `rag.rerank` picks with the reference engine's scores (the same weights, the same arithmetic)."""
    body = post(server, messages=QUESTION, knowledge=["kitchen"], retrieval={"rerank": True, "top_k": 3},
                max_tokens=4, temperature=0).json()  # fmt: skip
    report = body["knowledge"]
    knowledge = server.app.state.service.rag.knowledge
    model = QueryLikelihood(reference.tokenizer, reference.score)
    expected = knowledge.search(report["query"], "kitchen", 3, reranker=model)
    assert [s["chunk_id"] for s in report["sources"]] == [h.chunk_id for h in expected]
    assert body["choices"][0]["message"]["content"] is not None
    bad = post(server, messages=QUESTION, knowledge=["kitchen"], retrieval={"rerank": "sometimes"}, max_tokens=2)
    assert bad.status_code == 400 and "rerank" in bad.json()["error"]["message"]


def test_the_openai_client_names_a_vector_store_by_id(client: OpenAI, server: Any) -> None:
    store = client.vector_stores.create(name="sky")
    client.vector_stores.files.upload_and_poll(vector_store_id=store.id, file=("planets.rst", PLANETS.encode()))
    answer = client.chat.completions.create(
        model="smol", messages=[{"role": "user", "content": "Which planet is the largest?"}], max_tokens=16,
        temperature=0, extra_body={"knowledge": [store.id, "kitchen"]},
    )  # fmt: skip
    extra = answer.model_extra or {}
    sources = extra["knowledge"]["sources"]
    assert extra["knowledge"]["collections"] == [store.id, "kitchen"]
    assert sources[0]["collection"] == store.id and sources[0]["filename"] == "planets.rst"
    assert {s["collection"] for s in sources} <= {store.id, "kitchen"}
    assert set(marks(answer.choices[0].message.content or "")) <= {s["n"] for s in sources}
    assert all(c["n"] in {s["n"] for s in sources} for c in extra["citations"])
    plain = client.chat.completions.create(model="smol", messages=QUESTION, max_tokens=2)
    assert "citations" not in (plain.model_extra or {}) and "knowledge" not in (plain.model_extra or {})


def test_an_unknown_collection_is_a_400_in_openai_s_shape(client: OpenAI, server: Any) -> None:
    resp = post(server, messages=QUESTION, knowledge=["kitchen", "nope"], max_tokens=4)
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert error["param"] == "knowledge" and error["code"] == "collection_not_found" and "'nope'" in error["message"]
    assert error["type"] == "invalid_request_error" and "'kitchen'" not in error["message"]
    bad = post(server, messages=QUESTION, knowledge="kitchen", max_tokens=4)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "knowledge"
    import openai

    with pytest.raises(openai.BadRequestError, match="nope"):
        client.chat.completions.create(model="smol", messages=QUESTION, extra_body={"knowledge": ["nope"]})


def test_an_agent_with_knowledge_grounds_and_a_missing_collection_is_named(server: Any) -> None:
    agent = {"name": "baker", "system": "You are a baker.", "knowledge": ["kitchen"],
             "retrieval": {"top_k": 2, "citations": "required"}}  # fmt: skip
    assert httpx.post(f"{server.url}/v1/agents", json=agent).status_code == 200
    body = post(server, model="baker", messages=QUESTION, max_tokens=12, temperature=0).json()
    assert body["model"] == "baker" and len(body["knowledge"]["sources"]) == 2
    check_citations(body, body["choices"][0]["message"]["content"], server)
    off = post(server, model="baker", messages=QUESTION, max_tokens=2, retrieval={"mode": "off"}).json()
    assert "knowledge" not in off  # the request's settings win over the agent's
    agent = {"name": "lost", "knowledge": ["gone"]}
    assert httpx.post(f"{server.url}/v1/agents", json=agent).status_code == 200
    resp = post(server, model="lost", messages=QUESTION, max_tokens=2)
    assert resp.status_code == 400 and "'gone'" in resp.json()["error"]["message"]


def test_the_knowledge_tool_searches_then_answers_with_citations(server: Any) -> None:
    """`tool_choice: required`: the model must call `search_knowledge` (the grammar holds it to a valid call),
    the server runs the search with the model's own query, and the answer is grounded in its results."""
    agent = {"name": "librarian", "knowledge": ["kitchen"],
             "retrieval": {"mode": "tool", "tool_choice": "required", "top_k": 2}}  # fmt: skip
    assert httpx.post(f"{server.url}/v1/agents", json=agent).status_code == 200
    body = post(server, model="librarian", messages=QUESTION, max_tokens=16, temperature=0).json()
    report = body["knowledge"]
    assert report["mode"] == "tool" and isinstance(report["query"], str) and report["query"].strip()
    assert 1 <= len(report["sources"]) <= 2 and report["left_out"] == []
    content = body["choices"][0]["message"]["content"]
    assert "<tool_call>" not in content and body["choices"][0]["finish_reason"] in ("stop", "length")
    check_citations(body, content, server)
    streamed = []
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", timeout=300, json={
        "model": "librarian", "messages": QUESTION, "max_tokens": 16, "temperature": 0, "stream": True,
    }) as resp:  # fmt: skip
        streamed = [json.loads(line[6:]) for line in resp.iter_lines() if line.startswith("data: {")]
    assert [i for i, c in enumerate(streamed) if "citations" in c] == [len(streamed) - 1]
    assert streamed[-1]["knowledge"]["query"] == report["query"]
