"""Remote functions inside the caller's torch, JAX and SciPy code, round 11: each case
compared with the same computation in-process.

One server: the session's ``jacobian-service serve`` subprocess (``cc``), shared with the
other adapter test files.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("jacobian_service.app")

from jacobian_service import examples as ex  # noqa: E402

from ._remote_support import cc, url  # noqa: E402,F401 (fixtures)


# --------------------------------------------------------------------------- SciPy: a grid output


def _grid_step(u: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """``reaction_diffusion`` in-process as SciPy takes it: the value flat (C order) and its
    Jacobian in closed form, ``I + dt (L + diag(1 - 2u))`` with ``L`` the 5-point Laplacian
    (zero boundaries), (output elements) x (input elements)."""
    h, w = shape
    dt, n = 0.1, h * w
    value = ex.reaction_diffusion(torch.from_numpy(u.reshape(shape))).numpy().reshape(n)
    lap = -4.0 * np.eye(n)
    for i in range(h):
        for j in range(w):
            for di, dj in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                if 0 <= i + di < h and 0 <= j + dj < w:
                    lap[i * w + j, (i + di) * w + j + dj] = 1.0
    return value, np.eye(n) + dt * (lap + np.diag(1 - 2 * u))


def test_scipy_solvers_take_a_function_whose_output_is_a_grid(cc):
    """SciPy works with vectors: ``x`` flat, ``fun(x)`` one vector, ``jac(x)`` (output
    elements) x (x.size). ``shape=`` made ``x`` a grid for the function, but an output
    of more dimensions than one (``reaction_diffusion``'s ``(h, w)``, the service's own
    example with a declared stencil sparsity) came back as it is: ``least_squares``
    refused ``fun`` ("`fun` must return at most 1-d array_like. f0.shape: (3, 3)"),
    ``root`` too ("mismatch between the input and output shape"), and trust-constr's
    ``NonlinearConstraint`` failed deep inside SciPy with "IndexError: boolean index did
    not match"; the dense ``jac`` was ``(3, 3, 9)`` where the sparse one was ``(9, 9)``.
    Now each solve is the local one (flat value, closed-form Jacobian), step for step."""
    so = pytest.importorskip("scipy.optimize")
    sparse = pytest.importorskip("scipy.sparse")
    from jacobian_client.scipy import remote_objective

    shape = (3, 3)
    u_true, u0 = np.linspace(0.1, 0.9, 9), np.full(9, 0.5)
    target = _grid_step(u_true, shape)[0]

    def local(u):
        return _grid_step(u, shape)[0]

    def local_jac(u):
        return _grid_step(u, shape)[1]

    def solves(fun, jac, hess, sparse_jac=False):
        resid = lambda u: fun(u) - target  # noqa: E731
        out = {"least_squares": so.least_squares(resid, u0, jac=jac)}
        if sparse_jac:  # MINPACK factors dense matrices only; trust-constr's sparse path is as the dense one
            return out
        out["root"] = so.root(resid, u0, jac=jac)
        out["trust-constr"] = so.minimize(lambda u: float(u @ u), u0, jac=lambda u: 2 * u, method="trust-constr",
                                          constraints=[so.NonlinearConstraint(fun, 0.2, 0.5, jac=jac, hess=hess)],
                                          options={"maxiter": 15})
        return out

    def local_hess(u, v):  # only dt u (1 - u) is curved: v . H = diag(-2 dt v)
        return np.diag(-0.2 * v)

    rd = remote_objective(cc.client, "reaction_diffusion", shape=shape)
    value, jac = rd.fun(u0), rd.jac(u0)
    assert value.shape == (9,) and jac.shape == (9, 9)
    np.testing.assert_allclose(value, local(u0), rtol=1e-12)
    np.testing.assert_allclose(jac, local_jac(u0), rtol=1e-12, atol=1e-15)
    v, J = rd.fun_and_jac(u0 + 0.1)
    np.testing.assert_allclose(v, local(u0 + 0.1), rtol=1e-12)
    np.testing.assert_allclose(J, local_jac(u0 + 0.1), rtol=1e-12, atol=1e-15)
    stencil = remote_objective(cc.client, "reaction_diffusion", shape=shape, sparsity="stencil")
    for remote_fns, local_fns, is_sparse in (
            ((rd.fun, rd.jac, rd.constraint_hess), (local, local_jac, local_hess), False),
            ((stencil.fun, stencil.jac, stencil.constraint_hess),
             (local, lambda u: sparse.csr_array(local_jac(u)), local_hess), True)):
        got, want = solves(*remote_fns, sparse_jac=is_sparse), solves(*local_fns, sparse_jac=is_sparse)
        for method in want:
            g, w = got[method], want[method]
            assert (g.success, g.nfev) == (w.success, w.nfev), method
            np.testing.assert_allclose(g.x, w.x, rtol=1e-9, atol=1e-12, err_msg=method)
        np.testing.assert_allclose(got["least_squares"].x, u_true, rtol=1e-6)
    cc.take()


# --------------------------------------------------------------------------- torch: forward mode in some inputs


def test_forward_mode_asks_only_for_the_inputs_it_differentiates(cc):
    """torch gave the remote function's jvp a tangent of zeros for every floating input
    forward mode did not differentiate (a model's weights beside the ``x`` of ``jvp`` /
    ``jacfwd``: autograd materializes them), so each counted as differentiated: the jvp
    request (a batched jacobian under ``vmap``) asked for them all, and a parameter
    holding an integer leaf beside them was refused, ``torch.func.jvp`` in ``x`` alone of
    ``tree_int({"w": w, "k": 2}, x)`` a 422 ("a derivative in some leaves of input 0 ...
    leaf 0['k'] is int64"), where in-process it works; ``jacfwd`` in ``x`` of a 32 x 64
    ``dense_layer`` sent 1.1 MB of zero weight tangents for 50 KB. Now those inputs have
    no tangent (None) and only ``x`` is asked for, with torch's numbers; the backward
    pass, whose unused outputs' cotangents were materialized the same way, fills them."""
    from . import pytree_functions as pf
    from jacobian_client.torch import remote

    f = torch.func
    tree_int = remote(cc.client, "tree_int")
    w, x, t = (torch.tensor(v, dtype=torch.float64) for v in ([0.5, 1.5], [2.0, -1.0], [1.0, 0.25]))
    ks = torch.tensor([1, 2, 3])

    def cases(fn):
        at = lambda k: (lambda z: fn({"w": w, "k": k}, z))  # noqa: E731
        with torch.autograd.forward_ad.dual_level():
            dual = torch.autograd.forward_ad.unpack_dual(at(ks[1])(torch.autograd.forward_ad.make_dual(x, t))).tangent
        return (f.jvp(at(ks[1]), (x,), (t,)), f.jacfwd(at(ks[1]))(x), dual,
                f.vmap(lambda k: f.jvp(at(k), (x,), (t,)))(ks))

    cc.take()
    got, want = cases(tree_int), cases(pf.tree_int)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert cc.take() == ["evaluate", "jvp"] * 2 + ["evaluate", "jvp+batched_vectors", "evaluate+batched",
                                                    "jacobian+batched"]

    # what the jvp carries: the tangents of x alone, not zeros for each weight
    sent: list[tuple[str, int]] = []
    cc.client._http.event_hooks["request"].append(lambda r: sent.append((r.url.path.rsplit("/", 1)[-1], len(r.content))))
    layer = remote(cc.client, "dense_layer")
    g = torch.Generator().manual_seed(11)
    params = {"w": torch.randn(32, 64, dtype=torch.float64, generator=g),
              "b": torch.randn(32, dtype=torch.float64, generator=g)}
    x = torch.randn(64, dtype=torch.float64, generator=g)
    torch.testing.assert_close(f.jacfwd(layer, argnums=1)(params, x), f.jacfwd(ex.dense_layer, argnums=1)(params, x),
                               rtol=1e-12, atol=1e-12)
    (_, evaluated), (kind, carried) = sent
    assert kind == "jvp" and carried < evaluated + 2 * 64 * 64 * 8, sent  # was 1116376 bytes

    # a backward pass using one of two outputs: the other's cotangent, zeros
    polar = remote(cc.client, "polar")
    r, theta = torch.tensor([1.0, 2.0], dtype=torch.float64), torch.tensor([0.1, 0.2], dtype=torch.float64)
    for fn in (polar, ex.polar):
        a, b = r.clone().requires_grad_(), theta.clone().requires_grad_()
        fn(a, b)[1].pow(2).sum().backward()
        sent.append((a.grad, b.grad))
    torch.testing.assert_close(sent[-2], sent[-1], rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- JAX: x64 switched on later


def test_jax_dtypes_follow_x64_as_it_is_when_the_call_is_traced(cc):
    """JAX canonicalizes dtypes when a function is traced (float64 is float32 while
    ``jax_enable_x64`` is off); the adapter did so once, when ``remote()`` was made or a
    signature's shapes were learned. So a module-level ``remote(client, name,
    out_shape=ShapeDtypeStruct((2,), float64))`` made before the program switched x64 on
    cut every later result to float32 (``jit(arm)(q)`` float32, 1e-7 off), and a
    float64 function called once with x64 off answered float32 after it was switched
    on. Now each call takes x64 as it is: float64 then, equal to torch's float64."""
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    from jacobian_client.jax import remote

    from . import user_functions as uf

    before = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", False)
    try:
        arm = remote(cc.client, "planar_arm", out_shape=jax.ShapeDtypeStruct((2,), jnp.float64))
        solve = remote(cc.client, "solve")  # float64 inputs declared: computed and answered in float64
        q, a, b = [0.3, -0.2, 0.123456789012345], [[2.0, 0.5], [0.1, 3.0]], [1.0, 2.0]
        assert jax.jit(arm)(jnp.asarray(q)).dtype == jnp.float32  # as JAX gives float64 without x64
        assert solve(jnp.asarray(a), jnp.asarray(b)).dtype == jnp.float32
        jax.config.update("jax_enable_x64", True)
        got = jax.jit(arm)(jnp.asarray(q, jnp.float64))
        assert got.dtype == jnp.float64
        np.testing.assert_allclose(got, ex.planar_arm(torch.tensor(q, dtype=torch.float64)).numpy(), rtol=1e-14)
        a32, b32 = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)  # the signature learned above
        for x in (solve(a32, b32), jax.jit(solve)(a32, b32)):
            assert x.dtype == jnp.float64
            np.testing.assert_allclose(x, uf.solve(torch.tensor(np.asarray(a32), dtype=torch.float64),
                                                   torch.tensor(np.asarray(b32), dtype=torch.float64)).numpy(),
                                       rtol=1e-14)
    finally:
        jax.config.update("jax_enable_x64", before)
