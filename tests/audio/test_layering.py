"""The voice package is a service: it uses no web, UI or database library, and the core does not import it."""

from __future__ import annotations

import subprocess
import sys

AUDIO = ["mini_claude.audio", "mini_claude.audio.speech", "mini_claude.audio.stt", "mini_claude.audio.neural",
         "mini_claude.audio.espeak", "mini_claude.audio.elevenlabs", "mini_claude.audio.formats"]  # fmt: skip
FORBIDDEN = ["fastapi", "starlette", "uvicorn", "gradio", "sqlalchemy", "prometheus_client", "torch"]


def test_audio_imports_no_web_ui_database_or_model_library() -> None:
    code = f"import sys\nfor m in {AUDIO!r}: __import__(m)\nprint(sorted(m for m in {FORBIDDEN!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", f"the audio package pulled in {out.strip()}"


def test_the_core_does_not_import_audio() -> None:
    code = (
        "import sys, mini_claude.engine, mini_claude.scheduler\n"
        "print(any(m.startswith('mini_claude.audio') for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
