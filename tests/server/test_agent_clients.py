"""Real clients against `mini-claude serve` on the bundled SmolLM2-135M: the `openai` SDK (`parse`, tools,
streamed tools), LangChain's `ChatOpenAI` (`bind_tools`, `with_structured_output`), a pydantic-ai agent's
tool loop to its final answer, and lm-evaluation-harness's `local-completions` on a loglikelihood task read
from a local file, whose scores must equal lm-eval's own HF backend on the same GGUF.

One server per module (float32, so its dense path computes what `transformers` computes on any CPU); every
request is greedy with a small token budget. Constrained decoding is what makes a 135M model's replies parse.
"""

from __future__ import annotations

import copy
import json
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
import yaml
from pydantic import BaseModel, Field

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"


class Server:
    """`mini-claude serve` on the bundled model's dense float32 weights: lm-eval's HF backend reads the same GGUF
    dequantized, so its scores can be compared within float32 rounding (the int4 kernels quantize activations)."""

    def __init__(self, tmp: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("MINI_CLAUDE_") or "KERNELS" in k}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mini_claude", "serve", "--port", str(self.port), "--dtype", "float32",
             "--quantize", "none", "--database-url", f"sqlite:///{tmp / 'serve.db'}", "--log-level", "warning"],
            env=env | {"MINI_CLAUDE_UI": "false"}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                if httpx.get(self.url + "/health", timeout=2).json().get("status") == "healthy":
                    return
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(1)
        self.stop()
        raise RuntimeError(f"mini-claude serve did not start: {self.proc.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = Server(tmp_path_factory.mktemp("serve"))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=300)


class City(BaseModel):
    name: str = Field(max_length=12)
    country: str = Field(max_length=12)
    population_millions: int = Field(ge=0, le=100)  # a float could take decimals to the budget


WEATHER = {
    "type": "function",
    "function": {"name": "get_weather", "description": "Get the current weather in a city.",
                 "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
                                "required": ["city"], "additionalProperties": False}},
}  # fmt: skip
ASK = [{"role": "user", "content": "What is the weather like in Paris?"}]


def test_openai_parse_returns_a_pydantic_object(client: openai.OpenAI) -> None:
    r = client.chat.completions.parse(
        model=MODEL, messages=[{"role": "user", "content": "Describe Paris as JSON."}], response_format=City,
        max_tokens=120, temperature=0,
    )  # fmt: skip
    assert isinstance(r.choices[0].message.parsed, City)


def test_openai_tools_and_streamed_tools(client: openai.OpenAI) -> None:
    # one call: with parallel calls allowed, greedy SmolLM2 keeps repeating the call until max_tokens
    kwargs = dict(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="required", parallel_tool_calls=False,
                  max_tokens=120, temperature=0)  # fmt: skip
    full = client.chat.completions.create(**kwargs)  # type: ignore[call-overload]
    call = full.choices[0].message.tool_calls[0]
    assert full.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    assert isinstance(json.loads(call.function.arguments)["city"], str)
    args = "".join(tc.function.arguments or "" for chunk in client.chat.completions.create(stream=True, **kwargs)
                   for ch in chunk.choices for tc in ch.delta.tool_calls or [])  # type: ignore[call-overload]  # fmt: skip
    assert args == call.function.arguments


def test_langchain_bind_tools_and_structured_output(server: Server) -> None:
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def get_weather(city: str) -> str:
        """Get the current weather in a city."""
        return "sunny"

    llm = ChatOpenAI(model=MODEL, base_url=server.url + "/v1", api_key="none", temperature=0, max_tokens=120,
                     max_retries=0)  # type: ignore[arg-type]  # fmt: skip
    reply = llm.bind_tools([get_weather], tool_choice="get_weather").invoke("What is the weather in Paris?")
    assert reply.tool_calls and reply.tool_calls[0]["name"] == "get_weather"  # type: ignore[attr-defined]
    assert isinstance(reply.tool_calls[0]["args"]["city"], str)  # type: ignore[attr-defined]
    city = llm.with_structured_output(City).invoke("Describe Paris as JSON.")
    assert isinstance(city, City)


def test_pydantic_ai_runs_a_tool_loop_to_its_answer(server: Server) -> None:
    """The agent must call a tool every turn (its answer is an output tool): it calls `get_weather`, gets the
    result back as a `tool` message, and ends by calling `final_result` with an object that validates."""
    from pydantic_ai import Agent
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider

    class Answer(BaseModel):
        summary: str = Field(max_length=40)

    calls: list[str] = []
    model = OpenAIChatModel(MODEL, provider=OpenAIProvider(base_url=server.url + "/v1", api_key="none"))
    agent = Agent(model, output_type=Answer, model_settings={"temperature": 0, "max_tokens": 120},
                  system_prompt="First call get_weather, then give the final result.")  # fmt: skip

    @agent.tool_plain
    def get_weather(city: str) -> str:
        """Get the current weather in a city."""
        calls.append(city)
        return f"It is sunny in {city}."

    result = agent.run_sync("What is the weather in Paris?")
    assert isinstance(result.output, Answer)
    kinds = [p.part_kind for m in result.all_messages() for p in m.parts]
    assert "tool-call" in kinds and "tool-return" in kinds


def write_task(root: Path) -> str:
    """A loglikelihood (multiple-choice) task from chatterbot-corpus questions: the right answer among two
    answers to other questions of the same file."""
    import chatterbot_corpus

    corpus = Path(chatterbot_corpus.__file__).parent / "data" / "english" / "science.yml"
    pairs = [(c[0], c[1]) for c in yaml.safe_load(corpus.read_text())["conversations"] if len(c) >= 2][:6]
    rows = []
    for i, (question, answer) in enumerate(pairs):
        others = [pairs[(i + k) % len(pairs)][1] for k in (1, 2)]
        rows.append({"question": question, "choices": [answer, *others], "label": 0})
    data = root / "science.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = {
        "task": "chatterbot_science", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "Question: {{question}}\nAnswer:",
        "doc_to_choice": "{{choices}}", "doc_to_target": "{{label}}", "metric_list": [{"metric": "acc"}],
    }  # fmt: skip
    (root / "chatterbot_science.yaml").write_text(yaml.safe_dump(task))
    return task["task"]  # type: ignore[return-value]


def test_lm_eval_local_completions_matches_its_hf_backend(server: Server, tmp_path: Path, hf_bundled: Any) -> None:
    """`hf_bundled` is `transformers` loading the GGUF as lm-eval's `hf` backend would (`from_pretrained` with
    `gguf_file`, float32), once a session: that load takes 1-2 minutes here, and test_bundled.py needs it too."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    hf_model, hf_tokenizer = hf_bundled
    tokenizer_dir = tmp_path / "tokenizer"
    hf_tokenizer.save_pretrained(tokenizer_dir)
    name = write_task(tmp_path)
    tasks = TaskManager(include_path=str(tmp_path))

    def run(model: Any, args: str | None = None) -> list[float]:
        out = lm_eval.simple_evaluate(model=model, model_args=args, tasks=[name], task_manager=tasks,
                                      log_samples=True, batch_size=1)  # fmt: skip
        return [r[0] for s in out["samples"][name] for r in s["filtered_resps"]]  # type: ignore[index]

    ours = run("local-completions", f"model={MODEL},base_url={server.url}/v1/completions,tokenizer={tokenizer_dir},"
               "tokenized_requests=True,num_concurrent=1,max_retries=1")  # fmt: skip
    # lm-eval may give the tokenizer a pad token: a copy keeps the session's one as loaded
    theirs = run(HFLM(pretrained=hf_model, tokenizer=copy.deepcopy(hf_tokenizer), batch_size=1, device="cpu"))
    assert len(ours) == len(theirs) == 18
    assert ours == pytest.approx(theirs, abs=2e-3)
