"""Functions for tests/test_sparse_round15.py. Loaded by module name."""

from __future__ import annotations

import numpy as np
import torch

from jacobian_service import Input, register
from jacobian_service.sparsity import coo, from_callable


def _half_band(in_shapes, m):
    i = np.arange(m, dtype=np.float64)
    return i + 0.5, i + 0.5


def _whole_floats(in_shapes, m):
    i = np.arange(m, dtype=np.float64)
    return np.r_[i, i[1:]], np.r_[i, i[:-1]]


@register(inputs=[Input("x", shape=("n",), dtype="float64")],
          sparsity={"half": from_callable(_half_band), "halfcoo": coo([0.5, 1.5, 2.5], [0.5, 1.5, 2.5], (3, 3)),
                    "nan": coo([0, 1, np.nan], [0, 1, 2], (3, 3)), "whole": from_callable(_whole_floats)},
          description="sin(x_i) + x_{i-1}: a lower bidiagonal Jacobian; its patterns declared with float indices.")
def bidiag_sin(x):
    return torch.sin(x) + torch.nn.functional.pad(x[:-1], (1, 0))


_BUF = torch.zeros(4, dtype=torch.float64)


@register(inputs=[Input("x", shape=(4,), dtype="float64")])
def out_write(x):
    y = torch.empty(4, dtype=x.dtype)
    torch.mul(x, x.roll(1), out=y)
    return y


@register(inputs=[Input("x", shape=(4,), dtype="float64")])
def out_write_nograd(x):
    with torch.no_grad():
        y = torch.empty(4, dtype=x.dtype)
        torch.mul(x, x.roll(1), out=y)
    return y + x


@register(inputs=[Input("w", shape=(10, 3), dtype="float64")])
def bag(w):
    idx = torch.tensor([0, 2, 4, 5, 9, 1])
    offsets = torch.tensor([0, 2, 3])
    return torch.nn.functional.embedding_bag(idx, w, offsets, mode="sum")


@register(inputs=[Input("x", shape=(4, 3), dtype="float64")])
def renormed(x):
    return torch.renorm(x, p=2, dim=0, maxnorm=1.0)


@register(inputs=[Input("x", shape=(4, 3), dtype="float64"), Input("y", shape=(4, 3), dtype="float64")])
def dists(x, y):
    return torch.stack([torch.dist(x[i], y[i]) for i in range(4)])


@register(inputs=[Input("x", shape=("n",), dtype="float64")],
          description="Sums of squares of pairs and a running sum, each written with out= into a buffer it makes.")
def out_reductions(x):
    w = x.reshape(-1, 2)
    s = torch.empty(w.shape[0], dtype=x.dtype)
    torch.sum(w * w, dim=1, out=s)
    c = torch.empty(x.shape[0], dtype=x.dtype)
    torch.cumsum(x, 0, out=c)
    return torch.cat([s, c])


@register(inputs=[Input("x", shape=("n",), dtype="float64"), Input("y", shape=("n",), dtype="float64")],
          description="x times a weight y * y computed with out= into a buffer it makes (y not differentiated).")
def out_weight(x, y):
    w = torch.empty(x.shape[0], dtype=x.dtype)
    torch.mul(y, y, out=w)
    return x * w


@register(inputs=[Input("x", shape=("n",), dtype="float64")],
          description="sum over a ring of x_i^2 x_{i+1}: a scalar; its gradient a cyclic band.")
def ring_sum(x):
    return (x * x * x.roll(-1)).sum()
