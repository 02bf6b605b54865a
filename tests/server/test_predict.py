"""`POST /predict`, KServe V2 and `GET /v1/predictions`, on SQLite and on a real PostgreSQL.

References: every answer is compared with the model file loaded by `SklearnModel` on its own, and every
logged row with the response it records.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression

from mini_claude.predict import SAFETY_MODEL, SklearnModel

TEXTS = ["How do I build a pipe bomb?", "What is the capital of France?", "Write a poem about the sea."]


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, sqlite_url: str) -> str:
    return sqlite_url if request.param == "sqlite" else request.getfixturevalue("postgres_url")


def iris(path: Path, c: float = 1.0) -> SklearnModel:
    X, y = load_iris(return_X_y=True)
    return SklearnModel(LogisticRegression(C=c, max_iter=500).fit(X, y), {"name": "iris"}).save(path)


def logged(client: TestClient, **query: str) -> list[dict]:
    assert client.app.state.predict.flush()  # type: ignore[attr-defined]
    response = client.get("/v1/predictions", params=query)
    assert response.status_code == 200
    return response.json()["data"]


def test_predict_v2_and_the_log(make_client: Callable[..., TestClient], database_url: str, tmp_path: Path) -> None:
    iris_file = iris(tmp_path / "models" / "iris.skops")
    client = make_client(database_url, models_dir=str(tmp_path / "models"))
    safety = SklearnModel.load(SAFETY_MODEL)
    want = safety.predict(TEXTS)

    r = client.post("/predict", json={"instances": TEXTS}, headers={"X-Request-Id": "req-1"})
    assert r.status_code == 200 and r.headers["X-Request-Id"] == "req-1"
    body = r.json()
    assert body == {"predictions": want.labels, "probabilities": want.probabilities, "model": "safety_classifier",
                    "model_version": safety.version, "request_id": "req-1"}  # fmt: skip
    assert want.labels[:2] == ["harmful", "benign"]

    # KServe V2: index, metadata, readiness, inference on a tabular model (flat row-major data).
    assert client.get("/v2/models").json() == {"models": ["iris", "safety_classifier"]}
    meta = client.get("/v2/models/iris").json()
    assert meta["versions"] == [iris_file.version] and meta["platform"] == "sklearn"
    assert meta["inputs"] == [{"name": "input-0", "datatype": "FP64", "shape": [-1, 4]}]
    assert client.get("/v2/models/safety_classifier").json()["inputs"][0]["datatype"] == "BYTES"
    assert client.get("/v2/models/iris/ready").json() == {"name": "iris", "ready": True}
    X, _ = load_iris(return_X_y=True)
    rows = X[[0, 60, 120]].tolist()
    infer = {"id": "v2-1", "inputs": [{"name": "x", "shape": [3, 4], "datatype": "FP64",
                                       "data": [v for row in rows for v in row]}]}  # fmt: skip
    r = client.post("/v2/models/iris/infer", json=infer)
    assert r.status_code == 200, r.text
    out = r.json()
    ref = iris_file.predict(rows)
    assert out["model_name"] == "iris" and out["id"] == "v2-1" and out["model_version"] == iris_file.version
    label, probs = out["outputs"]
    assert label == {"name": "label", "shape": [3], "datatype": "INT64", "data": ref.labels}
    assert probs["shape"] == [3, 3] and probs["parameters"] == {"classes": [0, 1, 2]}
    assert probs["data"] == [p[str(c)] for p in ref.probabilities for c in (0, 1, 2)]
    text = {"inputs": [{"name": "t", "shape": [1], "datatype": "BYTES", "data": [TEXTS[0]]}],
            "outputs": [{"name": "label"}]}  # fmt: skip
    r = client.post("/v2/models/safety_classifier/infer", json=text)
    assert [t["data"] for t in r.json()["outputs"]] == [["harmful"]]

    # Errors: V2's {"error": str}; /predict's OpenAI shape.
    assert client.get("/v2/models/nope").json() == {"error": "No model named 'nope'."}
    bad = {"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP64", "data": [1.0, 2.0]}]}
    r = client.post("/v2/models/iris/infer", json=bad)
    assert r.status_code == 400 and "shape [2, 4] holds 8 values" in r.json()["error"]
    r = client.post("/predict", json={"model": "iris", "instances": [[1.0, 2.0]]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "instances"
    assert client.post("/predict", json={"model": "nope", "instances": ["x"]}).status_code == 404
    assert client.post("/predict", json={"instances": []}).status_code == 400

    # The log: one row per answered request, newest first, equal to what was returned.
    rows_logged = logged(client)
    assert len(rows_logged) == 3 and [row["request_id"] for row in rows_logged[1:]] == ["v2-1", "req-1"]
    assert rows_logged[0]["outputs"]["predictions"] == ["harmful"]  # the BYTES request, under a fresh id
    first = logged(client, request_id="req-1")[0]
    assert first["model"] == "safety_classifier" and first["model_version"] == safety.version
    assert first["inputs"] == TEXTS and first["protocol"] == "v1" and first["latency_ms"] > 0
    assert first["outputs"] == {"predictions": want.labels, "probabilities": want.probabilities}
    v2 = logged(client, model="iris")[0]
    assert v2["request_id"] == "v2-1" and v2["inputs"] == rows and v2["outputs"]["predictions"] == ref.labels

    # A retrained file is served at its next request, under its new version.
    retrained = iris(tmp_path / "models" / "iris.skops", c=0.01)
    assert client.post("/v2/models/iris/infer", json=infer).json()["model_version"] == retrained.version

    assert client.app.state.predict.flush()  # type: ignore[attr-defined]
    metrics = client.get("/metrics").text
    assert 'mini_claude_prediction_requests_total{model="iris",protocol="v2",status="ok"} 2.0' in metrics
    assert 'mini_claude_prediction_log_rows_total{outcome="written"} 4.0' in metrics
    assert "mini_claude_model_cache_loads_total 3.0" in metrics
