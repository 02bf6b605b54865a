"""Tools, structured outputs and log-probabilities over HTTP, driven by the `openai` client against one live
server on the tiny random model: whatever gibberish it prefers, the grammar keeps replies valid."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import jsonschema
import openai
import pytest
import torch

from mini_claude.engine import Engine
from mini_claude.server import create_app
from server.conftest import LiveServer, app_settings, tiny_engine

CONTEXT = 2048  # the byte-level tiny tokenizer spends a token per character of the tool prompt

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "additionalProperties": False, "required": ["city"],
                       "properties": {"city": {"enum": ["Paris", "Oslo"]}, "days": {"type": "integer", "minimum": 1,
                                                                                   "maximum": 7}}},
    },
}  # fmt: skip
NO_ARGS = {"type": "object", "properties": {}, "additionalProperties": False}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": NO_ARGS}}
MESSAGES = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture(scope="module")
def engine() -> Engine:
    return tiny_engine(CONTEXT)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    db = tmp_path_factory.mktemp("live") / "live.db"
    server = LiveServer(create_app(app_settings(f"sqlite:///{db}"), tiny_engine(CONTEXT)))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(live: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=live.url + "/v1", api_key="none", max_retries=0)


def test_json_schema_reply_validates(client: openai.OpenAI) -> None:
    schema = {"type": "object", "additionalProperties": False, "required": ["answer", "sure"],
              "properties": {"answer": {"enum": ["yes", "no"]}, "sure": {"type": "boolean"}}}  # fmt: skip
    for seed in range(3):
        r = client.chat.completions.create(
            model="tiny", messages=MESSAGES, max_tokens=40, seed=seed, temperature=1.0,
            response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema, "strict": True}},
        )  # fmt: skip
        jsonschema.validate(json.loads(r.choices[0].message.content or ""), schema)


def test_json_object_reply_is_an_object(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=30, seed=0, temperature=0,
                                       response_format={"type": "json_object"})  # fmt: skip
    assert r.choices[0].message.content.startswith("{")  # type: ignore[union-attr]


def test_unsupported_schema_is_a_400_naming_it(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="tiny", messages=MESSAGES, max_tokens=5,
            response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": {"$ref": "http://x.org/s"}}},
        )  # fmt: skip
    error = info.value.body
    assert error["code"] == "unsupported_schema" and "http://x.org/s" in error["message"]  # type: ignore[index]
    assert error["param"] == "response_format.json_schema.schema"  # type: ignore[index]


def test_required_tool_call_validates(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, tools=[WEATHER, TIME], tool_choice="required",
                                       parallel_tool_calls=False, max_tokens=120, seed=1, temperature=1.0)  # fmt: skip
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls or []) == 1
    call = choice.message.tool_calls[0]  # type: ignore[index]
    assert call.id.startswith("call_") and call.function.name in ("get_weather", "get_time")
    params = (WEATHER if call.function.name == "get_weather" else TIME)["function"]["parameters"]
    jsonschema.validate(json.loads(call.function.arguments), params)  # type: ignore[arg-type]


def test_streamed_tool_call_equals_the_full_one(client: openai.OpenAI) -> None:
    """Deltas in OpenAI's shape (index, id and name first, then argument fragments) add up to the full reply."""
    kwargs = dict(model="tiny", messages=MESSAGES, tools=[WEATHER], tool_choice={"type": "function", "function":
                  {"name": "get_weather"}}, max_tokens=120, seed=2, temperature=1.0)  # fmt: skip
    full = client.chat.completions.create(**kwargs).choices[0]  # type: ignore[call-overload]
    name, args, ids, finish = None, "", set(), None
    for chunk in client.chat.completions.create(stream=True, **kwargs):  # type: ignore[call-overload]
        for d in chunk.choices:
            for tc in d.delta.tool_calls or []:
                assert tc.index == 0
                ids.add(tc.id) if tc.id else None
                name = tc.function.name or name
                args += tc.function.arguments or ""
            finish = d.finish_reason or finish
    assert finish == "tool_calls" == full.finish_reason and len(ids) == 1
    assert name == "get_weather" and args == full.message.tool_calls[0].function.arguments  # type: ignore[index]
    jsonschema.validate(json.loads(args), WEATHER["function"]["parameters"])  # type: ignore[index]


def test_tool_results_are_accepted_back(client: openai.OpenAI) -> None:
    messages = [
        *MESSAGES,
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"sky": "sunny"}'},
    ]  # fmt: skip
    r = client.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER], tool_choice="none",
                                       max_tokens=5, seed=0)  # type: ignore[arg-type]  # fmt: skip
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason in ("stop", "length")


def test_chat_logprobs_match_the_engine(client: openai.OpenAI, engine: Engine) -> None:
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=6, temperature=0, logprobs=True,
                                       top_logprobs=3)  # fmt: skip
    content = r.choices[0].logprobs.content  # type: ignore[union-attr]
    assert len(content) == r.usage.completion_tokens and all(len(c.top_logprobs) == 3 for c in content)  # type: ignore[union-attr]
    assert all(c.logprob == c.top_logprobs[0].logprob for c in content)  # greedy: the likeliest token each time
    text = b"".join(bytes(c.bytes or []) for c in content).decode("utf-8", "replace")
    assert text == r.choices[0].message.content
    streamed = [
        e.logprob
        for chunk in client.chat.completions.create(
            model="tiny", messages=MESSAGES, max_tokens=6, temperature=0, logprobs=True, stream=True
        )
        for ch in chunk.choices
        if ch.logprobs
        for e in ch.logprobs.content or []
    ]
    assert streamed == [c.logprob for c in content]


def test_echo_scores_the_prompt_as_a_dense_forward(live: LiveServer, engine: Engine) -> None:
    """`echo` + `logprobs` with `max_tokens` 0 (lm-evaluation-harness's loglikelihood request)."""
    ids = engine.encode_text("The cat sat on the mat.")
    body = {"model": "tiny", "prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 2, "temperature": 0}
    r = httpx.post(live.url + "/v1/completions", json=body, timeout=60).json()
    lp = r["choices"][0]["logprobs"]
    assert r["choices"][0]["text"] == engine.tokenizer.decode(ids) and r["usage"]["completion_tokens"] == 0
    with torch.inference_mode():
        logp = torch.log_softmax(engine.model(torch.tensor([ids]))[0].float(), -1)
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    expected = logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].tolist()
    assert lp["token_logprobs"][1:] == pytest.approx(expected, abs=1e-5)
    assert len(lp["tokens"]) == len(ids) and all(len(t) <= 2 for t in lp["top_logprobs"][1:])
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])

    body |= {"max_tokens": 1}  # what lm-eval sends: the prompt's scores, then one generated token's
    r = httpx.post(live.url + "/v1/completions", json=body, timeout=60).json()
    assert r["choices"][0]["logprobs"]["token_logprobs"][1 : len(ids)] == pytest.approx(expected, abs=1e-5)
    assert len(r["choices"][0]["logprobs"]["tokens"]) == len(ids) + 1  # the sampled token, even an end token


def test_max_tokens_zero_needs_echo(live: LiveServer) -> None:
    r = httpx.post(live.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 0}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
