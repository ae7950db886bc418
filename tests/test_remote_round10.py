"""Remote functions inside the caller's torch, JAX and SciPy code, round 10: the tools
around a torch model (torch.fx) and SciPy's constrained solvers, each compared with the
same computation in-process.

One server: the session's ``jacobian-service serve`` subprocess (``cc``), shared with the
other adapter test files.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("jacobian_service.app")

import jacobian_client as jc  # noqa: E402,F401
from jacobian_client.torch import remote  # noqa: E402
from jacobian_service import examples as ex  # noqa: E402

from ._remote_support import cc, url  # noqa: E402,F401 (fixtures)

f = torch.func


# --------------------------------------------------------------------------- torch.fx


class _Reach(torch.nn.Module):
    """A model whose forward calls two remote functions, one with a dict parameter
    built from a layer's output and one by keyword."""

    def __init__(self, arm, layer) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(10)
        self.arm, self.layer = arm, layer
        self.lin = torch.nn.Linear(3, 3, dtype=torch.float64)
        with torch.no_grad():
            self.lin.weight.copy_(torch.randn(3, 3, generator=g, dtype=torch.float64))
            self.lin.bias.copy_(torch.randn(3, generator=g, dtype=torch.float64))
        self.w = torch.nn.Parameter(torch.randn(2, 2, generator=g, dtype=torch.float64))

    def forward(self, x):
        return 2 * self.layer({"w": self.w, "b": self.arm(self.lin(x))}, x=self.arm(x)).tanh()


def test_torch_fx_symbolic_trace_records_the_remote_call_as_a_node(cc):
    """``torch.fx.symbolic_trace(model)`` (what FX graph mode quantization and
    torchvision's feature extraction run) of a model that calls a remote function failed
    with numpy's "ValueError: invalid __array_struct__": the remote function read fx's
    Proxy, which holds no values, as an array. The call is now one node of the graph, as
    ``torch.fx.wrap`` records a function: tracing sends no request, and the traced
    GraphModule calls the service when it runs, at that run's values: the model's value
    and gradients in-process, in the requests the model itself makes."""
    mine = _Reach(remote(cc.client, "planar_arm"), remote(cc.client, "dense_layer"))
    theirs = _Reach(ex.planar_arm, ex.dense_layer)
    cc.take()
    gm = torch.fx.symbolic_trace(mine)
    assert cc.take() == []
    assert [n.target.__name__ for n in gm.graph.nodes if n.op == "call_function" and hasattr(n.target, "_made")] \
        == ["remote_planar_arm", "remote_planar_arm", "remote_dense_layer"]
    for x in (torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64), torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)):
        y = gm(x)
        want = theirs(x)
        torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
        y.sum().backward()
        want.sum().backward()
        for p, q in zip(mine.parameters(), theirs.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-12)
            p.grad = q.grad = None
    # as the model's own: the keyword call's names asked once; no vjp for arm(x), x not differentiated
    run = ["evaluate", "evaluate", "evaluate", "vjp", "vjp"]
    assert cc.take() == run[:2] + ["dense_layer"] + run[2:] + run
