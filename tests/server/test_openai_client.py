"""The server through the official `openai` client, against a real uvicorn: OpenAI's SDK must parse every
response, and every text must be exactly what the engine produces on its own for the same prompt and
parameters (the engine is the reference; the server adds only transport)."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from mini_claude.engine import Completion, Engine
from mini_claude.generate import SamplingParams

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there, who are you?"}]


@pytest.fixture(scope="module")
def client(live: Any) -> OpenAI:
    return OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0, timeout=60)


def alone(engine: Engine, messages: list[dict[str, str]], stop: list[str] = (), **params: Any) -> Completion:  # type: ignore[assignment]
    """What the engine generates for this chat without any server in between."""
    return engine.complete(engine.encode_chat(messages), SamplingParams(**params), stop)


def test_chat_completion_is_the_engine_s_reply(client: OpenAI, engine: Engine) -> None:
    resp = client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=0, max_tokens=20)  # type: ignore[arg-type]
    ref = alone(engine, MESSAGES, temperature=0, max_new_tokens=20)
    assert resp.object == "chat.completion" and resp.model == "tiny" and resp.id.startswith("chatcmpl-")
    assert [c.index for c in resp.choices] == [0]
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content == ref.text
    assert resp.choices[0].finish_reason == ref.finish_reason
    assert resp.usage is not None
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (ref.prompt_tokens, ref.completion_tokens)
    assert resp.usage.total_tokens == ref.prompt_tokens + ref.completion_tokens


@pytest.mark.parametrize("params", [{"temperature": 0}, {"temperature": 1.0, "seed": 7, "top_p": 0.9}])
def test_streamed_text_equals_the_full_response(client: OpenAI, engine: Engine, params: dict[str, Any]) -> None:
    full = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=24, **params)  # type: ignore[arg-type]
    chunks = list(
        client.chat.completions.create(
            model="tiny", messages=MESSAGES, max_tokens=24, stream=True,  # type: ignore[arg-type]
            stream_options={"include_usage": True}, **params,
        )
    )  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    ref = alone(engine, MESSAGES, max_new_tokens=24, **params)
    assert text == ref.text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.model_dump() == full.usage.model_dump()  # type: ignore[union-attr]
    assert all(c.usage is None for c in chunks[:-1])


def test_without_include_usage_no_usage_chunk_and_done_ends_the_stream(live: Any) -> None:
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 5, "stream": True, "temperature": 0}
    with httpx.stream("POST", f"{live.url}/v1/chat/completions", json=body, timeout=30) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-conversation-id"]
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    assert '"usage":{' not in "".join(lines)


def test_n_choices_are_seeded_sequences(client: OpenAI, engine: Engine) -> None:
    resp = client.chat.completions.create(
        model="tiny",
        messages=MESSAGES,
        n=3,
        temperature=1.0,
        seed=5,
        max_tokens=16,  # type: ignore[arg-type]
    )
    refs = [alone(engine, MESSAGES, temperature=1.0, seed=5 + i, max_new_tokens=16) for i in range(3)]
    assert [c.index for c in resp.choices] == [0, 1, 2]
    assert [c.message.content for c in resp.choices] == [r.text for r in refs]
    assert len({r.text for r in refs}) > 1, "different seeds should give different samples"
    assert resp.usage.prompt_tokens == refs[0].prompt_tokens  # type: ignore[union-attr]
    assert resp.usage.completion_tokens == sum(r.completion_tokens for r in refs)  # type: ignore[union-attr]
    streamed = client.chat.completions.create(
        model="tiny",
        messages=MESSAGES,
        n=3,
        temperature=1.0,
        seed=5,
        max_tokens=16,
        stream=True,  # type: ignore[arg-type]
    )
    texts = ["", "", ""]
    for chunk in streamed:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts == [r.text for r in refs]


def test_stop_strings_end_the_text_where_the_engine_does(client: OpenAI, engine: Engine) -> None:
    free = alone(engine, MESSAGES, temperature=0, max_new_tokens=40).text
    stop = free[6:8]
    assert len(stop) == 2
    resp = client.chat.completions.create(
        model="tiny",
        messages=MESSAGES,
        temperature=0,
        max_completion_tokens=40,
        stop=stop,  # type: ignore[arg-type]
    )
    assert resp.choices[0].message.content == free[: free.index(stop)]
    assert resp.choices[0].message.content == alone(engine, MESSAGES, [stop], temperature=0, max_new_tokens=40).text
    assert resp.choices[0].finish_reason == "stop"


def test_extensions_in_extra_body(client: OpenAI, engine: Engine) -> None:
    top1 = client.chat.completions.create(
        model="tiny",
        messages=MESSAGES,
        temperature=1.0,
        seed=3,
        max_tokens=12,
        extra_body={"top_k": 1},  # type: ignore[arg-type]
    )
    assert top1.choices[0].message.content == alone(engine, MESSAGES, temperature=0, max_new_tokens=12).text
    penalized = client.chat.completions.create(
        model="tiny",
        messages=MESSAGES,
        temperature=0,
        max_tokens=30,
        extra_body={"repetition_penalty": 1.5},  # type: ignore[arg-type]
    )
    ref = alone(engine, MESSAGES, temperature=0, max_new_tokens=30, repetition_penalty=1.5)
    assert penalized.choices[0].message.content == ref.text


def test_text_completions(client: OpenAI, engine: Engine) -> None:
    prompt = "Once upon a time"
    ref = engine.complete(engine.encode_text(prompt), SamplingParams(temperature=0, max_new_tokens=10))
    resp = client.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0)
    assert resp.object == "text_completion" and resp.choices[0].text == ref.text
    assert resp.usage.prompt_tokens == ref.prompt_tokens  # type: ignore[union-attr]
    by_ids = client.completions.create(model="tiny", prompt=engine.encode_text(prompt), max_tokens=10, temperature=0)
    assert by_ids.choices[0].text == ref.text
    streamed = client.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == ref.text
    two = client.completions.create(model="tiny", prompt=[prompt, "x"], max_tokens=10, temperature=0, n=2)
    other = engine.complete(engine.encode_text("x"), SamplingParams(temperature=0, max_new_tokens=10))
    assert [c.text for c in two.choices] == [ref.text, ref.text, other.text, other.text]
    assert two.usage.prompt_tokens == ref.prompt_tokens + other.prompt_tokens  # type: ignore[union-attr]


def test_models(client: OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert client.models.retrieve("tiny").owned_by == "mini-claude"
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("gpt-4")
    assert err.value.code == "model_not_found"


def test_errors_reach_the_client_in_openai_shape(client: OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)  # type: ignore[arg-type]
    assert missing.value.code == "model_not_found" and missing.value.param == "model"
    long = [{"role": "user", "content": "word " * 400}]
    with pytest.raises(openai.BadRequestError) as overflow:
        client.chat.completions.create(model="tiny", messages=long)  # type: ignore[arg-type]
    assert overflow.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=3)  # type: ignore[arg-type]
    assert bad.value.param == "temperature" and bad.value.type == "invalid_request_error"


def test_a_conversation_continues_on_the_server(client: OpenAI, engine: Engine) -> None:
    first = client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=0, max_tokens=10)  # type: ignore[arg-type]
    conversation_id = first.conversation_id  # type: ignore[attr-defined]
    assert conversation_id
    follow_up = [{"role": "user", "content": "And then?"}]
    second = client.chat.completions.create(
        model="tiny", messages=follow_up, temperature=0, max_tokens=10,  # type: ignore[arg-type]
        extra_body={"conversation_id": conversation_id},
    )  # fmt: skip
    history = [*MESSAGES, {"role": "assistant", "content": first.choices[0].message.content}, *follow_up]
    ref = alone(engine, history, temperature=0, max_new_tokens=10)  # type: ignore[arg-type]
    assert second.conversation_id == conversation_id  # type: ignore[attr-defined]
    assert second.usage.prompt_tokens == ref.prompt_tokens  # type: ignore[union-attr]
    assert second.choices[0].message.content == ref.text
