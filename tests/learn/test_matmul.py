"""The three matrix multiplies give numpy's answer on square, rectangular and degenerate shapes."""

from __future__ import annotations

import numpy as np
import pytest

from mini_claude.learn.matmul import matmul_numba, matmul_numpy, matmul_python


@pytest.mark.parametrize(("n", "k", "m"), [(1, 1, 1), (3, 5, 2), (17, 8, 33), (64, 64, 64)])
def test_all_three_agree_with_numpy(n: int, k: int, m: int) -> None:
    rng = np.random.default_rng(n * 100 + m)
    a, b = rng.normal(size=(n, k)), rng.normal(size=(k, m))
    expected = a @ b
    np.testing.assert_allclose(matmul_python(a.tolist(), b.tolist()), expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(matmul_numba(a, b), expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(matmul_numpy(a, b), expected, rtol=1e-12, atol=1e-12)


def test_python_and_numba_sum_in_the_same_order() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(20, 30)), rng.normal(size=(30, 10))
    # Same loop nest, no fastmath: the two agree bit for bit (numpy's blocked dgemm need not).
    assert np.array_equal(np.array(matmul_python(a.tolist(), b.tolist())), matmul_numba(a, b))


def test_shape_errors_and_dtypes() -> None:
    with pytest.raises(ValueError, match="inner dimensions"):
        matmul_python([[1.0, 2.0]], [[1.0, 2.0]])
    with pytest.raises(ValueError, match="cannot multiply"):
        matmul_numba(np.ones((2, 3)), np.ones((2, 3)))
    ints = matmul_numba(np.arange(6).reshape(2, 3), np.arange(6).reshape(3, 2))  # converted to float64
    assert ints.dtype == np.float64 and ints.tolist() == [[10.0, 13.0], [28.0, 40.0]]
    assert matmul_python([], []) == []
