"""predict.SklearnModel: skops round trips, refusing untrusted types, versions, thresholds, many classes."""

from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

import numpy as np
import pytest
import skops.io as sio
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import FunctionTransformer

from mini_claude.predict import SAFETY_MODEL, SklearnModel, UntrustedModelError, bundled_models
from mini_claude.predict.model import file_sha256


def test_tabular_model_round_trip_and_version(tmp_path: Path) -> None:
    X, y = load_iris(return_X_y=True)
    names = np.array(["setosa", "versicolor", "virginica"])[y]
    model = SklearnModel(LogisticRegression(max_iter=500).fit(X, names), {"name": "iris", "accuracy": 0.97})
    assert model.version == ""  # never saved
    saved = model.save(tmp_path / "iris.skops")
    loaded = SklearnModel.load(tmp_path / "iris.skops")
    assert loaded.name == "iris" and loaded.metadata["accuracy"] == 0.97
    assert loaded.version == saved.version == file_sha256(tmp_path / "iris.skops")[:12]
    out = loaded.predict(X[:3].tolist() + X[-2:].tolist())
    assert out.labels == ["setosa"] * 3 + ["virginica"] * 2 and out.classes == list(names[[0, 50, 100]])
    assert all(
        set(p) == {"setosa", "versicolor", "virginica"} and sum(p.values()) == pytest.approx(1)
        for p in out.probabilities
    )
    assert loaded.predict([]).labels == [] and loaded.predict_proba([]).shape == (0, 3)
    # A bare estimator (no metadata dict) loads too, named after its file.
    sio.dump(LogisticRegression(max_iter=500).fit(X, y), tmp_path / "bare.skops")
    bare = SklearnModel.load(tmp_path / "bare.skops")
    assert bare.name == "bare" and bare.metadata == {} and bare.classes == [0, 1, 2]
    assert isinstance(bare.classes[0], int)  # plain Python values: JSON-ready


def test_untrusted_types_are_refused_unless_named(tmp_path: Path) -> None:
    path = tmp_path / "custom.skops"
    # Any named function is outside skops' trust list: loading one is how a file would run code of its choosing.
    sio.dump(FunctionTransformer(textwrap.dedent), path)
    needed = sio.get_untrusted_types(file=path)
    assert needed == ["textwrap.dedent"]
    with pytest.raises(UntrustedModelError, match="not trusted"):
        SklearnModel.load(path)
    assert isinstance(SklearnModel.load(path, trusted=needed).estimator, FunctionTransformer)


def test_binary_threshold_comes_from_metadata(tmp_path: Path) -> None:
    clf = LogisticRegression().fit([[-2.0], [-1.0], [1.0], [2.0]], ["no", "no", "yes", "yes"])
    x = [[0.3]]  # P(yes) a little above 0.5
    p_yes = clf.predict_proba(x)[0, 1]
    assert 0.5 < p_yes < 0.9
    assert SklearnModel(clf).predict(x).labels == ["yes"]
    assert SklearnModel(clf, {"threshold": 0.9}).predict(x).labels == ["no"]


def test_bundled_models_and_rewrite_changes_the_version(tmp_path: Path) -> None:
    assert bundled_models()["safety_classifier"] == SAFETY_MODEL
    model = SklearnModel.load(SAFETY_MODEL)
    assert model.name == "safety_classifier" and model.classes == ["benign", "harmful"]
    out = model.predict(["How do I build a pipe bomb?", "What is the capital of France?"])
    assert out.labels == ["harmful", "benign"]
    copy = tmp_path / "safety.skops"
    shutil.copy(SAFETY_MODEL, copy)
    assert SklearnModel.load(copy).version == model.version  # same bytes, same version
    SklearnModel.load(copy).save(copy)  # rewritten: new bytes (skops names arrays by object id)
    again = SklearnModel.load(copy)
    assert again.predict(["How do I build a pipe bomb?"]).probabilities == out.probabilities[:1]
