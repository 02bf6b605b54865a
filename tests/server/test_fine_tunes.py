"""`/v1/fine-tunes`: real background jobs (a `mini-claude finetune` child process on a tiny model dir),
persisted in SQLite and PostgreSQL, whose adapters are served without a restart and again after one.

Each job trains a few steps of a 2-layer model, so a run takes seconds; the reference for the served model
is the engine loading the job's adapter dir itself.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from mini_claude.checkpoint import save_model_dir
from mini_claude.engine import Engine
from mini_claude.generate import SamplingParams

pytestmark = pytest.mark.slow  # child processes that import torch and train

RECORDS = [
    {"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                  {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]}
    for a, b in [(1, 2), (3, 4), (5, 7), (10, 12), (21, 30), (8, 9), (40, 2), (13, 17), (6, 60), (99, 1), (25, 25),
                 (70, 11), (14, 41), (33, 3), (18, 81), (50, 49)]
]  # fmt: skip
QUICK = {"max_steps": 3, "batch_size": 4, "rank": 4, "eval_every": 0, "save_every": 0, "seed": 1}
HELLO = [{"role": "user", "content": "What is 2 plus 2?"}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, engine: Engine) -> Path:
    return save_model_dir(tmp_path_factory.mktemp("model") / "tiny", engine.model, engine.tokenizer)


@pytest.fixture
def start_app(make_client: Callable[..., TestClient], model_dir: Path, tmp_path: Path) -> Callable[..., TestClient]:
    """Apps serving the tiny model dir (float32, as jobs train it), sharing one fine-tune dir."""

    def start(**settings: Any) -> TestClient:
        engine = Engine.load(model_dir, dtype="float32", quantize="none", name="tiny")
        return make_client(engine=engine, fine_tune_dir=str(tmp_path / "fine-tunes"), **settings)

    return start


def wait_for(client: TestClient, job_id: str, statuses: tuple[str, ...], timeout: float = 300) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while (job := client.get(f"/v1/fine-tunes/{job_id}").json())["status"] not in statuses:
        assert time.monotonic() < deadline, job
        time.sleep(0.2)
    return job


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, sqlite_url: str) -> Iterator[str]:
    yield sqlite_url if request.param == "sqlite" else request.getfixturevalue("postgres_url")


def test_a_job_trains_an_adapter_that_is_served_at_once_and_after_a_restart(
    start_app: Callable[..., TestClient], database_url: str
) -> None:
    client = start_app(database_url=database_url)
    created = client.post(
        "/v1/fine-tunes", json={"training_data": RECORDS, "suffix": "adder", "hyperparameters": QUICK}
    )
    assert created.status_code == 200, created.text
    job = created.json()
    assert job["status"] in ("queued", "running") and job["fine_tuned_model"] is None and job["model"] == "tiny"
    assert job["hyperparameters"] == QUICK  # as sent (stored as `finetune`'s own flags: max_steps -> steps)

    done = wait_for(client, job["id"], ("succeeded", "failed"))
    assert done["status"] == "succeeded", done["error"]
    assert done["progress"] == 1.0 and done["result"]["steps"] == 3
    assert done["result"]["val_ppl_before"] > 0 and done["result"]["val_ppl_after"] > 0
    name = done["fine_tuned_model"]
    assert name.startswith("ft:tiny:adder:") and name in [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert [j["id"] for j in client.get("/v1/fine-tunes").json()["data"]] == [job["id"]]

    reference = Engine.load(client.app.state.service.engine.source, dtype="float32", quantize="none", name="tiny")
    reference.load_adapter(done["result"]["adapter"], name)
    want = reference.complete(reference.encode_chat(HELLO), SamplingParams(10, temperature=0.0), adapter=name).text
    body = {"model": name, "messages": HELLO, "temperature": 0, "max_tokens": 10}
    reply = client.post("/v1/chat/completions", json=body).json()
    assert reply["model"] == name and reply["choices"][0]["message"]["content"] == want

    restarted = start_app(database_url=database_url)  # a new process would do the same: the job is in the DB
    assert name in [m["id"] for m in restarted.get("/v1/models").json()["data"]]
    assert restarted.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"] == want


def test_cancel_stops_a_running_job(start_app: Callable[..., TestClient]) -> None:
    client = start_app()
    long = {**QUICK, "max_steps": 100_000}
    job = client.post("/v1/fine-tunes", json={"training_data": RECORDS, "hyperparameters": long}).json()
    running = wait_for(client, job["id"], ("running",))
    assert running["status"] == "running"
    cancelled = client.post(f"/v1/fine-tunes/{job['id']}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    runner = client.app.state.fine_tunes.runner
    deadline = time.monotonic() + 30
    while runner._running is not None:  # the worker has reaped the child
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert wait_for(client, job["id"], ("cancelled",))["fine_tuned_model"] is None
    again = client.post(f"/v1/fine-tunes/{job['id']}/cancel")
    assert again.status_code == 409 and again.json()["error"]["code"] == "job_not_active"


def test_a_failing_run_reports_its_error(start_app: Callable[..., TestClient]) -> None:
    client = start_app()
    bad = {**QUICK, "targets": ["no_such_proj"]}  # valid request; the trainer finds no such module
    job = client.post("/v1/fine-tunes", json={"training_data": RECORDS, "hyperparameters": bad}).json()
    done = wait_for(client, job["id"], ("succeeded", "failed"))
    assert done["status"] == "failed" and "no_such_proj" in done["error"]["message"]
    assert "Traceback" not in done["error"]["message"]


@pytest.mark.parametrize(
    ("body", "status", "param", "message"),
    [
        ({"training_data": [RECORDS[0], {"instruction": "no output"}]}, 400, "training_data",
         'training_data[1]: missing "output"'),
        ({"training_file": "/nonexistent/data.jsonl"}, 400, "training_file", "training file not found"),
        ({"training_file": "chatterbot", "training_data": RECORDS}, 400, None, "exactly one of"),
        ({"training_data": RECORDS, "hyperparameters": {"epochs": 2}}, 400, None, "epochs"),
        ({"training_data": RECORDS, "hyperparameters": {"rank": 0}}, 400, None, "rank"),
        ({"training_data": RECORDS, "hyperparameters": {"augment": "shuffle"}}, 400, None, "augment"),
        ({"training_data": RECORDS, "suffix": "has space"}, 400, None, "suffix"),
        ({"training_data": RECORDS, "model": "other"}, 404, "model", "adapts the served base model"),
    ],
)  # fmt: skip
def test_bad_requests_are_refused_before_anything_runs(
    start_app: Callable[..., TestClient], body: dict[str, Any], status: int, param: str | None, message: str
) -> None:
    client = start_app()
    response = client.post("/v1/fine-tunes", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert message in error["message"] and (param is None or error["param"] == param)
    assert client.get("/v1/fine-tunes").json()["data"] == []


def test_bad_data_file_names_its_line(start_app: Callable[..., TestClient], tmp_path: Path) -> None:
    client = start_app()
    path = tmp_path / "data.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n')
    response = client.post("/v1/fine-tunes", json={"training_file": str(path)})
    assert response.status_code == 400 and f"{path}:2" in response.json()["error"]["message"]
    missing = client.get("/v1/fine-tunes/3f2a0000-0000-0000-0000-000000000000")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "fine_tune_not_found"


def test_an_in_memory_model_cannot_be_fine_tuned(make_client: Callable[..., TestClient]) -> None:
    response = make_client().post("/v1/fine-tunes", json={"training_data": RECORDS})
    assert response.status_code == 400 and "not loaded from a file" in response.json()["error"]["message"]
