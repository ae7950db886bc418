"""Functions for tests/test_sparse_round28.py. Loaded by module name."""

from __future__ import annotations

import numpy as np
import torch

from jacobian_service import Input, register
from jacobian_service.sparsity import from_callable

#: The output leaves' dtypes of ``leaves28`` (the input's dtype is the request's).
LEAF_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def _ring(x: torch.Tensor) -> torch.Tensor:
    """Element i reads x[i] and x[i - 1] (periodic): a diagonal and a sub-diagonal."""
    return torch.sin(x) * (1.5 + torch.roll(x, 1))


def _stacked(shapes, m: int, sub: bool, but: int | None = None):
    """The diagonal and, with ``sub``, the periodic sub-diagonal of every n-row leaf
    (but leaf ``but``'s: a pattern that misses that leaf's sub-diagonal only)."""
    n = int(np.prod(shapes[0]))
    i = np.arange(m)
    rows, cols = [i], [i % n]
    if sub:
        keep = i // n != but
        rows.append(i[keep])
        cols.append((i[keep] - 1) % n)
    return np.concatenate(rows), np.concatenate(cols)


def _declared(leaves: int) -> dict:
    """'ring' (right), 'diagonal' (every sub-diagonal missing), 'misses{k}' (that of the
    k-th n rows: leaf k's where the leaves are n long)."""
    out = {"ring": from_callable(lambda s, m: _stacked(s, m, True)),
           "diagonal": from_callable(lambda s, m: _stacked(s, m, False))}
    for k in range(leaves):
        out[f"misses{k}"] = from_callable(lambda s, m, k=k: _stacked(s, m, True, k))
    return out


@register(inputs=[Input("x", shape=("n",))],
          description="The same ring in float64, float32, float16 and bfloat16 arithmetic: four output leaves "
                      "of four dtypes whatever the input's. 'ring' declares its pattern, 'diagonal' misses the "
                      "sub-diagonal, 'misses<k>' leaf k's sub-diagonal only.",
          sparsity=_declared(len(LEAF_DTYPES)))
def leaves28(x: torch.Tensor):
    return tuple(_ring(x.to(d)) for d in LEAF_DTYPES)


@register(inputs=[Input("x", shape=("n",))],
          description="The ring times exp(i x) in complex128 and in complex64 arithmetic, each as its real and "
                      "imaginary parts (float64 and float32 leaves). 'ring' declares its pattern, 'diagonal' "
                      "misses the sub-diagonal, 'misses<k>' that of rows k n to (k + 1) n only.",
          sparsity=_declared(4))
def complex_leaves28(x: torch.Tensor):
    return tuple(torch.view_as_real(_ring(x.to(d)) * torch.exp(1j * x.to(d))).T
                 for d in (torch.float64, torch.float32))


@register(inputs=[Input("x", shape=("n",))],
          description="A ring's energy summed in float16 (a half-precision scalar of any input): its Hessian is "
                      "the periodic tridiagonal band.")
def half_energy28(x: torch.Tensor) -> torch.Tensor:
    return (torch.sin(x) * torch.roll(x, 1) ** 2).half().sum()


_TABLE = torch.zeros(4096, dtype=torch.float64)  # (a buffer made elsewhere: writing into it is not traced)


@register(inputs=[Input("x", shape=("n",), dtype="float64")],
          description="The ring through a module buffer the tracer cannot follow (probed, from dense "
                      "Jacobians), as a float64 leaf beside its float16 rounding.")
def probed_leaves28(x: torch.Tensor):
    buf = _TABLE[: x.shape[0]].clone()
    buf.copy_(_ring(x))
    return buf, buf.half()
