"""A scikit-learn model on disk, loaded safely: predict labels and probabilities, know which file it was.

Design choices:

- **skops, not pickle.** A pickle runs whatever code its author put in it when it is loaded; a model
  directory a server scans must not be a way to run code. `skops.io` stores an estimator as a zip of JSON
  (the object tree) and `.npy` arrays, and loads only types on its trust list (scikit-learn's estimators,
  numpy arrays, builtins). A file that needs any other type is refused unless the caller names the types
  it accepts (`trusted=`), after `skops.io.get_untrusted_types` has shown them.
- **The file may carry metadata.** A skops file holds one object; ours is `{"model": estimator,
  "metadata": {...}}` so that what was measured about the model (held-out metrics, the decision threshold,
  what it was trained on) travels inside the file it describes. A bare estimator loads too.
- **The version is the file's content hash** (sha256): two processes that loaded the same bytes agree on
  the version, and a cache can tell a rewritten file from the one it holds. (skops names the arrays inside
  the zip by object id, so retraining writes new bytes, and a new version, even for identical weights.)
- **Binary thresholds are the model's own.** For a two-class model `metadata["threshold"]` (default 0.5)
  decides the label from P(classes[1]), so every caller draws the line where the model was tuned.
- Nothing here knows about HTTP or the rest of the package: the data pipeline, the evaluation and a server
  all call the same `SklearnModel`.
"""

from __future__ import annotations

import hashlib
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

BUNDLED_DIR = Path(__file__).resolve().parent.parent / "data"  # models shipped inside the package
SUFFIX = ".skops"


class UntrustedModelError(ValueError):
    """The file needs types outside skops' trust list that the caller did not accept."""


@dataclass(frozen=True)
class Predictions:
    """One label per input, and each input's probability for every class (in `classes` order)."""

    labels: list[Any]
    probabilities: list[dict[str, float]]
    classes: list[Any]


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _plain(value: Any) -> Any:
    """numpy scalars to Python ones, so labels serialise as JSON."""
    return value.item() if isinstance(value, np.generic) else value


@dataclass
class SklearnModel:
    """A fitted scikit-learn estimator (or pipeline) with its metadata and the hash of the file it came from."""

    estimator: Any
    metadata: dict[str, Any] = field(default_factory=dict)
    sha256: str = ""
    path: Path | None = None

    @property
    def name(self) -> str:
        return str(self.metadata.get("name") or (self.path.stem if self.path else "model"))

    @property
    def version(self) -> str:
        """The first 12 hex digits of the file's sha256 (empty for a model never saved)."""
        return self.sha256[:12]

    @property
    def classes(self) -> list[Any]:
        return [_plain(c) for c in getattr(self.estimator, "classes_", [])]

    # ------------------------------------------------------------------------------------- load/save
    @classmethod
    def load(cls, path: str | Path, trusted: Sequence[str] = ()) -> SklearnModel:
        """Load a `.skops` file; refuses types outside skops' defaults unless they are listed in `trusted`."""
        import skops.io as sio  # here, not at the top: it brings scikit-learn, pandas and scipy (~300 MB resident)

        path = Path(path)
        needed = sio.get_untrusted_types(file=path)
        refused = sorted(set(needed) - set(trusted))
        if refused:
            raise UntrustedModelError(f"{path} needs types that are not trusted: {', '.join(refused)}")
        obj = sio.load(path, trusted=list(needed) or None)
        if isinstance(obj, dict) and "model" in obj:
            estimator, metadata = obj["model"], dict(obj.get("metadata") or {})
        else:
            estimator, metadata = obj, {}
        return cls(estimator, metadata, file_sha256(path), path)

    def save(self, path: str | Path) -> SklearnModel:
        """Write `{"model", "metadata"}` with skops (deflate-compressed); returns the model as loaded from there."""
        import skops.io as sio

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        obj = {"model": self.estimator, "metadata": self.metadata}
        sio.dump(obj, tmp, compression=zipfile.ZIP_DEFLATED, compresslevel=9)
        tmp.replace(path)  # a reader never sees a half-written file
        self.path, self.sha256 = path, file_sha256(path)
        return self

    # --------------------------------------------------------------------------------------- predict
    def predict_proba(self, instances: Sequence[Any]) -> np.ndarray:
        """(N, K) class probabilities in `classes` order."""
        if not len(instances):
            return np.zeros((0, len(self.classes)))
        return np.asarray(self.estimator.predict_proba(list(instances)))

    def predict(self, instances: Sequence[Any]) -> Predictions:
        """Labels and per-class probabilities; texts for a text pipeline, feature rows for a tabular one."""
        classes = self.classes
        proba = self.predict_proba(instances)  # (N, K)
        if len(classes) == 2:
            threshold = float(self.metadata.get("threshold", 0.5))
            labels = [classes[int(p >= threshold)] for p in proba[:, 1]]
        else:
            labels = [classes[i] for i in proba.argmax(axis=1)]
        probabilities = [{str(c): float(p) for c, p in zip(classes, row, strict=True)} for row in proba]
        return Predictions(labels, probabilities, classes)


def bundled_models() -> dict[str, Path]:
    """The `.skops` files shipped in the package, by file stem."""
    return {p.stem: p for p in sorted(BUNDLED_DIR.glob(f"*{SUFFIX}"))}


SAFETY_MODEL = BUNDLED_DIR / f"safety_classifier{SUFFIX}"  # trained by scripts/train_safety.py
