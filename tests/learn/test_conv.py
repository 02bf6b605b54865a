"""conv2d_single and Conv2D against finite differences and against torch.nn.functional.conv2d (float64)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from learn.gradcheck import numeric_grad, rel_error
from mini_claude.learn.conv import Conv2D, conv2d_single, conv2d_single_backward

TOL = 1e-7
# (N, C, F, H, W, kernel, stride, padding): stride > 1, uneven strides that leave pixels unread, padding
# wider than the kernel's half, batch 1, a kernel as big as the (padded) input, non-square everything.
CASES = [
    (2, 3, 4, 5, 6, 3, 1, 1),
    (1, 2, 3, 7, 7, 3, 2, 0),
    (1, 1, 1, 6, 5, (2, 3), (2, 1), (0, 2)),
    (3, 2, 2, 5, 5, 2, 3, 2),
    (1, 2, 2, 4, 3, (4, 3), 1, 0),
    (2, 1, 3, 8, 9, 3, (3, 2), 1),
]


@pytest.mark.parametrize(("N", "C", "F_", "H", "W", "k", "stride", "padding"), CASES)
def test_conv2d_matches_torch(N: int, C: int, F_: int, H: int, W: int, k, stride, padding) -> None:
    rng = np.random.default_rng(0)
    layer = Conv2D(C, F_, k, stride, padding, seed=1)
    x = rng.normal(size=(N, C, H, W))
    out = layer.forward(x)
    d_out = rng.normal(size=out.shape)
    dx = layer.backward(d_out)

    tx = torch.tensor(x, requires_grad=True)
    tw = torch.tensor(layer.params["weight"], requires_grad=True)
    tb = torch.tensor(layer.params["bias"], requires_grad=True)
    t_out = F.conv2d(tx, tw, tb, stride=stride, padding=padding)
    (t_out * torch.from_numpy(d_out)).sum().backward()
    assert out.shape == tuple(t_out.shape)
    assert rel_error(out, t_out.detach().numpy()) < TOL
    for ours, ref in ((dx, tx.grad), (layer.grads["weight"], tw.grad), (layer.grads["bias"], tb.grad)):
        assert rel_error(ours, ref.numpy()) < TOL


@pytest.mark.parametrize(("N", "C", "F_", "H", "W", "k", "stride", "padding"), CASES[:4])
def test_conv2d_gradients_match_finite_differences(N: int, C: int, F_: int, H: int, W: int, k, stride, padding) -> None:
    rng = np.random.default_rng(2)
    layer = Conv2D(C, F_, k, stride, padding, seed=3)
    x = rng.normal(size=(N, C, H, W))
    d_out = rng.normal(size=layer.forward(x).shape)
    grads = {"x": layer.backward(d_out), **layer.grads}

    def loss() -> float:
        return float((layer.forward(x) * d_out).sum())

    for name, value in {"x": x, **layer.params}.items():
        assert rel_error(grads[name], numeric_grad(loss, value)) < TOL, name


def test_single_channel_primitive_by_hand() -> None:
    x = np.arange(16.0).reshape(4, 4)
    k = np.array([[1.0, 0.0], [0.0, -1.0]])  # x[y, x] - x[y+1, x+1]: -5 everywhere (no flip)
    np.testing.assert_array_equal(conv2d_single(x, k), np.full((3, 3), -5.0))
    np.testing.assert_array_equal(conv2d_single(x, k, stride=2), np.full((2, 2), -5.0))
    padded = conv2d_single(x, np.ones((3, 3)), padding=1)  # sums of 3x3 neighbourhoods, zeros outside
    assert padded.shape == (4, 4) and padded[0, 0] == 0 + 1 + 4 + 5 and padded[1, 1] == sum(range(11)) - 3 - 7 + 0
    # Stride 3 over a 7-wide input with a 3-wide kernel reads columns 0..5: column 6 gets no gradient.
    dx, dk = conv2d_single_backward(np.ones((7, 7)), np.ones((3, 3)), np.ones((2, 2)), stride=3)
    assert dx[:, 6].sum() == 0 and dx[6, :].sum() == 0 and dx[:6, :6].min() == 1
    np.testing.assert_array_equal(dk, np.full((3, 3), 4.0))
    batch = np.random.default_rng(0).normal(size=(5, 6, 6))  # leading axes broadcast
    np.testing.assert_allclose(conv2d_single(batch, k)[3], conv2d_single(batch[3], k))


def test_layer_without_bias_and_errors() -> None:
    layer = Conv2D(2, 3, 3, bias=False)
    assert "bias" not in layer.params
    x = np.random.default_rng(0).normal(size=(1, 2, 5, 5))
    ref = F.conv2d(torch.from_numpy(x), torch.from_numpy(layer.params["weight"]))
    assert rel_error(layer.forward(x), ref.numpy()) < TOL
    with pytest.raises(ValueError, match="input channels"):
        layer.forward(np.zeros((1, 3, 5, 5)))
    with pytest.raises(ValueError, match="does not fit"):
        conv2d_single(np.zeros((2, 2)), np.zeros((3, 3)))
