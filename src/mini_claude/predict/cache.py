"""`ModelCache`: the scikit-learn models a server offers, by name, reloaded when their file changes.

Design choices:
- **Names are file stems.** The bundled models (`data/*.skops`) come first, then every `*.skops` file of a
  models directory; a file there with a bundled model's name replaces it, so a deployment can ship a
  retrained safety classifier without touching the package. The directory is rescanned on every lookup
  (one `stat` per file, microseconds), so a model dropped in is served and a deleted one disappears without
  a restart.
- **Reload on change, keyed by `(inode, mtime_ns, size)`.** A lookup stats the file; a different stamp loads it
  again (`SklearnModel.load` writes through a temporary file and a rename, so a reader sees either the old
  bytes or the new, never half). The version a caller sees is the content hash of what was loaded, so the
  prediction log names the exact bytes that answered.
- **A file that does not load is reported, not fatal.** A damaged file, or one needing types outside skops'
  trust list, is kept as an error (`status()` says why) and retried when it changes; the other models serve.
- Thread-safe (one lock; loading happens under it, so two requests never load one file twice). Nothing here
  knows HTTP: the server's `predict` area and the notebooks call the same object.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from mini_claude.predict.model import SUFFIX, SklearnModel, bundled_models

log = logging.getLogger(__name__)


class ModelNotFoundError(LookupError):
    """No model file of that name."""


class ModelLoadError(RuntimeError):
    """The model's file exists but did not load (the message says why)."""


@dataclass
class _Entry:
    path: Path
    stamp: tuple[int, int, int]
    model: SklearnModel | None
    error: str | None


@dataclass(frozen=True)
class CacheStats:
    hits: int
    loads: int
    failures: int


def _stamp(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns, st.st_size  # a rename onto the path (how models are saved) is a new inode


class ModelCache:
    """Models by name from the bundled files and `models_dir`; `get` reloads a file that changed."""

    def __init__(self, models_dir: str | Path | None = None, bundled: bool = True) -> None:
        self.models_dir = Path(models_dir) if models_dir else None
        self.bundled = bundled
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.Lock()
        self.hits = self.loads = self.failures = 0

    def files(self) -> dict[str, Path]:
        """Every model file now on disk, by name (the models directory wins over the bundled files)."""
        found = dict(bundled_models()) if self.bundled else {}
        if self.models_dir is not None and self.models_dir.is_dir():
            found.update({p.stem: p for p in sorted(self.models_dir.glob(f"*{SUFFIX}")) if p.is_file()})
        return found

    def names(self) -> list[str]:
        return sorted(self.files())

    def load_all(self) -> dict[str, str | None]:
        """Load every model now (at server start); returns each name's error, None for those that loaded."""
        return {name: self._entry(name).error for name in self.names()}

    def get(self, name: str) -> SklearnModel:
        """The model of that name, loaded again first if its file changed.

        Raises:
            ModelNotFoundError: no such file.
            ModelLoadError: the file did not load.
        """
        entry = self._entry(name)
        if entry.model is None:
            raise ModelLoadError(f"model '{name}' did not load: {entry.error}")
        return entry.model

    def status(self, name: str) -> tuple[bool, str | None]:
        """(ready, the load error if not) for a known name; raises `ModelNotFoundError` otherwise."""
        entry = self._entry(name)
        return entry.model is not None, entry.error

    @property
    def stats(self) -> CacheStats:
        return CacheStats(self.hits, self.loads, self.failures)

    def _entry(self, name: str) -> _Entry:
        path = self.files().get(name)
        with self._lock:
            if path is None:
                self._entries.pop(name, None)
                raise ModelNotFoundError(f"no model named '{name}'")
            try:
                stamp = _stamp(path)
            except FileNotFoundError:  # deleted between the scan and now
                self._entries.pop(name, None)
                raise ModelNotFoundError(f"no model named '{name}'") from None
            entry = self._entries.get(name)
            if entry is not None and entry.path == path and entry.stamp == stamp:
                self.hits += 1
                return entry
            try:
                model, error = SklearnModel.load(path), None
                self.loads += 1
                log.info("loaded model %s (version %s) from %s", name, model.version, path)
            except Exception as exc:  # any damage: a bad zip, a refused type, a missing key
                model, error = None, f"{type(exc).__name__}: {exc}"
                self.failures += 1
                log.warning("model %s from %s did not load: %s", name, path, error)
            entry = self._entries[name] = _Entry(path, stamp, model, error)
            return entry
