"""Conversations stored by the server: memory across requests and restarts, on SQLite and PostgreSQL, with
every message stored exactly once (streamed or not, retried or not), and the conversations API."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient

from mini_claude.chat.memory import ConversationMemory
from mini_claude.db import crud, make_engine, session_scope
from mini_claude.engine import Engine
from mini_claude.generate import SamplingParams

CHAT = "/v1/chat/completions"
SYSTEM = {"role": "system", "content": "You are a pirate."}


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, sqlite_url: str) -> str:
    return sqlite_url if request.param == "sqlite" else request.getfixturevalue("postgres_url")


def count_messages(url: str, conversation_id: str) -> list[tuple[str, str]]:
    engine = make_engine(url)
    try:
        with session_scope(engine) as s:
            return [(m.role, m.content) for m in crud.list_messages(s, conversation_id)]
    finally:
        engine.dispose()


def reply(engine: Engine, messages: list[dict[str, str]], max_tokens: int) -> tuple[str, int]:
    """The engine's greedy reply to a conversation, and the prompt's length."""
    ids = engine.encode_chat(messages)
    return engine.complete(ids, SamplingParams(temperature=0, max_new_tokens=max_tokens)).text, len(ids)


def say(client: TestClient, content: str, conversation_id: str | None = None, **fields: Any) -> dict[str, Any]:
    body = {"messages": [{"role": "user", "content": content}], "temperature": 0, "max_tokens": 8, **fields}
    if conversation_id is not None:
        body["conversation_id"] = conversation_id
    response = client.post(CHAT, json=body)
    assert response.status_code == 200, response.text
    return response.json()


def test_a_conversation_survives_a_restart(
    make_client: Callable[..., TestClient], database_url: str, engine: Engine
) -> None:
    first = make_client(database_url).post(
        CHAT, json={"messages": [SYSTEM, {"role": "user", "content": "Ahoy"}], "temperature": 0, "max_tokens": 8}
    )
    assert first.status_code == 200
    conversation_id = first.json()["conversation_id"]
    assert first.headers["x-conversation-id"] == conversation_id
    answer = first.json()["choices"][0]["message"]["content"]

    restarted = make_client(database_url)  # a new app (new scheduler, new connections) on the same database
    second = say(restarted, "Where is the treasure?", conversation_id)
    history = [SYSTEM, {"role": "user", "content": "Ahoy"}, {"role": "assistant", "content": answer},
               {"role": "user", "content": "Where is the treasure?"}]  # fmt: skip
    text, prompt_tokens = reply(engine, history, 8)
    assert second["usage"]["prompt_tokens"] == prompt_tokens  # the system prompt and the first turn are back
    assert second["choices"][0]["message"]["content"] == text
    stored = count_messages(database_url, conversation_id)
    assert stored == [("user", "Ahoy"), ("assistant", answer), ("user", "Where is the treasure?"), ("assistant", text)]
    detail = restarted.get(f"/v1/conversations/{conversation_id}").json()
    assert detail["system_prompt"] == SYSTEM["content"] and detail["title"] == "Ahoy"
    assert [(m["role"], m["content"]) for m in detail["messages"]] == stored


def test_a_streamed_exchange_is_stored_once(client: TestClient, sqlite_url: str, engine: Engine) -> None:
    body = {"messages": [{"role": "user", "content": "stream me"}], "temperature": 0, "max_tokens": 12,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    response = client.post(CHAT, json=body)
    events = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: {")]
    conversation_id = response.headers["x-conversation-id"]
    assert {e["conversation_id"] for e in events} == {conversation_id}
    streamed = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
    assert streamed == reply(engine, body["messages"], 12)[0]
    assert count_messages(sqlite_url, conversation_id) == [("user", "stream me"), ("assistant", streamed)]


def test_a_retried_request_is_stored_once(client: TestClient, sqlite_url: str) -> None:
    conversation_id = say(client, "start")["conversation_id"]
    body = {"messages": [{"role": "user", "content": "again?"}], "conversation_id": conversation_id,
            "temperature": 0, "max_tokens": 8}  # fmt: skip
    headers = {"Idempotency-Key": "retry-123"}
    first = client.post(CHAT, json=body, headers=headers).json()
    second = client.post(CHAT, json=body, headers=headers).json()  # a retry: the stored answer comes back
    assert first["choices"] == second["choices"] and first["usage"] == second["usage"]
    streamed = client.post(CHAT, json={**body, "stream": True}, headers=headers).text
    events = [json.loads(line[6:]) for line in streamed.splitlines() if line.startswith("data: {")]
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    replayed = "".join(e["choices"][0]["delta"].get("content", "") for e in events)
    assert replayed == first["choices"][0]["message"]["content"]
    stored = count_messages(sqlite_url, conversation_id)
    assert [role for role, _ in stored] == ["user", "assistant", "user", "assistant"]
    client.post(CHAT, json=body)  # no key: a new request, stored anew
    assert len(count_messages(sqlite_url, conversation_id)) == 6


def test_memory_trims_old_turns_to_the_context_and_keeps_the_system_prompt(
    make_client: Callable[..., TestClient], engine: Engine
) -> None:
    client = make_client(memory_max_turns=20)
    system = {"role": "system", "content": "Remember: the password is swordfish."}
    body = {"messages": [system, {"role": "user", "content": "u0 " + "x" * 40}], "temperature": 0, "max_tokens": 8}
    first = client.post(CHAT, json=body).json()
    conversation_id = first["conversation_id"]
    history = [body["messages"][1], {"role": "assistant", "content": first["choices"][0]["message"]["content"]}]
    for i in range(1, 6):  # ~60 tokens per turn: the whole history soon exceeds the 256-token context
        message = {"role": "user", "content": f"u{i} " + "y" * 40}
        answer = say(client, message["content"], conversation_id, max_tokens=16)
        memory = ConversationMemory(system["content"], 20, 256 - 16, lambda m: len(engine.encode_chat(m)))
        for m in [*history, message]:
            memory.add(m["role"], m["content"])
        context = memory.context()
        text, prompt_tokens = reply(engine, context, 16)
        assert answer["usage"]["prompt_tokens"] == prompt_tokens <= 256 - 16
        assert answer["choices"][0]["message"]["content"] == text
        assert context[0] == system and context[-1] == message
        history += [message, {"role": "assistant", "content": text}]
    assert memory.dropped_turns > 0, "the test never needed trimming"
    assert len(client.get(f"/v1/conversations/{conversation_id}").json()["messages"]) == len(history)


def test_store_false_keeps_nothing(client: TestClient) -> None:
    before = client.get("/v1/conversations").json()["data"]
    response = say(client, "off the record", store=False)
    assert response["conversation_id"] is None
    assert client.get("/v1/conversations").json()["data"] == before


def test_conversations_api(client: TestClient) -> None:
    ids = [say(client, f"topic {i}")["conversation_id"] for i in range(3)]
    page = client.get("/v1/conversations?limit=2").json()
    assert page["object"] == "list" and page["has_more"] is True
    assert [c["id"] for c in page["data"]] == ids[::-1][:2]  # most recently active first
    rest = client.get("/v1/conversations?limit=2&offset=2").json()
    assert [c["id"] for c in rest["data"]] == [ids[0]] and rest["has_more"] is False
    say(client, "back to topic 0", ids[0])
    assert client.get("/v1/conversations?limit=1").json()["data"][0]["id"] == ids[0]
    deleted = client.delete(f"/v1/conversations/{ids[1]}")
    assert deleted.json() == {"id": ids[1], "object": "conversation.deleted", "deleted": True}
    assert client.get(f"/v1/conversations/{ids[1]}").status_code == 404
    assert client.delete(f"/v1/conversations/{ids[1]}").status_code == 404
    continued = client.post(CHAT, json={"messages": [{"role": "user", "content": "hi"}], "conversation_id": ids[1]})
    assert continued.status_code == 404


def test_text_the_database_cannot_hold_is_stored_safely(
    make_client: Callable[..., TestClient], database_url: str
) -> None:
    client = make_client(database_url)
    system = {"role": "system", "content": "sys\x00tem"}
    body = {"messages": [system, {"role": "user", "content": "nul \x00 byte"}], "user": "u\x00", "max_tokens": 4}
    response = client.post(CHAT, json=body)
    assert response.status_code == 200, response.text
    conversation_id = response.json()["conversation_id"]
    assert count_messages(database_url, conversation_id)[0] == ("user", "nul \ufffd byte")
    detail = client.get(f"/v1/conversations/{conversation_id}").json()
    assert detail["system_prompt"] == "sys\ufffdtem" and detail["title"] == "nul \ufffd byte"


def test_the_ui_service_contract(client: TestClient, engine: Engine) -> None:
    """`stream_reply` / list / get / delete, as the web UI calls them."""
    import asyncio

    service = client.app.state.service  # type: ignore[attr-defined]

    async def run(**kwargs: Any) -> list[Any]:
        return [event async for event in service.stream_reply(**kwargs)]

    events = asyncio.run(run(message="hello ui", system_prompt="Be kind.", temperature=0, max_tokens=10))
    assert [e.type for e in events[:1] + events[-1:]] == ["start", "done"]
    assert {e.type for e in events[1:-1]} <= {"token"}
    conversation_id = events[0].conversation_id
    assert all(e.conversation_id == conversation_id for e in events)
    text = "".join(e.content for e in events if e.type == "token")
    params = SamplingParams(temperature=0, max_new_tokens=10, top_p=0.9, repetition_penalty=1.1)
    messages = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "hello ui"}]
    ref = engine.complete(engine.encode_chat(messages), params)
    assert text == ref.text and events[-1].finish_reason == ref.finish_reason
    assert events[-1].usage["prompt_tokens"] == ref.prompt_tokens
    assert events[-1].usage["completion_tokens"] == ref.completion_tokens

    listed = service.list_conversations()
    assert listed[0]["id"] == conversation_id and set(listed[0]) >= {"id", "title", "model", "created_at", "updated_at"}
    found = service.get_conversation(conversation_id)
    assert [(m["role"], m["content"]) for m in found["messages"]] == [("user", "hello ui"), ("assistant", text)]
    assert all(m["created_at"] for m in found["messages"])

    bad = asyncio.run(run(message="x", conversation_id="0" * 8, temperature=0))
    assert [e.type for e in bad] == ["error"] and "conversation" in bad[0].content
    assert asyncio.run(run(message="x", temperature=9))[0].type == "error"

    assert service.delete_conversation(conversation_id) is True
    assert service.get_conversation(conversation_id) is None
    assert service.delete_conversation(conversation_id) is False


def test_closing_stream_reply_cancels_and_keeps_the_partial_reply(
    make_client: Callable[..., TestClient], new_engine: Any
) -> None:
    import asyncio
    import time

    client = make_client(engine=new_engine(context=2048, eos=False))
    service = client.app.state.service  # type: ignore[attr-defined]

    async def two_tokens_then_leave() -> tuple[str, str]:
        events = service.stream_reply("tell me everything", max_tokens=2000)
        start = await anext(events)
        tokens = ""
        async for event in events:
            tokens += event.content
            if len(tokens) >= 2:
                break
        await events.aclose()
        return start.conversation_id, tokens

    conversation_id, tokens = asyncio.run(two_tokens_then_leave())
    deadline = time.monotonic() + 30
    while service.scheduler.stats.running:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    messages = service.get_conversation(conversation_id)["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert messages[1]["content"].startswith(tokens) and len(messages[1]["content"]) < 2000


def test_a_retry_racing_its_abandoned_attempt_stores_one_reply(
    make_client: Callable[..., TestClient], database_url: str
) -> None:
    """Under load a client times out and retries (same Idempotency-Key) while its first attempt still runs; that
    attempt's partial reply is stored when its disconnect is noticed, before or after the retry's full reply.
    Either way the conversation holds the user message once and the full reply once."""
    import hashlib

    from mini_claude.server.generation import Job

    client = make_client(database_url)
    service = client.app.state.service  # type: ignore[attr-defined]
    conversation_id = say(client, "start")["conversation_id"]
    for header, partial_first in (("late-partial", False), ("early-partial", True)):
        key = "req-" + hashlib.sha256(header.encode()).hexdigest()[:40]
        abandoned = Job("chatcmpl-first", "tiny", [], [], [], 0, conversation_id=conversation_id, key=key)
        turn = [{"role": "user", "content": header}]
        if partial_first:  # the first attempt stored its turn and was cancelled before the retry came
            service.conversations.store_turns(conversation_id, None, turn, key, None, "tiny")
            service.conversations.store_reply(abandoned, "half a rep", None)
        body = {"messages": turn, "conversation_id": conversation_id, "temperature": 0, "max_tokens": 6}
        full = client.post(CHAT, json=body, headers={"Idempotency-Key": header}).json()
        if not partial_first:
            service.conversations.store_reply(abandoned, "half a rep", None)
        stored = count_messages(database_url, conversation_id)[-2:]
        assert stored == [("user", header), ("assistant", full["choices"][0]["message"]["content"])]
    assert [role for role, _ in count_messages(database_url, conversation_id)] == ["user", "assistant"] * 3


def test_a_cut_off_reply_stays_before_the_next_question(
    make_client: Callable[..., TestClient], database_url: str
) -> None:
    """A client leaves mid-reply and at once asks its next question; the server notices the disconnect only
    after it stored that question. The cut-off reply is stored last but read back in its own turn's place."""
    from mini_claude.server.generation import Job

    client = make_client(database_url)
    store = client.app.state.service.conversations  # type: ignore[attr-defined]
    conversation_id = say(client, "start")["conversation_id"]
    jobs = []
    for n, question in enumerate(("second", "third")):
        conversation, seq = store.store_turns(conversation_id, None, [{"role": "user", "content": question}],
                                              f"turn-{n}", None, "tiny")  # fmt: skip
        assert conversation == conversation_id
        jobs.append(Job(f"chatcmpl-{n}", "tiny", [], [], [], 0, conversation_id=conversation_id,
                        key=f"turn-{n}", reply_seq=seq))  # fmt: skip
    store.store_reply(jobs[1], "the third reply", None)  # the next turn may even finish first
    store.store_reply(jobs[0], "the sec", None)
    assert count_messages(database_url, conversation_id)[2:] == [
        ("user", "second"), ("assistant", "the sec"), ("user", "third"), ("assistant", "the third reply"),
    ]  # fmt: skip
    history = store.load_history(conversation_id, "turn-2")
    assert [m["content"] for m in history.messages][2:] == ["second", "the sec", "third", "the third reply"]
    assert say(client, "fourth", conversation_id)["conversation_id"] == conversation_id  # numbering goes on
    assert [content for _, content in count_messages(database_url, conversation_id)][6] == "fourth"
    db = client.app.state.service.db  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="not reserved"), session_scope(db) as s:
        crud.add_message(s, conversation_id, "assistant", "from nowhere", seq=10_000)


def test_a_turn_that_cannot_be_stored_cancels_its_generation(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reply starts before the user's turn is written (the write overlaps the prefill); when the write
    fails, the client gets the store's error and the started sequence is cancelled, not left running."""
    from mini_claude.server.errors import APIError

    service = client.app.state.service  # type: ignore[attr-defined]
    started: list[Any] = []
    submit = service.generation.submit

    def recording_submit(job: Any) -> Any:
        handles = submit(job)
        started.extend(handles)
        return handles

    def failing_store(*args: Any, **kwargs: Any) -> Any:
        raise APIError(409, "Another request with this idempotency key is in progress.", code="conflict")

    monkeypatch.setattr(service.generation, "submit", recording_submit)
    monkeypatch.setattr(service.conversations, "store_turns", failing_store)
    response = client.post(CHAT, json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 64})
    assert response.status_code == 409, response.text
    assert response.json()["error"]["code"] == "conflict"
    assert len(started) == 1 and started[0].cancelled
