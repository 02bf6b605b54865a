"""The numpy LSTM against finite differences and against torch.nn.LSTM (weights copied, float64)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from learn.gradcheck import numeric_grad, rel_error
from mini_claude.learn.lstm import LSTM, sigmoid

TOL = 1e-7


def make_case(T: int, B: int, D: int, H: int, batch_first: bool, seed: int = 0):
    rng = np.random.default_rng(seed)
    layer = LSTM(D, H, batch_first=batch_first, seed=seed)
    shape = (B, T, D) if batch_first else (T, B, D)
    x = rng.normal(size=shape)
    h0, c0 = rng.normal(size=(B, H)), rng.normal(size=(B, H))
    # The loss reads every output and both final states, so every path of the backward pass is exercised.
    w_out = rng.normal(size=(*shape[:2], H))
    w_h, w_c = rng.normal(size=(B, H)), rng.normal(size=(B, H))
    return layer, x, h0, c0, w_out, w_h, w_c


def numpy_grads(layer: LSTM, x, h0, c0, w_out, w_h, w_c):
    out, (h, c) = layer.forward(x, (h0, c0))
    dx, (dh0, dc0) = layer.backward(w_out, (w_h, w_c))
    return out, h, c, {"x": dx, "h0": dh0, "c0": dc0, **layer.grads}


@pytest.mark.parametrize(("T", "B", "batch_first"), [(4, 2, False), (3, 1, True), (1, 3, False), (5, 1, False)])
def test_gradients_match_finite_differences(T: int, B: int, batch_first: bool) -> None:
    layer, x, h0, c0, w_out, w_h, w_c = make_case(T, B, D=3, H=5, batch_first=batch_first)
    *_, grads = numpy_grads(layer, x, h0, c0, w_out, w_h, w_c)

    def loss() -> float:
        out, (h, c) = layer.forward(x, (h0, c0))
        return float((out * w_out).sum() + (h * w_h).sum() + (c * w_c).sum())

    inputs = {"x": x, "h0": h0, "c0": c0, **layer.params}
    for name, value in inputs.items():
        assert rel_error(grads[name], numeric_grad(loss, value)) < TOL, name


@pytest.mark.parametrize(("T", "B", "D", "H", "batch_first"), [(6, 3, 4, 7, False), (2, 1, 1, 2, True)])
def test_matches_torch_lstm(T: int, B: int, D: int, H: int, batch_first: bool) -> None:
    layer, x, h0, c0, w_out, w_h, w_c = make_case(T, B, D, H, batch_first, seed=1)
    out, h, c, grads = numpy_grads(layer, x, h0, c0, w_out, w_h, w_c)

    ref = torch.nn.LSTM(D, H, batch_first=batch_first).double()
    with torch.no_grad():
        for name, value in layer.params.items():
            getattr(ref, f"{name}_l0").copy_(torch.from_numpy(value))
    tx, th0, tc0 = (torch.tensor(a, requires_grad=True) for a in (x, h0[None], c0[None]))
    t_out, (t_h, t_c) = ref(tx, (th0, tc0))
    loss = (t_out * torch.from_numpy(w_out)).sum() + (t_h[0] * torch.from_numpy(w_h)).sum()
    (loss + (t_c[0] * torch.from_numpy(w_c)).sum()).backward()

    assert rel_error(out, t_out.detach().numpy()) < TOL
    assert rel_error(h, t_h[0].detach().numpy()) < TOL and rel_error(c, t_c[0].detach().numpy()) < TOL
    torch_grads = {"x": tx.grad, "h0": th0.grad[0], "c0": tc0.grad[0]}
    torch_grads |= {name: getattr(ref, f"{name}_l0").grad for name in LSTM.PARAMS}
    for name, g in torch_grads.items():
        assert rel_error(grads[name], g.numpy()) < TOL, name


def test_zero_state_default_and_gate_order() -> None:
    layer = LSTM(2, 3, seed=0)
    x = np.random.default_rng(0).normal(size=(1, 1, 2))
    out, (h, c) = layer.forward(x)
    # One step from zero state, by hand: c = i*g, h = o*tanh(c), gates in the order i, f, g, o.
    a = x[0] @ layer.params["weight_ih"].T + layer.params["bias_ih"] + layer.params["bias_hh"]
    i, g, o = sigmoid(a[:, 0:3]), np.tanh(a[:, 6:9]), sigmoid(a[:, 9:12])
    np.testing.assert_allclose(c, i * g, rtol=1e-12)
    np.testing.assert_allclose(h, o * np.tanh(i * g), rtol=1e-12)
    np.testing.assert_array_equal(out[0], h)
    with pytest.raises(RuntimeError, match="forward"):
        LSTM(2, 3).backward(np.zeros((1, 1, 3)))


def test_sigmoid_is_stable() -> None:
    z = np.array([-1000.0, -30.0, 0.0, 30.0, 1000.0])
    with np.errstate(over="raise"):
        s = sigmoid(z)
    np.testing.assert_allclose(s, 1 / (1 + np.exp(-np.clip(z, -700, 700))), rtol=1e-12, atol=1e-300)
