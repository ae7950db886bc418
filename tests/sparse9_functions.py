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
