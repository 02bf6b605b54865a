"""Dense indexes: HNSW against exact search (recall), persistence, incremental updates, tombstones; RRF."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mini_claude.rag.index import ExactIndex, HNSWIndex
from mini_claude.rag.retrieve import rrf

pytestmark = pytest.mark.one_thread


def clustered(n: int, dim: int = 64, seed: int = 0) -> np.ndarray:
    """Unit vectors around 50 centres in a 16-d subspace plus noise: like sentence embeddings, not uniform."""
    rng = np.random.default_rng(seed)
    basis = rng.normal(size=(16, dim))
    centres = rng.normal(size=(50, 16))
    x = (centres[rng.integers(0, 50, n)] + 0.5 * rng.normal(size=(n, 16))) @ basis + 0.3 * rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def recall_at_10(index: HNSWIndex, exact: ExactIndex, queries: np.ndarray) -> float:
    hits = [len(set(index.search(q, 10)[0]) & set(exact.search(q, 10)[0])) for q in queries]
    return sum(hits) / (10 * len(queries))


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    x = clustered(3000)
    return x, clustered(100, seed=1)


def test_exact_index_is_exact(data: tuple[np.ndarray, np.ndarray]) -> None:
    x, queries = data
    index = ExactIndex(x.shape[1])
    index.add(np.arange(100, 100 + len(x)), x)
    labels, scores = index.search(queries[0], 5)
    expected = np.argsort(-(x @ queries[0]))[:5] + 100
    assert labels.tolist() == expected.tolist()
    np.testing.assert_allclose(scores, np.sort(x @ queries[0])[::-1][:5], rtol=1e-5)
    index.remove(labels[:2])
    assert index.search(queries[0], 3)[0].tolist() == expected[2:5].tolist()


def test_hnsw_recall_against_exact(data: tuple[np.ndarray, np.ndarray]) -> None:
    x, queries = data
    hnsw, exact = HNSWIndex(x.shape[1], M=16, ef_construction=100), ExactIndex(x.shape[1])
    hnsw.add(np.arange(len(x)), x)
    exact.add(np.arange(len(x)), x)
    assert recall_at_10(hnsw, exact, queries) >= 0.95
    labels, scores = hnsw.search(queries[0], 10)
    np.testing.assert_allclose(scores, x[labels] @ queries[0], rtol=1e-5)  # true similarities, best first
    assert (np.diff(scores) <= 0).all()
    assert hnsw.links0[: hnsw.n].max() < hnsw.n and (hnsw.links0[: hnsw.n] >= 0).sum(1).min() >= 1  # connected


def test_hnsw_saves_loads_and_grows_incrementally(data: tuple[np.ndarray, np.ndarray], tmp_path: Path) -> None:
    x, queries = data
    first = HNSWIndex(x.shape[1], ef_construction=64)
    first.add(np.arange(2000), x[:2000])
    first.save(tmp_path / "i.npz")
    loaded = HNSWIndex.load(tmp_path / "i.npz")
    for q in queries[:10]:
        assert loaded.search(q, 10)[0].tolist() == first.search(q, 10)[0].tolist()
    loaded.add(np.arange(2000, 3000), x[2000:])  # the loaded graph takes new nodes: no rebuild
    first.add(np.arange(2000, 3000), x[2000:])
    for q in queries[:10]:  # and ends up the very graph built without a save in between (levels continue)
        assert loaded.search(q, 10)[0].tolist() == first.search(q, 10)[0].tolist()
    exact = ExactIndex(x.shape[1])
    exact.add(np.arange(3000), x)
    assert recall_at_10(loaded, exact, queries) >= 0.95


def test_hnsw_removed_labels_are_never_returned(data: tuple[np.ndarray, np.ndarray]) -> None:
    x, queries = data
    index = HNSWIndex(x.shape[1], ef_construction=64)
    index.add(np.arange(1000), x[:1000])
    gone = index.search(queries[0], 10)[0][:5]
    index.remove(gone)
    assert len(index) == 995
    labels = index.search(queries[0], 10)[0]
    assert len(labels) == 10 and not set(labels) & set(gone)
    index.add(gone[:1], x[gone[:1]])  # re-adding a label makes it findable again
    assert gone[0] in index.search(queries[0], 10)[0]


def test_rrf_scores_are_reciprocal_ranks() -> None:
    hits = rrf({"keyword": [(1, 9.0), (2, 8.0), (3, 1.0)], "dense": [(3, 0.9), (1, 0.8)]}, k=60)
    assert [h.chunk_id for h in hits] == [1, 3, 2]
    assert hits[0].score == pytest.approx(1 / 61 + 1 / 62) and hits[0].ranks == {"keyword": 1, "dense": 2}
    assert hits[1].score == pytest.approx(1 / 63 + 1 / 61)
    assert hits[2].score == pytest.approx(1 / 62) and hits[2].ranks == {"keyword": 2}
