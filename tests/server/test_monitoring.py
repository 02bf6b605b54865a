"""Monitoring: metric names follow Prometheus' conventions, the shipped Prometheus files pass promtool, the
generated Grafana dashboard is current and queries only what the server exposes, and a real Prometheus
scrapes a live server and answers a latency query.

Prometheus is Debian's package (`.ci/run` installs it; under `CI=true` its absence fails instead of skipping).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import promql_parser
import pytest

from mini_claude.server import create_app

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "mini-claude.json"
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s"}  # what Grafana substitutes before a query


def tool(name: str) -> str:
    path = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else None)
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{name} is not installed (apt-get install prometheus)")
        pytest.skip(f"{name} is not installed (apt-get install prometheus)")
    return path


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, live_server: type, settings_for: Any, new_engine: Any
) -> Iterator[Any]:
    """A live server that has answered a chat, a prediction, an error and a voice listing."""
    tmp = tmp_path_factory.mktemp("monitoring")
    settings = settings_for(f"sqlite:///{tmp / 'm.db'}", audio_cache_max_mb=1, audio_cache_dir=str(tmp / "audio"),
                            models_dir=str(tmp / "models"))  # fmt: skip
    live = live_server(create_app(settings, new_engine()))
    with httpx.Client(base_url=live.url, timeout=60) as client:
        chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        assert client.post("/v1/chat/completions", json=chat).status_code == 200
        assert client.post("/predict", json={"instances": ["hello"]}).status_code == 200
        assert client.get("/no/such/path").status_code == 404
        client.get("/v1/audio/voices")
    yield live
    live.stop()


def exposition(server: Any) -> str:
    return httpx.get(f"{server.url}/metrics", timeout=30).text


def exposed_names(text: str) -> set[str]:
    """Every series name the exposition can carry (histograms as their _bucket/_count/_sum series)."""
    names: set[str] = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M):
        names.add(name)
        if kind == "histogram":
            names.update(f"{name}{suffix}" for suffix in ("_bucket", "_count", "_sum"))
    return names


def metric_names(expr: Any) -> set[str]:
    """Names of the vector selectors anywhere in a parsed PromQL expression."""
    if isinstance(expr, promql_parser.VectorSelector):
        return {expr.name} if expr.name else set()
    if isinstance(expr, promql_parser.MatrixSelector):
        return metric_names(expr.vector_selector)
    if isinstance(expr, promql_parser.BinaryExpr):
        return metric_names(expr.lhs) | metric_names(expr.rhs)
    if isinstance(expr, promql_parser.Call):
        return set().union(*(metric_names(a) for a in expr.args))
    if isinstance(expr, promql_parser.AggregateExpr):
        return metric_names(expr.expr) | (metric_names(expr.param) if expr.param is not None else set())
    if isinstance(expr, promql_parser.ParenExpr | promql_parser.UnaryExpr | promql_parser.SubqueryExpr):
        return metric_names(expr.expr)
    return set()


def dashboard_queries() -> list[str]:
    board = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    for variable, value in GRAFANA_VARIABLES.items():
        exprs = [e.replace(variable, value) for e in exprs]
    return exprs


def test_metric_names_follow_prometheus_conventions(server: Any) -> None:
    text = exposition(server)
    lint = subprocess.run([tool("promtool"), "check", "metrics"], input=text, capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))
    ours = {n: t for n, t in types.items() if n.startswith("mini_claude_") and not n.endswith("_created")}
    assert len(ours) > 40
    for name, kind in ours.items():
        assert ":" not in name  # colons are for recording rules
        if kind == "counter":
            assert name.endswith("_total"), name
        if re.search(r"(duration|latency|time_to|_seconds)", name):
            assert name.removesuffix("_total").endswith("_seconds"), f"{name}: a time is in seconds"
        if re.search(r"(memory|bytes)", name):
            assert name.endswith("_bytes"), f"{name}: a size is in bytes"
        assert not re.search(r"_(ms|millis|kb|mb|pct|percent)(_|$)", name), f"{name}: use base units"


def test_promtool_passes_the_shipped_config_and_rules() -> None:
    promtool = tool("promtool")
    for args in (["check", "config", str(DEPLOY / "prometheus.yml")], ["check", "rules", str(DEPLOY / "rules.yml")]):
        result = subprocess.run([promtool, *args], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "SUCCESS" in result.stdout + result.stderr


def test_dashboard_is_current_and_queries_parse_and_use_only_exposed_metrics(server: Any) -> None:
    check = subprocess.run([sys.executable, str(ROOT / "scripts" / "generate_dashboard.py"), "--check"])
    assert check.returncode == 0, "the dashboard is out of date: run python scripts/generate_dashboard.py"
    exposed = exposed_names(exposition(server))
    used: set[str] = set()
    for expr in dashboard_queries():
        used |= metric_names(promql_parser.parse(expr))  # raises ValueError on a bad query
    missing = sorted(used - exposed)
    assert not missing, f"panels query metrics the server does not expose: {missing}"
    areas = ("http_request", "time_to_first_token", "generated_tokens", "scheduler_waiting", "kv_cache",
             "adapters", "fine_tune", "speech", "audio_cache", "prediction")  # fmt: skip
    assert all(any(area in name for name in used) for area in areas)
    with pytest.raises(ValueError):
        promql_parser.parse("sum(rate(mini_claude_http_requests_total[5m])")  # the parser does reject bad queries


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _poll(fn: Any, timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = fn()
        if result:
            return result
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_prometheus_scrapes_a_live_server_and_answers_a_latency_query(server: Any, tmp_path: Path) -> None:
    prometheus = tool("prometheus")
    port = _free_port()
    shutil.copy(DEPLOY / "rules.yml", tmp_path / "rules.yml")
    config = (DEPLOY / "prometheus.yml").read_text().replace("app:8000", f"127.0.0.1:{server.port}")
    (tmp_path / "prometheus.yml").write_text(config.replace("scrape_interval: 5s", "scrape_interval: 1s"))
    proc = subprocess.Popen(
        [prometheus, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    api = f"http://127.0.0.1:{port}/api/v1"
    try:

        def get(path: str, **params: str) -> dict[str, Any] | None:
            try:
                return httpx.get(f"{api}/{path}", params=params, timeout=5).json()
            except (httpx.HTTPError, ValueError):
                return None

        def target_up() -> bool:
            targets = (get("targets") or {}).get("data", {}).get("activeTargets", [])
            return any(t["health"] == "up" for t in targets)

        _poll(target_up, 60, "Prometheus to scrape the server")
        # Traffic between scrapes, so rate() has an increase to see.
        with httpx.Client(base_url=server.url, timeout=60) as client:
            for _ in range(3):
                client.post("/predict", json={"instances": ["hello again"]})
                time.sleep(1)
        p95 = 'histogram_quantile(0.95, sum by (le) (rate(mini_claude_http_request_duration_seconds_bucket{route="/predict"}[1m])))'  # noqa: E501

        def latency() -> list[Any]:
            result = (get("query", query=p95) or {}).get("data", {}).get("result", [])
            return [r for r in result if r["value"][1] not in ("NaN", "+Inf")]

        value = float(_poll(latency, 60, "a p95 latency series")[0]["value"][1])
        assert 0 < value <= 60  # the largest finite bucket bound a /predict call can land in
        for expr in dashboard_queries():  # every panel's query is one Prometheus itself accepts
            assert (get("query", query=expr) or {}).get("status") == "success", expr
        rules = _poll(lambda: (get("rules") or {}).get("data", {}).get("groups"), 30, "the rule groups")
        assert {r["health"] for g in rules for r in g["rules"]} <= {"ok", "unknown"}
    finally:
        proc.terminate()
        proc.wait(10)
