"""Dependencies point one way: the core never imports web, UI or database libraries (STYLE.md, point 2)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

CORE = [
    "mini_claude.config",
    "mini_claude.model",
    "mini_claude.positions",
    "mini_claude.encoder",
    "mini_claude.tokenizer",
    "mini_claude.generate",
    "mini_claude.checkpoint",
    "mini_claude.quantize",
    "mini_claude.lora",
    "mini_claude.lora_report",
    "mini_claude.adapters",
    "mini_claude.engine",
    "mini_claude.scheduler",
    "mini_claude.chat.memory",
]
FORBIDDEN = ["fastapi", "starlette", "uvicorn", "gradio", "sqlalchemy", "psycopg", "prometheus_client"]


def test_core_imports_no_web_ui_or_database_library() -> None:
    code = (
        f"import sys\nfor m in {CORE!r}: __import__(m)\nprint(sorted(m for m in {FORBIDDEN!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", f"the core pulled in {out.strip()}"


def test_db_layer_knows_nothing_of_the_package() -> None:
    code = (
        "import sys\nimport mini_claude.db\n"
        "print(sorted(m for m in sys.modules if m.startswith('mini_claude') and not m.startswith('mini_claude.db')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['mini_claude']"


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside functions (lazy imports count too)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def test_train_never_imports_eval_and_predict_imports_nothing_of_the_package() -> None:
    """eval uses train (the safety corpus reads chatterbot records), so train must not use eval (issue 8.5).

    The fine-tuning pipeline reaches the safety classifier through `predict`, which knows nothing of the rest.
    """
    package = Path(__file__).resolve().parents[1] / "src" / "mini_claude"
    for path in (package / "train").glob("*.py"):
        bad = sorted(m for m in _imports(path) if m.startswith("mini_claude.eval"))
        assert not bad, f"{path.name} imports {bad}"
    for path in [*(package / "predict").glob("*.py"), *(package / "learn").glob("*.py")]:
        own = f"mini_claude.{path.parent.name}"
        bad = sorted(m for m in _imports(path) if m.startswith("mini_claude") and not m.startswith(own))
        assert not bad, f"{path.parent.name}/{path.name} imports {bad}"
    code = (
        "import sys\nimport mini_claude.train.data\n"
        "print(sorted(m for m in sys.modules if m.startswith('mini_claude.eval')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_rag_knows_nothing_of_http() -> None:
    """rag/ uses the core and the database; the server composes it (STYLE.md, point 2)."""
    package = Path(__file__).resolve().parents[1] / "src" / "mini_claude"
    for path in (package / "rag").glob("*.py"):
        bad = sorted(
            m for m in _imports(path) if m.split(".")[0] in FORBIDDEN[:4] or m.startswith("mini_claude.server")
        )
        assert not bad, f"rag/{path.name} imports {bad}"
