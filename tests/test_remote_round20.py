"""Remote functions inside the caller's torch / SciPy code, round 20: each case compared
with the same computation in-process, request by request.

One server: the session's ``jacobian-service serve`` subprocess (``cc``), shared with the
other adapter test files.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("jacobian_service.app")

from jacobian_client.torch import remote  # noqa: E402
from jacobian_service import examples as ex  # noqa: E402

from ._remote_support import cc, url  # noqa: E402,F401 (fixtures)

f = torch.func
BF = torch.bfloat16


def exactly(got, want):
    """The same tensors, dtype and all, bit for bit."""
    got_leaves, want_leaves = torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)
    assert len(got_leaves) == len(want_leaves)
    for g, w in zip(got_leaves, want_leaves):
        assert g.dtype == w.dtype, (g.dtype, w.dtype)
        torch.testing.assert_close(g, w, rtol=0, atol=0)


# --------------------------------------------------------------------------- torch: bfloat16 computed in bfloat16


def test_a_bfloat16_tensor_is_computed_in_bfloat16_as_in_process(cc):
    """The torch adapter sent a bfloat16 tensor as float32 (numpy has no bfloat16), so the
    service computed in float32 and the answers were rounded to bfloat16 after:
    ``planar_arm`` of a bfloat16 ``x`` gave 2.5469 where in-process torch (and
    ``client.evaluate``, and the JAX adapter, which send bfloat16 as bfloat16) gives
    2.5625, its Jacobian (jacrev, jacfwd, per example) likewise. Now it goes as bfloat16
    (ml_dtypes' arrays on the host side, as JAX's) and every answer is in-process torch's,
    bit for bit; an empty batch of a new bfloat16 signature (its zeros probe) too."""
    pytest.importorskip("ml_dtypes")
    arm = remote(cc.client, "planar_arm")
    x = torch.tensor([0.3, -1.2, 0.7], dtype=BF)
    xs = torch.stack([x, 2 * x, -x])
    want = ex.planar_arm(x)
    exactly(arm(x), want)
    torch.testing.assert_close(torch.from_numpy(cc.client.evaluate("planar_arm", x)).to(BF), want, rtol=0, atol=0)
    assert cc.take() == ["evaluate", "evaluate"]
    exactly(f.jacrev(arm)(x), f.jacrev(ex.planar_arm)(x))
    exactly(f.jacfwd(arm)(x), f.jacfwd(ex.planar_arm)(x))
    exactly(f.vmap(arm)(xs), f.vmap(ex.planar_arm)(xs))
    exactly(f.vmap(f.jacrev(arm))(xs), f.vmap(f.jacrev(ex.planar_arm))(xs))
    assert cc.take() == ["evaluate", "vjp+batched_vectors", "evaluate", "jvp+batched_vectors", "evaluate+batched",
                         "evaluate+batched", "jacobian+batched"]

    leaf, local = x.clone().requires_grad_(), x.clone().requires_grad_()
    (arm(leaf) ** 2).sum().backward()
    (ex.planar_arm(local) ** 2).sum().backward()
    exactly(leaf.grad, local.grad)
    rosen = remote(cc.client, "rosenbrock")
    exactly(f.hessian(rosen)(x), f.hessian(ex.rosenbrock)(x))
    cc.take()

    empty = torch.empty(0, 4, dtype=BF)  # a signature not seen before: learned from zeros of its dtype
    exactly(f.vmap(arm)(empty), f.vmap(ex.planar_arm)(empty))
    assert cc.take() == ["evaluate"]
