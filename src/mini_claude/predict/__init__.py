"""Serving scikit-learn models: load a `.skops` file safely, predict, know its version (`predict.model`), and
keep the served ones by name, reloaded when their file changes (`predict.cache`).

The safety classifier (`data/safety_classifier.skops`) is the first such model; the data pipeline, the
evaluation and the server all call it through `SklearnModel`.
"""

from mini_claude.predict.cache import CacheStats, ModelCache, ModelLoadError, ModelNotFoundError
from mini_claude.predict.model import SAFETY_MODEL, Predictions, SklearnModel, UntrustedModelError, bundled_models

__all__ = [
    "SAFETY_MODEL",
    "CacheStats",
    "ModelCache",
    "ModelLoadError",
    "ModelNotFoundError",
    "Predictions",
    "SklearnModel",
    "UntrustedModelError",
    "bundled_models",
]
