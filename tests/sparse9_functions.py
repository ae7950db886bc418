"""Functions for tests/test_sparse_round9.py: ops the tracer took as dense (every output
on every input, ``exact: false``) though their structure is plain: a matrix's diagonal
(``torch.diag`` of a matrix runs as ``diagonal_copy``), ``trace``, ``rot90``,
``block_diag``, the gates of an LSTM cell (``unsafe_chunk``), ``kthvalue`` and
``aminmax``. Loaded by module name."""

from __future__ import annotations

import torch

from jacobian_service import Input, register


@register(inputs=[Input("Q", shape=("n", "n"), dtype="float64")],
          description="The diagonal of a matrix, squared, and two traces: each reads the diagonal only.")
def diagonal_invariants(Q: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.diag(Q) ** 2, torch.stack([torch.trace(Q), torch.trace(torch.sin(Q))])])


@register(inputs=[Input("u", shape=("n", "n"), dtype="float64")],
          description="A field times itself rotated by 90 degrees: two entries a row.")
def rotated_product(u: torch.Tensor) -> torch.Tensor:
    return torch.rot90(u, 1, (0, 1)) * u


@register(inputs=[Input("x", shape=("k4",), dtype="float64")],
          description="Per-cell 2 x 2 matrices from the state, assembled by block_diag, applied to ones.")
def block_operator(x: torch.Tensor) -> torch.Tensor:
    blocks = torch.tanh(x).reshape(-1, 2, 2)
    return torch.block_diag(*blocks) @ torch.ones(x.numel() // 2, dtype=x.dtype)


_W_IH = torch.linspace(-1, 1, 8 * 3, dtype=torch.float64).reshape(8, 3)
_W_HH = torch.linspace(1, -1, 8 * 2, dtype=torch.float64).reshape(8, 2)


@register(inputs=[Input("x", shape=("b", 3), dtype="float64")],
          description="One LSTM cell step per sample (its gates split by unsafe_chunk): samples stay apart.")
def lstm_step(x: torch.Tensor) -> torch.Tensor:
    h0 = torch.sin(x[:, :2])
    c0 = torch.cos(x[:, 1:])
    h, c = torch.lstm_cell(x, (h0, c0), _W_IH, _W_HH)
    return torch.cat([h, c], 1)


@register(inputs=[Input("x", shape=("r", "c"), dtype="float64")],
          description="Per row: its second smallest value, its min and its max.")
def row_order_stats(x: torch.Tensor) -> torch.Tensor:
    lo, hi = torch.aminmax(x, dim=1)
    return torch.stack([x.kthvalue(2, dim=1).values, lo, hi], 1)


@register(inputs=[Input("Q", shape=("n", "n"), dtype="float64")],
          description="An energy of the diagonal, the trace, a rotation and per-cell blocks: a sparse Hessian.")
def structured_energy(Q: torch.Tensor) -> torch.Tensor:
    blocks = torch.block_diag(*Q.reshape(-1, 2, 2)[:2])
    return (torch.diag(Q) ** 3).sum() + torch.trace(Q) ** 2 + (torch.rot90(Q, 1, (0, 1)) * Q).sum() + (blocks**4).sum()


# ------------------------------------------------------------------ elementwise ops aten does not tag pointwise


@register(inputs=[Input("x", shape=("r", "c2"), dtype="float64")], description="A gated linear unit along the rows: F.glu.")
def gated(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.glu(x, 1)


@register(inputs=[Input("x", shape=(2, "n"), dtype="float64")],
          description="A complex field from moduli and phases (torch.polar), times torch.complex, as real pairs.")
def phasor(x: torch.Tensor) -> torch.Tensor:
    z = torch.polar(torch.exp(x[0]), x[1]) * torch.complex(x[0], x[1] ** 2)
    return torch.view_as_real(z)


@register(inputs=[Input("x", shape=("b", 3, "l"), dtype="float64")],
          description="PReLU with a fixed weight per channel, log-sigmoid and hardswish: elementwise.")
def activations(x: torch.Tensor) -> torch.Tensor:
    w = torch.tensor([0.1, 0.2, 0.3], dtype=x.dtype)
    F = torch.nn.functional
    return F.prelu(x, w) + F.logsigmoid(x) + F.hardswish(4 * x)


@register(inputs=[Input("x", shape=("b", "n"), dtype="float64")],
          description="Per-sample residuals by mse_loss, huber_loss and binary_cross_entropy (reduction none).")
def loss_terms(x: torch.Tensor) -> torch.Tensor:
    F = torch.nn.functional
    p = torch.sigmoid(x)
    return torch.cat([F.mse_loss(x[:, 1:], x[:, :-1], reduction="none"),
                      F.huber_loss(x, 0.5 * x.roll(1, 1), reduction="none", delta=0.3),
                      F.binary_cross_entropy(p, torch.full_like(p, 0.25), reduction="none")], 1)


@register(inputs=[Input("x", shape=("n",), dtype="float64")],
          description="A robust smoothing energy: mean Huber of neighbour differences plus a logistic term.")
def smoothing_energy(x: torch.Tensor) -> torch.Tensor:
    F = torch.nn.functional
    return F.huber_loss(x[1:], x[:-1], delta=0.2) + F.mse_loss(x, torch.ones_like(x), reduction="sum") \
        - F.logsigmoid(x[1:] * x[:-1]).sum()


@register(inputs=[Input("x", shape=("b", "t", "d"), dtype="float64")],
          description="Self-attention over a batch of sequences: each sequence on its own.")
def attention(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.scaled_dot_product_attention(x, x, x)


# ------------------------------------------------------------------ in-place ops as their out-of-place rules


@register(inputs=[Input("x", shape=("n",), dtype="float64")],
          description="A running integral and a running product, computed in place (cumsum_, cumprod_).")
def running_in_place(x: torch.Tensor) -> torch.Tensor:
    s = 0.1 * x
    s.cumsum_(0)
    p = 1 + 0.1 * x
    p.cumprod_(0)
    return torch.cat([s, p])


@register(inputs=[Input("x", shape=("r", "c"), dtype="float64")],
          description="The lower and strictly upper triangles of a field, masked in place (tril_, triu_).")
def triangles_in_place(x: torch.Tensor) -> torch.Tensor:
    lower, upper = torch.sin(x), x**2
    lower.tril_()
    upper.triu_(1)
    return lower + upper


def _tridiagonal(n: int) -> torch.Tensor:
    return 2 * torch.eye(n, dtype=torch.float64) - torch.diag(torch.ones(n - 1, dtype=torch.float64), 1) \
        - torch.diag(torch.ones(n - 1, dtype=torch.float64), -1)


@register(inputs=[Input("x", shape=("b", 6), dtype="float64")],
          description="Per-sample linear maps with a tridiagonal weight, accumulated in place (addmm_, addmv_, baddbmm_).")
def linear_in_place(x: torch.Tensor) -> torch.Tensor:
    y = torch.zeros(x.shape[0], 6, dtype=x.dtype)
    y.addmm_(x, _tridiagonal(6))
    z = torch.zeros(6, dtype=x.dtype)
    z.addmv_(_tridiagonal(6), x[0])
    w = torch.zeros(x.shape[0], 1, 6, dtype=x.dtype)
    w.baddbmm_(torch.tanh(x)[:, None, :], _tridiagonal(6).expand(x.shape[0], 6, 6))
    return torch.cat([y.reshape(-1), z, w.reshape(-1)])


@register(inputs=[Input("x", shape=("n",))], description="x * sum(x): every output on every input.")
def all_coupled(x: torch.Tensor) -> torch.Tensor:
    return x * x.sum()


_LABELS = torch.tensor([0, 3, 1, 3, 2, 0, 1, 2])


@register(inputs=[Input("z", shape=(8, 4), dtype="float64")],
          description="Per-sample cross-entropy of 8 samples' logits with fixed labels (one ignored), and their NLL.")
def classifier_losses(z: torch.Tensor) -> torch.Tensor:
    F = torch.nn.functional
    return torch.cat([F.cross_entropy(z, _LABELS, reduction="none"),
                      F.nll_loss(z, _LABELS, reduction="none", ignore_index=3)])


@register(inputs=[Input("z", shape=(8, 4), dtype="float64")], description="Mean cross-entropy of 8 samples' logits.")
def classifier_energy(z: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(z, _LABELS, label_smoothing=0.1)


def _bead_energy(x: torch.Tensor) -> torch.Tensor:
    return ((x[1:] - x[:-1]) ** 2).sum() + (x[:, 0] * x[:, 1]).sum() + (x.diagonal() ** 3).sum()


@register(inputs=[Input("x", shape=("n", 3), dtype="float64")],
          description="Forces on a chain of beads, -grad E by torch.func.grad inside: the Jacobian is -Hessian E.")
def bead_forces(x: torch.Tensor) -> torch.Tensor:
    return -torch.func.grad(_bead_energy)(x)


def _row_energy(x: torch.Tensor) -> torch.Tensor:
    F = torch.nn.functional
    return F.softplus(x).sum() + F.elu(x - 0.5).sum() + F.mse_loss(x[:, 0], x[:, 1], reduction="sum") \
        + (x.log_softmax(1) ** 2).sum()


@register(inputs=[Input("x", shape=("n", 3), dtype="float64")],
          description="-grad of an energy of softplus, elu, mse_loss and log_softmax per row: rows stay apart.")
def row_forces(x: torch.Tensor) -> torch.Tensor:
    return -torch.func.grad(_row_energy)(x)
