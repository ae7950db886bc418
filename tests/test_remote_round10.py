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


# --------------------------------------------------------------------------- SciPy: constraints


def test_trust_constr_takes_a_remote_constraint_with_its_hessian(cc):
    """``minimize(method="trust-constr")`` with ``NonlinearConstraint(fun, lb, ub, jac=,
    hess=)`` needs the Hessian of ``v . c(x)`` for its multipliers ``v``, which a remote
    objective had no callable for: ``hess=obj.hess`` sent ``v`` as a second input (the
    service's 422 "unknown inputs ['1']", nothing saying why), and ``obj.hess(x)`` of a
    vector function raised numpy's "cannot reshape array of size 18 into shape (3,3)".
    ``constraint_hess(x, v)`` is that Hessian, one ``hvp`` request (``v`` with each basis
    tangent), and the solve is the local one, step for step; ``hess`` says which to use."""
    so = pytest.importorskip("scipy.optimize")
    from jacobian_client.scipy import remote_objective

    # planar_arm in closed form (torch.func.hessian's first call costs seconds): link k's
    # angle is c_k = q_0 + ... + q_k, so each derivative in q_i sums the links k >= i
    def tails(a):
        return np.cumsum(a[::-1])[::-1]

    def local(q):
        return ex.planar_arm(torch.from_numpy(q)).numpy()

    def local_jac(q):
        c = np.cumsum(q)
        return np.stack([-tails(np.sin(c)), tails(np.cos(c))])

    def local_hess(q, v):
        c, i = np.cumsum(q), np.arange(q.size)
        return -tails(v[0] * np.cos(c) + v[1] * np.sin(c))[np.maximum.outer(i, i)]

    x0, tip = np.array([0.5, 0.5, 0.5]), [1.0, 0.5]
    arm = remote_objective(cc.client, "planar_arm")
    v = np.array([0.7, -1.3])
    cc.take()
    np.testing.assert_allclose(arm.constraint_hess(x0, v), local_hess(x0, v), rtol=1e-12, atol=1e-14)
    assert cc.take() == ["jacobian+return_output", "hvp+batched_vectors"]  # the output's shape from the value

    def solve(c, jac, hess):
        return so.minimize(lambda q: float(q @ q), x0, jac=lambda q: 2 * q, method="trust-constr",
                           constraints=[so.NonlinearConstraint(c, tip, tip, jac=jac, hess=hess)])

    want = solve(local, local_jac, local_hess)
    got = solve(arm.fun, arm.jac, arm.constraint_hess)
    assert (got.status, got.nit, got.constr_nfev) == (want.status, want.nit, want.constr_nfev) and want.status > 0
    np.testing.assert_allclose(got.x, want.x, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(local(got.x), tip, atol=1e-6)
    sent = cc.take()
    assert sent.count("hvp+batched_vectors") == got.constr_nhev[0] and "hessian" not in sent

    # an input held fixed: add_square(x, y) = x + y**2 in y, so v . H = diag(2 v)
    sq = remote_objective(cc.client, "add_square", argnum=1, args=(np.ones(4),))
    w = np.array([1.0, -2.0, 3.0, 0.5])
    np.testing.assert_allclose(sq.constraint_hess(np.arange(4.0), w), np.diag(2 * w), atol=1e-12)
    # x of another shape than SciPy's flat one
    rd = remote_objective(cc.client, "reaction_diffusion", shape=(3, 3))
    u, w = np.linspace(0.1, 0.9, 9), np.linspace(-1.0, 1.0, 9)
    # u + dt (lap(u) + u (1 - u)): only -dt u**2 is curved, v . H = diag(-2 dt v)
    np.testing.assert_allclose(rd.constraint_hess(u, w), np.diag(-0.2 * w), rtol=1e-12, atol=1e-12)
    # no forward-mode rule (hvp fails): the Hessians, contracted; x_i sin x_i has 2 cos x_i - x_i sin x_i
    nf = remote_objective(cc.client, "no_forward_ad")
    want = np.diag(w[:3] * (2 * np.cos(x0) - x0 * np.sin(x0)))
    with pytest.warns(RuntimeWarning, match="hvp of 'no_forward_ad' failed"):
        np.testing.assert_allclose(nf.constraint_hess(x0, w[:3]), want, rtol=1e-12, atol=1e-12)
    cc.take()
    np.testing.assert_allclose(nf.constraint_hess(x0, w[:3]), want, rtol=1e-12, atol=1e-12)
    assert cc.take() == ["hessian"]

    cc.take()
    with pytest.raises(TypeError, match=r"'planar_arm' returns an output of shape \[2\]; hess\(x\) is for a "
                                        r"scalar function .* pass constraint_hess"):
        arm.hess(x0 + 1)  # a point not evaluated: from the answer
    for call, scipy_call in ((arm.hess, r"hess\(x\)"), (lambda x: arm.hessp(x, x), r"hessp\(x, p\)")):
        arm.fun(x0 + 2)
        with pytest.raises(TypeError, match=rf"shape \[2\]; {scipy_call} is for a scalar function"):
            call(x0 + 2)  # an evaluated point: from its value, no request
    assert cc.take() == ["hessian", "jacobian+return_output"]
    with pytest.raises(jc.InvalidInput, match=r"NonlinearConstraint calls hess\(x, v\) with Lagrange multipliers v: "
                                              r"pass hess=constraint_hess there: unknown inputs \['1'\]"):
        solve(arm.fun, arm.jac, arm.hess)
    with pytest.raises(ValueError, match=r"takes one multiplier per output element \(2, the output's shape \[2\]\); "
                                         r"got 3"):
        arm.constraint_hess(x0, np.ones(3))
