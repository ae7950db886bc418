"""PyTorch's own torch.func test cases, round 23, replayed over HTTP and compared with
in-process torch.func (values, shapes, dtypes; torch's error where torch raises).

1. test_vmap.py's ``vmap(hessian(f))`` (per-sample Hessians) through the SDK's torch
   adapter: the per-example products of one call of f (jacrev's vjp, jacfwd's jvp) asked
   the service for the same batched Jacobian twice; one request now, kept per call and
   only inside a torch.func transform (a graph the caller keeps holds no Jacobian).
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("jacobian_service.app")

from torch.func import hessian, jacfwd, jacrev, vmap  # noqa: E402

from jacobian_client.torch import remote  # noqa: E402
from jacobian_service import examples as E  # noqa: E402

from ._remote_support import Counted, cc, close_trees, url  # noqa: E402,F401 (fixtures)


XS = torch.tensor([[0.3, -1.2, 0.7], [0.1, 0.2, 0.3]], dtype=torch.float64)


def test_vmap_hessian_of_a_remote_function_asks_one_batched_jacobian(cc: Counted):
    """vmap(hessian(f)) = vmap(jacfwd(jacrev(f))): jacrev's backward and jacfwd's jvp are
    each a per-example product at the same inputs, contracted on the client from the
    batched Jacobian. Each asked the service for it: evaluate, jacobian, jacobian,
    hessian (the second Jacobian the first's bytes again, 2 x 36 floats here, a batch
    of 1,000 x 1,000 would be 8 GB twice). One call's products now share the one answer;
    another call (other inputs, the same shapes) asks again, as it must."""
    f, pol = remote(cc.client, "sum_sin"), remote(cc.client, "polar")
    close_trees(vmap(hessian(f))(XS), vmap(hessian(E.sum_sin))(XS), 1e-12)
    assert cc.take() == ["evaluate+batched", "jacobian+batched", "hessian+batched"]
    close_trees(vmap(hessian(f))(XS * 2), vmap(hessian(E.sum_sin))(XS * 2), 1e-12)
    assert cc.take() == ["evaluate+batched", "jacobian+batched", "hessian+batched"]
    # two inputs, a tuple output, argnums (0, 1): one Jacobian in both inputs
    want = vmap(hessian(E.polar, argnums=(0, 1)))(XS, XS.flip(0))
    close_trees(vmap(hessian(pol, argnums=(0, 1)))(XS, XS.flip(0)), want, 1e-12)
    assert cc.take() == ["evaluate+batched", "jacobian+batched", "hessian+batched"]
    # jacfwd over jacfwd: the outer jvp's first-order part is the same Jacobian again
    close_trees(vmap(jacfwd(jacfwd(f)))(XS), vmap(jacfwd(jacfwd(E.sum_sin)))(XS), 1e-12)
    assert cc.take() == ["evaluate+batched", "jacobian+batched", "hessian+batched"]
    # an input only some products differentiate: argnums differ, so do the requests
    want = vmap(jacfwd(jacrev(E.polar, argnums=0), argnums=1))(XS, XS)
    close_trees(vmap(jacfwd(jacrev(pol, argnums=0), argnums=1))(XS, XS), want, 1e-12)
    assert cc.take() == ["evaluate+batched", "jacobian+batched", "jacobian+batched", "hessian+batched"]
    # outside a torch.func transform nothing is kept: a graph the caller holds (here, for a
    # second backward) holds no Jacobian, and each backward asks for its own
    x = XS.clone().requires_grad_()
    out = vmap(f)(x)
    out.sum().backward(retain_graph=True)
    out.sum().backward()
    torch.testing.assert_close(x.grad, 2 * XS.cos())
    assert cc.take() == ["evaluate+batched", "jacobian+batched", "jacobian+batched"]
