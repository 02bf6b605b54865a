"""The guides and notebooks run: every ```bash and ```python block of `docs/guide/*.md`, in order, and every
notebook of `notebooks/` (nbclient), so none of them can rot.

Each guide runs in a fresh directory that looks like a checkout (`scripts/`, `deploy/`, `configs/` linked
in), with the venv's commands on PATH and a free port in `MINI_CLAUDE_PORT`; blocks of one guide share
that directory, so a later block reads what an earlier one wrote. Blocks fenced as ```console are shown,
not run (`make setup`, `docker compose up`). A guide that starts a server writes its pid to `*.pid`, and
whatever is still running at the end is stopped here.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GUIDES = sorted((ROOT / "docs" / "guide").glob("[0-9][0-9]_*.md"))
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
FENCE = re.compile(r"^```(bash|python)\n(.*?)^```$", re.M | re.S)
BLOCK_TIMEOUT_S = 600
LINKED = ("scripts", "deploy", "configs", "docs")


def blocks(guide: Path) -> list[tuple[str, str]]:
    """(language, code) of every runnable block, in order."""
    return [(m.group(1), m.group(2)) for m in FENCE.finditer(guide.read_text(encoding="utf-8"))]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MINI_CLAUDE_") or k == "MINI_CLAUDE_KERNELS"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["MINI_CLAUDE_PORT"] = str(_free_port())
    src = str(ROOT / "src")  # this checkout's package, also in the guides' subprocesses
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _stop_leftovers(workdir: Path) -> None:
    for pid_file in workdir.glob("*.pid"):
        with contextlib.suppress(ValueError, ProcessLookupError):
            os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)


def test_every_guide_has_runnable_blocks() -> None:
    assert [g.name for g in GUIDES][:1] == ["01_install.md"] and (ROOT / "docs/guide/10_capstone_project.md") in GUIDES
    for guide in GUIDES:
        assert blocks(guide), f"{guide.name} has no ```bash or ```python block"


@pytest.mark.slow
@pytest.mark.parametrize("guide", GUIDES, ids=[g.stem for g in GUIDES])
def test_guide_runs(guide: Path, tmp_path: Path) -> None:
    for name in LINKED:
        (tmp_path / name).symlink_to(ROOT / name)
    env = _env()
    try:
        for i, (language, code) in enumerate(blocks(guide)):
            command = ["bash", "-euo", "pipefail", "-c", code] if language == "bash" else [sys.executable, "-c", code]
            result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                                    timeout=BLOCK_TIMEOUT_S, stdin=subprocess.DEVNULL)  # fmt: skip
            logs = "".join(f"\n--- {p.name}\n{p.read_text()[-2000:]}" for p in tmp_path.glob("*.log"))
            assert result.returncode == 0, (
                f"{guide.name} block {i + 1} ({language}) failed:\n{code}\n--- stdout\n{result.stdout[-3000:]}"
                f"\n--- stderr\n{result.stderr[-3000:]}{logs}"
            )
    finally:
        _stop_leftovers(tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[n.stem for n in NOTEBOOKS])
def test_notebook_runs(notebook: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import nbformat
    from nbclient import NotebookClient

    for key, value in _env().items():
        monkeypatch.setenv(key, value)  # the kernel inherits this environment
    nb = nbformat.read(notebook, as_version=4)
    assert not any(cell.get("outputs") for cell in nb.cells if cell.cell_type == "code"), "commit notebooks clean"
    client = NotebookClient(
        nb, timeout=BLOCK_TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError with the cell and its traceback
