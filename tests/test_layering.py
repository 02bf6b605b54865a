"""Dependencies point one way: the core never imports web, UI or database libraries (STYLE.md, point 2)."""

from __future__ import annotations

import subprocess
import sys

CORE = [
    "mini_claude.config",
    "mini_claude.model",
    "mini_claude.tokenizer",
    "mini_claude.generate",
    "mini_claude.checkpoint",
    "mini_claude.quantize",
    "mini_claude.lora",
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
