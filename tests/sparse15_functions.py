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


@register(inputs=[Input("x", shape=(4,), dtype="float64")])
def out_write(x):
    y = torch.empty(4, dtype=x.dtype)
    torch.mul(x, x.roll(1), out=y)
    return y


_IDX = (0, 2, 4, 5, 9, 1, 0, 7)
_OFFSETS = (0, 2, 3, 6)


@register(inputs=[Input("w", shape=(10, 3), dtype="float64")],
          description="embedding_bag sums of a table's rows: four bags of fixed indices.")
def bag(w):
    return torch.nn.functional.embedding_bag(torch.tensor(_IDX), w, torch.tensor(_OFFSETS), mode="sum")


@register(inputs=[Input("w", shape=(10, 3), dtype="float64")],
          description="embedding_bag means over 2-D indices (bags of 3) with padding_idx 0 left out.")
def bag_mean_pad(w):
    return torch.nn.functional.embedding_bag(torch.tensor(_IDX[:6]).reshape(2, 3), w, mode="mean", padding_idx=0)


@register(inputs=[Input("w", shape=(10, 3), dtype="float64"), Input("s", shape=(8,), dtype="float64")],
          description="embedding_bag sums weighted per index (per_sample_weights).")
def bag_weighted(w, s):
    return torch.nn.functional.embedding_bag(torch.tensor(_IDX), w, torch.tensor(_OFFSETS), mode="sum",
                                             per_sample_weights=s)


@register(inputs=[Input("w", shape=(10, 3), dtype="float64")],
          description="embedding_bag maxima, offsets with the last one the end (include_last_offset).")
def bag_max(w):
    return torch.nn.functional.embedding_bag(torch.tensor(_IDX), w, torch.tensor(_OFFSETS + (8,)), mode="max",
                                             include_last_offset=True)


@register(inputs=[Input("w", shape=(10, 3), dtype="float64"), Input("idx", shape=(8,), dtype="int64")],
          description="embedding_bag sums at indices given with the request.")
def bag_at(w, idx):
    return torch.nn.functional.embedding_bag(idx, w, torch.tensor(_OFFSETS), mode="sum")


@register(inputs=[Input("x", shape=(4, 3), dtype="float64")],
          description="torch.renorm of each row to norm at most 0.5, and of each column to 1-norm at most 10.")
def renormed(x):
    return torch.cat([torch.renorm(x, p=2, dim=0, maxnorm=0.5), torch.renorm(x, p=1, dim=1, maxnorm=10.0)])


@register(inputs=[Input("x", shape=(4, 3), dtype="float64")],
          description="A scalar from renormed rows: (renorm(x) * x).sum().")
def renorm_energy(x):
    return (torch.renorm(x, p=2, dim=0, maxnorm=0.5) * x).sum()


@register(inputs=[Input("x", shape=(4, 3), dtype="float64"), Input("y", shape=(4, 3), dtype="float64")],
          description="torch.dist of each row pair (2-norm), and of x's first row to each of y's (inf-norm, broadcast).")
def dists(x, y):
    return torch.stack([torch.dist(x[i], y[i]) for i in range(4)] + [torch.dist(x[0], y, p=float("inf"))])


@register(inputs=[Input("x", shape=("n",), dtype="float64")],
          description="Sum of torch.dist of neighbouring pairs: a banded Hessian.")
def dist_chain(x):
    return sum(torch.dist(x[i:i + 2], x[i + 1:i + 3]) for i in range(x.shape[0] - 2))


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


@register(inputs=[Input("x", shape=("n",), dtype="float64")],
          description="The first three elements of x / sum(x): a pattern of 3 rows, through an n x n intermediate.")
def head_shares(x):
    return (x / x.sum())[:3]


@register(inputs=[Input("u", shape=("n",), dtype="float64"), Input("k", shape=("n",), dtype="float64")],
          description="Two outputs of two inputs: a ring's flux k_i (u_{i+1} - u_i) and its source u^2 k.")
def flux_source(u, k):
    return k * (u.roll(-1) - u), u * u * k


@register(inputs=[Input("u", shape=("n",), dtype="float64"), Input("k", shape=("n",), dtype="float64")],
          description="An energy of two inputs: sum k_i (u_{i+1} - u_i)^2 + u^4.")
def two_energy(u, k):
    return (k * (u.roll(-1) - u) ** 2).sum() + (u**4).sum()


def flux_source_flat(u, k):
    """flux_source's outputs concatenated (its Jacobian's rows, in order), for jacrev in the tests."""
    return torch.cat(flux_source(u, k))
