"""predict.ModelCache: models by name from the bundled files and a directory, reloaded when a file changes."""

from __future__ import annotations

from pathlib import Path

import pytest
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression

from mini_claude.predict import SAFETY_MODEL, ModelCache, ModelLoadError, ModelNotFoundError, SklearnModel


def iris_model(path: Path, c: float = 1.0) -> SklearnModel:
    X, y = load_iris(return_X_y=True)
    return SklearnModel(LogisticRegression(C=c, max_iter=500).fit(X, y)).save(path)


def test_names_lookup_reload_and_removal(tmp_path: Path) -> None:
    cache = ModelCache(tmp_path)
    assert cache.names() == ["safety_classifier"]  # the bundled one; the directory is empty
    first = iris_model(tmp_path / "iris.skops")
    assert cache.names() == ["iris", "safety_classifier"]  # dropped in: found without a restart
    assert cache.load_all() == {"iris": None, "safety_classifier": None}
    assert cache.get("iris").version == first.version and cache.stats.loads == 2
    cache.get("iris")
    assert cache.stats.loads == 2 and cache.stats.hits >= 2  # unchanged: not loaded again

    second = iris_model(tmp_path / "iris.skops", c=0.01)  # retrained, written over the old file
    assert second.version != first.version
    reloaded = cache.get("iris")
    assert reloaded.version == second.version and cache.stats.loads == 3
    X, _ = load_iris(return_X_y=True)
    assert reloaded.predict(X[:5].tolist()).probabilities == second.predict(X[:5].tolist()).probabilities

    (tmp_path / "iris.skops").unlink()
    assert cache.names() == ["safety_classifier"]
    with pytest.raises(ModelNotFoundError):
        cache.get("iris")


def test_broken_file_is_reported_and_retried_and_directory_overrides_bundled(tmp_path: Path) -> None:
    (tmp_path / "broken.skops").write_bytes(b"not a zip")
    cache = ModelCache(tmp_path)
    errors = cache.load_all()
    assert errors["safety_classifier"] is None and "BadZipFile" in (errors["broken"] or "")
    assert cache.status("broken") == (False, errors["broken"]) and cache.stats.failures == 1
    with pytest.raises(ModelLoadError, match="did not load"):
        cache.get("broken")
    fixed = iris_model(tmp_path / "broken.skops")  # repaired in place: the next lookup loads it
    assert cache.get("broken").version == fixed.version and cache.status("broken") == (True, None)

    own = iris_model(tmp_path / "safety_classifier.skops")  # a deployment's own model of a bundled name wins
    assert cache.get("safety_classifier").version == own.version
    assert ModelCache(tmp_path, bundled=False).names() == ["broken", "safety_classifier"]
    assert ModelCache(None).get("safety_classifier").version == SklearnModel.load(SAFETY_MODEL).version
