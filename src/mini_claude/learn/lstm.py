"""An LSTM layer, from scratch in numpy: the forward pass over a sequence and backpropagation through time.

A long short-term memory cell (Hochreiter & Schmidhuber, 1997; the forget gate is Gers et al., 2000) carries
two states from step to step: the cell c, a running memory that is only ever *scaled and added to*, and the
hidden state h that the next layer sees. At step t, from the input x_t and the previous h:

    a = x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh          (B, 4H): four pre-activations side by side
    i = σ(a_i)   input gate: how much of the candidate to write
    f = σ(a_f)   forget gate: how much of the old cell to keep
    g = tanh(a_g) the candidate values
    o = σ(a_o)   output gate: how much of the cell to show
    c_t = f ⊙ c_{t-1} + i ⊙ g
    h_t = o ⊙ tanh(c_t)

The additive path c_{t-1} → c_t (gradient ∂c_t/∂c_{t-1} = f, no squashing) is why gradients survive many
steps where a plain RNN's vanish.

Design choices:

- **torch's layout, so weights copy across one to one** (`torch.nn.LSTM` docs): gate order i, f, g, o in the
  rows of `weight_ih` (4H, D) and `weight_hh` (4H, H), and two biases `bias_ih`, `bias_hh` that both add in
  (one would do; two keep the copy exact). Initialisation is torch's too: U(−1/√H, 1/√H) for everything.
- **Time-major by default**, (T, B, D) as `torch.nn.LSTM` is: the loop runs over the first axis, so each
  x[t] is a contiguous (B, D) block. `batch_first=True` takes and returns (B, T, D) and transposes once.
- **Backward is written out, gate by gate.** `forward` keeps every step's gates and states; `backward` walks
  the steps in reverse, carrying dh and dc into the previous step, and accumulates the weight gradients in
  `grads` (the same names as the parameters). The local derivatives used: σ' = σ(1 − σ), tanh' = 1 − tanh².
- One layer, one direction: stacking and bidirectionality are loops over this layer, not new mathematics.
"""

from __future__ import annotations

import numpy as np


def sigmoid(x: np.ndarray) -> np.ndarray:
    """σ(x) = 1 / (1 + e^−x), computed without overflow for large |x| (e^x for x < 0, e^−x otherwise)."""
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


class LSTM:
    """One LSTM layer over a whole sequence: `forward` then `backward`, gradients in `grads`."""

    PARAMS = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")

    def __init__(
        self, input_size: int, hidden_size: int, batch_first: bool = False, seed: int = 0, dtype: type = np.float64
    ) -> None:
        self.input_size, self.hidden_size, self.batch_first = input_size, hidden_size, batch_first
        rng = np.random.default_rng(seed)
        bound = 1.0 / np.sqrt(hidden_size)
        H, D = hidden_size, input_size
        shapes = {"weight_ih": (4 * H, D), "weight_hh": (4 * H, H), "bias_ih": (4 * H,), "bias_hh": (4 * H,)}
        self.params = {k: rng.uniform(-bound, bound, s).astype(dtype) for k, s in shapes.items()}
        self.grads = {k: np.zeros_like(v) for k, v in self.params.items()}
        self._cache: dict[str, np.ndarray] | None = None

    # -------------------------------------------------------------------------------------- forward
    def forward(
        self, x: np.ndarray, state: tuple[np.ndarray, np.ndarray] | None = None
    ) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
        """Run the sequence.

        Args:
            x: (T, B, D), or (B, T, D) with `batch_first`.
            state: (h0, c0), each (B, H); zeros if None.

        Returns:
            out: every step's h, (T, B, H) (or (B, T, H) with `batch_first`), and (h_T, c_T), each (B, H).
            (torch returns h_T as (num_layers, B, H); here there is one layer, so the leading 1 is dropped.)
        """
        if self.batch_first:
            x = x.transpose(1, 0, 2)  # (B, T, D) -> (T, B, D)
        T, B, _ = x.shape
        H = self.hidden_size
        p = self.params
        h0, c0 = state if state is not None else (np.zeros((B, H), x.dtype), np.zeros((B, H), x.dtype))
        hs = np.empty((T + 1, B, H), x.dtype)  # hs[t + 1] is h_t; hs[0] is h0
        cs = np.empty((T + 1, B, H), x.dtype)
        gates = np.empty((T, B, 4 * H), x.dtype)  # activated i, f, g, o of every step, kept for backward
        hs[0], cs[0] = h0, c0
        # The input half of every step's pre-activation does not depend on h: one matrix product for all T.
        a_x = x @ p["weight_ih"].T + p["bias_ih"] + p["bias_hh"]  # (T, B, 4H)
        for t in range(T):
            a = a_x[t] + hs[t] @ p["weight_hh"].T  # (B, 4H)
            i, f, o = sigmoid(a[:, :H]), sigmoid(a[:, H : 2 * H]), sigmoid(a[:, 3 * H :])  # (B, H) each
            g = np.tanh(a[:, 2 * H : 3 * H])  # (B, H)
            cs[t + 1] = f * cs[t] + i * g
            hs[t + 1] = o * np.tanh(cs[t + 1])
            gates[t] = np.concatenate([i, f, g, o], axis=1)
        self._cache = {"x": x, "hs": hs, "cs": cs, "gates": gates}
        out = hs[1:]  # (T, B, H)
        if self.batch_first:
            out = out.transpose(1, 0, 2)  # (B, T, H)
        return out, (hs[T], cs[T])

    # ------------------------------------------------------------------------------------- backward
    def backward(
        self, d_out: np.ndarray, d_state: tuple[np.ndarray | None, np.ndarray | None] = (None, None)
    ) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
        """Backpropagation through time for the last `forward`.

        Args:
            d_out: ∂L/∂out, the same shape as `out`.
            d_state: (∂L/∂h_T, ∂L/∂c_T), each (B, H), when the final state feeds the loss too.

        Returns:
            ∂L/∂x (the shape of x) and (∂L/∂h0, ∂L/∂c0). The parameter gradients are *set* in `grads`.
        """
        if self._cache is None:
            raise RuntimeError("backward needs a forward pass first")
        x, hs, cs, gates = (self._cache[k] for k in ("x", "hs", "cs", "gates"))
        if self.batch_first:
            d_out = d_out.transpose(1, 0, 2)  # (B, T, H) -> (T, B, H)
        T, B, _ = x.shape
        H = self.hidden_size
        p = self.params
        dh_T, dc_T = d_state
        dh_next = np.zeros((B, H), x.dtype) if dh_T is None else dh_T  # ∂L/∂h_t arriving from step t + 1
        dc_next = np.zeros((B, H), x.dtype) if dc_T is None else dc_T  # ∂L/∂c_t arriving from step t + 1
        da = np.empty((T, B, 4 * H), x.dtype)  # ∂L/∂a for every step
        for t in reversed(range(T)):
            i, f, g, o = (gates[t][:, k * H : (k + 1) * H] for k in range(4))  # (B, H) each
            tanh_c = np.tanh(cs[t + 1])
            dh = d_out[t] + dh_next  # h_t feeds the output at t and the step t + 1
            dc = dc_next + dh * o * (1.0 - tanh_c**2)  # c_t feeds h_t and c_{t+1}
            d_i, d_f, d_g, d_o = dc * g, dc * cs[t], dc * i, dh * tanh_c  # through c_t = f c + i g, h = o tanh c
            da[t] = np.concatenate(
                [d_i * i * (1 - i), d_f * f * (1 - f), d_g * (1 - g**2), d_o * o * (1 - o)], axis=1
            )  # (B, 4H): through σ and tanh
            dh_next = da[t] @ p["weight_hh"]  # (B, H)
            dc_next = dc * f
        # The weight gradients sum over steps and batch: one contraction each instead of T small ones.
        self.grads["weight_ih"] = np.einsum("tbg,tbd->gd", da, x)  # (4H, D)
        self.grads["weight_hh"] = np.einsum("tbg,tbh->gh", da, hs[:-1])  # (4H, H)
        self.grads["bias_ih"] = da.sum(axis=(0, 1))  # (4H,)
        self.grads["bias_hh"] = self.grads["bias_ih"].copy()
        dx = da @ p["weight_ih"]  # (T, B, D)
        if self.batch_first:
            dx = dx.transpose(1, 0, 2)
        return dx, (dh_next, dc_next)
