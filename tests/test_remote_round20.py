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

from ._remote_support import cc, jx, url  # noqa: E402,F401 (fixtures)

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


# --------------------------------------------------------------------------- SciPy: x in the input's declared shape


def test_scipys_flat_x_is_sent_in_the_one_declared_shape_that_fits_it(cc):
    """SciPy hands every solver's ``x`` flat (``minimize`` makes a float ``x0`` an array of
    shape ``(1,)``), and without ``shape=`` the objective sent it so: ``minimize(obj.fun,
    2.0, jac=obj.jac)`` of ``scalar_square`` (a 0-d input) failed with the service's 422
    ("expected shape (), got (1,)"), and ``least_squares`` over ``n`` points in 3-D
    (``scaled_norm``'s ``(n, 3)``) too, where the same functions in-process take the
    reshaped arrays and solve. Now the declared shape that alone fits ``x`` is learned from
    that refusal (one ``GET`` of the function, once) and the solves take in-process's path,
    one request per point; ``n`` follows the size (3 points after 2). Where two symbols
    leave the shape open (``(m, n)``) the 422 says to pass ``shape=``."""
    optimize = pytest.importorskip("scipy.optimize")
    import jacobian_client as jc
    import numpy as np
    from jacobian_client.scipy import remote_objective

    from . import user_functions as uf

    square = remote_objective(cc.client, "scalar_square")
    got = optimize.minimize(square.fun, 2.0, jac=square.jac, method="BFGS")

    def local(x):
        return uf.scalar_square(x.reshape(()))

    want = optimize.minimize(lambda x: local(torch.tensor(x)).item(), 2.0, method="BFGS",
                             jac=lambda x: torch.func.grad(local)(torch.tensor(x)).numpy())
    np.testing.assert_allclose(got.x, want.x, rtol=1e-12, atol=1e-12)
    assert got.success and (got.nit, got.nfev, got.njev) == (want.nit, want.nfev, want.njev)
    assert cc.take() == ["jacobian+return_output", "scalar_square", *["jacobian+return_output"] * got.nfev]

    scale, power = torch.tensor(1.5, dtype=torch.float64), torch.tensor(1)
    norms = remote_objective(cc.client, "scaled_norm", args=(scale, power))
    for points in (2, 3):
        target = np.arange(1.0, points + 1)
        x0 = np.linspace(0.2, 1.0, 3 * points)
        got = optimize.least_squares(lambda x: norms.fun(x) - target, x0, jac=norms.jac)

        def residual(x):
            return uf.scaled_norm(torch.tensor(x).reshape(-1, 3), scale, power)[0].numpy() - target

        want = optimize.least_squares(residual, x0, jac=lambda x: torch.func.jacrev(
            lambda v: uf.scaled_norm(v.reshape(-1, 3), scale, power)[0])(torch.tensor(x)).numpy())
        np.testing.assert_allclose(got.x, want.x, rtol=1e-10, atol=1e-12)
        assert got.nfev == want.nfev and got.njev == want.njev
        asked = cc.take()
        assert asked[-got.nfev:] == ["jacobian+return_output"] * got.nfev, asked
        assert asked[:-got.nfev] == (["jacobian+return_output", "scaled_norm"] if points == 2 else [])

    open_shape = remote_objective(cc.client, "layer_norm_bias_loss", args=(np.zeros(3),))
    with pytest.raises(jc.InvalidInput, match=r"SciPy's x is flat \(6 numbers\); pass shape=.*expected shape \(m, n\)"):
        open_shape.fun(np.arange(6.0))
    assert cc.take() == ["jacobian+return_output", "layer_norm_bias_loss"]
    with_shape = remote_objective(cc.client, "layer_norm_bias_loss", args=(np.zeros(3),), shape=(2, 3))
    local_loss = uf.layer_norm_bias_loss(torch.arange(6.0, dtype=torch.float64).reshape(2, 3), torch.zeros(3, dtype=torch.float64))
    np.testing.assert_allclose(with_shape.fun(np.arange(6.0)), local_loss.item(), rtol=1e-12)


def test_a_shape_learned_in_one_thread_serves_the_solves_in_the_others(cc):
    """Solves in a thread pool may share one objective (its cache is per thread): threads
    whose flat ``x`` was refused while another thread learned the shape saw their 422's
    ``got_shape`` no longer match the shape they would now send, and raised it. Each
    now sends again in the learned shape: every thread's value is in-process's."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    from jacobian_client.scipy import remote_objective

    from . import user_functions as uf

    scale, power = torch.tensor(1.5, dtype=torch.float64), torch.tensor(1)
    norms = remote_objective(cc.client, "scaled_norm", args=(scale, power))
    start = threading.Barrier(6)

    def solve(points: int) -> np.ndarray:
        start.wait()  # every thread's first x goes flat before the shape is learned
        return norms.fun(np.linspace(0.1, 1.0, 3 * points))

    with ThreadPoolExecutor(6) as pool:
        got = list(pool.map(solve, [1, 2, 3, 1, 2, 3]))
    for points, value in zip([1, 2, 3, 1, 2, 3], got):
        want = uf.scaled_norm(torch.linspace(0.1, 1.0, 3 * points, dtype=torch.float64).reshape(-1, 3), scale, power)
        np.testing.assert_allclose(value, want[0].numpy(), rtol=1e-12)


def test_a_0d_point_and_a_one_element_point_are_cached_apart(cc):
    """The cache keyed a point by ``np.ascontiguousarray`` of it, which makes a 0-d array
    ``(1,)``: ``jac(1.5)`` and then ``jac(np.array([1.5]))`` (what a solver passes) answered
    the second from the first, a Jacobian of shape ``(2,)`` where ``x`` has a dimension of
    its own and in-process gives ``(2, 1)``, without a request. Each is now its own point."""
    import numpy as np
    from jacobian_client.scipy import remote_objective

    from . import user_functions as uf

    xs, power = np.arange(6.0).reshape(2, 3), 2
    by_scale = remote_objective(cc.client, "scaled_norm", args=(xs, power), argnum=1)

    def local(scale):
        return uf.scaled_norm(torch.tensor(xs), scale.reshape(()), torch.tensor(power))[0]

    for at in (np.array(1.5), np.array([1.5])):
        got = by_scale.jac(at)
        want = torch.func.jacrev(local)(torch.tensor(at)).numpy()
        assert got.shape == want.shape == (2, *at.shape)
        np.testing.assert_allclose(got, want, rtol=1e-12)
    assert cc.take() == ["jacobian+return_output", "jacobian+return_output", "scaled_norm", "jacobian+return_output"]


# --------------------------------------------------------------------------- an integer output beside floating ones


def test_reverse_mode_through_a_function_with_an_integer_output_goes_by_forward_mode(cc, jx):
    """A function returning an index, a count or a mask beside its floating outputs
    (``(2 sin x, argmax x)``, ``(x**2, x > 0)``) could not be differentiated in reverse
    mode through the adapters at all: ``loss.backward()``, ``grad``, ``jacrev``, ``vjp``
    (torch), ``jax.grad`` and ``jax.jit(jax.grad)`` of the floating output raised the
    service's 422 ("the output[1] is int64, which has no derivative"), where in-process
    autograd and JAX differentiate the floating outputs and leave the integer ones be.
    The service's refusal now says so in a member (``"unsupported": "integer_output"``),
    and the adapters answer from one ``jvp`` of the basis tangents instead (the first
    time after that refusal, then directly): every gradient is in-process's."""
    jax = jx
    jnp = jax.numpy
    import numpy as np
    from jacobian_client.jax import remote as jax_remote

    from . import remote20_functions as r20

    x = torch.tensor([0.3, -1.2, 0.7], dtype=torch.float64)
    local_jax = {"r20_sin_argmax": lambda q: (2 * jnp.sin(q), jnp.argmax(q)),
                 "r20_square_mask": lambda q: (q**2, q > 0)}
    for name in ("r20_sin_argmax", "r20_square_mask"):
        fn, local = remote(cc.client, name), getattr(r20, name)
        leaf, mine = x.clone().requires_grad_(), x.clone().requires_grad_()
        (fn(leaf)[0] ** 2).sum().backward()
        (local(mine)[0] ** 2).sum().backward()
        torch.testing.assert_close(leaf.grad, mine.grad, rtol=1e-12, atol=1e-12)
        assert cc.take() == ["evaluate", "vjp", "jvp+batched_vectors"]  # the refusal, then forward mode
        torch.testing.assert_close(f.jacrev(lambda q: fn(q)[0])(x), f.jacrev(lambda q: local(q)[0])(x))
        torch.testing.assert_close(f.grad(lambda q: fn(q)[0].sum())(x), f.grad(lambda q: local(q)[0].sum())(x))
        assert cc.take() == ["evaluate", "jvp+batched_vectors"] * 2  # known now: forward mode at once

        jfn, jlocal = jax_remote(cc.client, name), local_jax[name]
        xj = jnp.asarray(x.numpy())
        want = jax.grad(lambda q: jnp.sum(jnp.sin(jlocal(q)[0])))(xj)
        for transform in (lambda g: g, jax.jit):
            got = transform(jax.grad(lambda q: jnp.sum(jnp.sin(jfn(q)[0]))))(xj)
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
        assert cc.take()[-1] == "jvp+batched_vectors"
