"""Functions for tests/test_parity_round24.py, round 24 of PyTorch's own torch.func test
cases (test_ops.py's OpInfo families the earlier rounds left out) replayed over HTTP."""

from __future__ import annotations

import torch
import torch.nn.functional as nnf
from jacobian_service import Input, register

_EIG_W = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)


@register(inputs=[Input("a", shape=(3, 3))])
def eigvalsh_energy(a):
    """A weighted sum of linalg.eigvalsh's eigenvalues, which read the lower triangle."""
    return torch.linalg.eigvalsh(a) @ _EIG_W.to(a.dtype)


_ROWS = torch.tensor([0, 2, 2, 1])


@register(inputs=[Input("w", shape=(3, 2))])
def sparse_grad_embedding(w):
    """embedding(..., sparse=True): its backward answers a COO-layout gradient."""
    return nnf.embedding(_ROWS, w, sparse=True) * torch.arange(1.0, 3.0, dtype=w.dtype)
