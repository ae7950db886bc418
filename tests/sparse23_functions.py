"""Functions for tests/test_sparse_round23.py. Loaded by module name."""

from __future__ import annotations

import torch

from jacobian_service import Input, register
from jacobian_service.sparsity import banded

# ------------------------------------------------------------------ the dense check's round-off

_TABLE = torch.zeros(4096, dtype=torch.float32)  # (a buffer made elsewhere: writing into it is not traced)


@register(inputs=[Input("x", shape=("n",), dtype="float32")],
          description="Large float32 terms that cancel, written into a module buffer the tracer cannot "
                      "follow: the pattern is probed, from dense Jacobians.")
def probed_cancels23(x: torch.Tensor) -> torch.Tensor:
    buf = _TABLE[: x.shape[0]].clone()
    buf.copy_((x * 1e4 + x) - x * 1e4)
    return buf * x.roll(1)


@register(inputs=[Input("x", shape=("n",), dtype="float32")],
          description="The same cancelling float32 terms in an energy: its Hessian is probed, from dense "
                      "Hessians.")
def probed_energy23(x: torch.Tensor) -> torch.Tensor:
    buf = _TABLE[: x.shape[0]].clone()
    buf.copy_((x * 1e4 + x) - x * 1e4)
    return (buf * buf * x.roll(1)).sum()


# ------------------------------------------------------------------ infinities the pattern misses


@register(inputs=[Input("x", shape=("n",), dtype="float64")],
          description="A tridiagonal step whose first output also reads sqrt(x[-1]) (a periodic wrap the "
                      "declared band forgot): infinite at x[-1] = 0.",
          sparsity={"band": banded(1, 1)})
def wrap_forgotten23(x: torch.Tensor) -> torch.Tensor:
    y = x + 0.1 * (torch.nn.functional.pad(x[1:], (0, 1)) + torch.nn.functional.pad(x[:-1], (1, 0)))
    return torch.cat([(y[0] + torch.sqrt(x[-1])).reshape(1), y[1:]])


@register(inputs=[Input("x", shape=("n",), dtype="float64")],
          description="x^2, its first output also reading sqrt(x[1]), declared diagonal: one VJP colours "
                      "every row, so the missing entry's column is covered (by (1, 1)).",
          sparsity={"diag": banded(0, 0)})
def diag_sqrt23(x: torch.Tensor) -> torch.Tensor:
    y = x**2
    return torch.cat([(y[0] + torch.sqrt(x[1])).reshape(1), y[1:]])


# ------------------------------------------------------------------ a batch's round-off


@register(inputs=[Input("x", shape=("n",), dtype="float32")],
          description="A float32 ring through large terms that cancel: (x * 1e5 + x) - x * 1e5 times "
                      "its neighbour, every product carrying round-off of 1e5 |seed|.")
def ring_cancels23(x: torch.Tensor) -> torch.Tensor:
    return ((x * 1e5 + x) - x * 1e5) * x.roll(1)


# ------------------------------------------------------------------ half precision's check


@register(inputs=[Input("x", shape=("n",), dtype="floating")],
          description="A lower bidiagonal step, x^2 + 0.5 x[i-1] x[i], in the caller's float dtype; "
                      "declared 'diag' (wrong: it misses the sub-diagonal) and 'tri' (right).",
          sparsity={"diag": banded(0, 0), "tri": banded(1, 1)})
def bidiag23(x: torch.Tensor) -> torch.Tensor:
    return x * x + 0.5 * torch.nn.functional.pad(x[:-1], (1, 0)) * x


@register(inputs=[Input("x", shape=("n",), dtype="floating")],
          description="A chain energy, sum x^4 + x[i] x[i+1]: its Hessian tridiagonal; declared 'hdiag' "
                      "(wrong: the off-diagonals are missing) and 'htri' (right).",
          sparsity={"hdiag": banded(0, 0, hessian=True), "htri": banded(1, 1, hessian=True)})
def chain_energy23(x: torch.Tensor) -> torch.Tensor:
    return (x**4).sum() + (x[1:] * x[:-1]).sum()
