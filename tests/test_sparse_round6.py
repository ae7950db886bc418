"""Sparse Jacobians (round 6): ops the tracer took as dense (every output on every
input, ``exact: false``) now traced exactly: interpolation, cross products, FFTs,
adaptive pooling, transposed convolutions, unfold/fold. Each pattern is compared with
the nonzeros of dense ``torch.func.jacrev`` (never missing one, and no longer dense).
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from jacobian_service.sparsity.detect import trace_hessian, trace_jacobian

def test_tracing_does_not_import_torch_dynamo(monkeypatch):
    """torch wraps a TorchDispatchMode's __torch_dispatch__ so that its first call imports
    torch._dynamo (about 2 s): the tracer's mode paid it at the first op of the first
    trace, most of a first GET .../sparsity with warm-up off. Tracing imports it no more
    (checked in this process, with torch._dynamo unloaded and its import refused)."""
    from jacobian_service.sparsity import detect

    class Refuse:
        def find_spec(self, name, path=None, target=None):
            if name == "torch._dynamo" or name.startswith("torch._dynamo."):
                raise ImportError("torch._dynamo imported while tracing")
            return None

    for name in [m for m in sys.modules if m == "torch._dynamo" or m.startswith("torch._dynamo.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [Refuse()] + sys.meta_path)
    # (torch's wrapper caches the guard on the function once made: its own, not a call's)
    dispatch = detect._Fresh.__dict__["__torch_dispatch__"]
    assert dispatch.__code__.co_filename == detect.__file__
    p = trace_jacobian(lambda x: (x[1:] - x[:-1]) ** 2 + torch.zeros(4, dtype=x.dtype), (torch.ones(5, dtype=torch.float64),))
    assert p.exact and sorted(zip(p.rows.tolist(), p.cols.tolist())) == [(i, j) for i in range(4) for j in (i, i + 1)]
