"""Remote functions inside the caller's torch, JAX and SciPy code, round 12: each case
compared with the same computation in-process (or, where in-process cannot run it, with
its error).

One server: the session's ``jacobian-service serve`` subprocess (``cc``), shared with the
other adapter test files; it also serves tests/remote12_functions.py.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("jacobian_service.app")

from ._remote_support import cc, jx, url  # noqa: E402,F401 (fixtures)


# --------------------------------------------------------------------------- JAX: an output whose shape follows the values


def test_jit_never_answers_an_output_whose_shape_follows_the_values(cc, jx):
    """Under ``jit`` the output shapes are learned before anything runs (an evaluate at
    zeros), and each answer is checked against them. But XLA runs no callback for a
    result without elements, nor JAX one whose results are unused (``jacrev`` needs no
    output value), and a per-example Jacobian or Hessian was reshaped into the learned
    layout: ``keeps_positives`` (``x[x > 0] * 3``, empty at zeros) answered ``jit(f)`` with
    ``[]``, ``jit(vmap(f))`` with ``(2, 0)`` and ``jit(jacrev(f))`` with ``(0, 3)``, no request
    made; ``r12_turns`` (``3 x 2`` at zeros, ``2 x 3`` here) answered ``jit(vmap(grad))`` and
    ``jit(vmap(hessian))`` with the service's Jacobian and Hessian read in the wrong order,
    with a 200. In-process ``jit`` cannot trace either function; each now raises, naming
    the shapes and why, and outside ``jit`` the same transforms equal torch.func."""
    jax = jx
    jnp = jax.numpy
    from jacobian_client.jax import remote

    from . import remote12_functions as r12
    from . import user_functions as uf

    kp = remote(cc.client, "keeps_positives")
    x = jnp.array([1.0, -2.0, 3.0])
    for transform, arg in ((jax.jit(kp), x), (jax.jit(jax.vmap(kp)), jnp.stack([x, x])),
                           (jax.jit(jax.jacrev(kp)), x), (jax.jit(jax.jacfwd(kp)), x)):
        with pytest.raises(jax.errors.JaxRuntimeError, match=r"'keeps_positives' returned (output 0|a jvp result) of "
                                                             r"shape \[(\d, )?2\], expected \[(\d, )?0\].*cannot be "
                                                             r"traced by jax.jit"):
            transform(arg)
    negative = jnp.array([-1.0, -2.0, -3.0])  # empty here too: the answer stands, as torch.func's
    want = torch.func.jacrev(uf.keeps_positives)(torch.tensor(np.asarray(negative)))
    cc.take()
    got = jax.jit(jax.jacrev(kp))(negative)
    assert got.shape == tuple(want.shape) == (0, 3)
    assert cc.take() == ["evaluate"]  # the check of the shapes learned; the Jacobian itself asks nothing

    w = torch.arange(6.0, dtype=torch.float64).reshape(2, 3)
    xs = torch.stack([torch.linspace(0.1, 0.6, 6, dtype=torch.float64), torch.linspace(-0.2, 0.5, 6, dtype=torch.float64)])
    turns = remote(cc.client, "r12_turns")
    loss = lambda z: (turns(z) * jnp.asarray(w.numpy().T)).sum()  # noqa: E731 (3 x 2, as learned at zeros)
    for transform in (jax.vmap(jax.grad(loss)), jax.vmap(jax.hessian(loss))):
        with pytest.raises(jax.errors.JaxRuntimeError, match=r"'r12_turns' returned a block of the (Jacobian|Hessian) "
                                                             r"of shape \[2, 2, 3, 6.*expected \[2, 3, 2, 6"):
            jax.jit(transform)(jnp.asarray(xs.numpy()))
    eager = remote(cc.client, "r12_turns")  # outside jit the shapes are the caller's: (2, 3) here
    local_loss = lambda z: (r12.r12_turns(z) * w).sum()  # noqa: E731
    loss = lambda z: (eager(z) * jnp.asarray(w.numpy())).sum()  # noqa: E731
    np.testing.assert_allclose(np.asarray(jax.vmap(jax.grad(loss))(jnp.asarray(xs.numpy()))),
                               torch.stack([torch.func.grad(local_loss)(z) for z in xs]).numpy(), rtol=1e-12,
                               atol=1e-12)  # (torch's vmap cannot run its data-dependent branch in-process)


# --------------------------------------------------------------------------- torch: a 0-d input beside dimensioned ones


def test_a_zero_dim_input_decides_neither_the_dtype_nor_the_device(cc):
    """torch promotes as if a 0-d tensor beside dimensioned ones were a number: a float64
    0-d scale times a bfloat16 ``x`` is bfloat16 (and a CPU 0-d tensor goes with CUDA
    ones, see the CUDA case below). The adapter counted the scale: ``r12_scaled(s, x)``
    answered the service's float32 where in-process answers bfloat16, and so did its aux
    beside ``scaled_norm``'s bfloat16 ``x``. Now every output and gradient has in-process
    torch's dtype, and values equal it within bfloat16's precision."""
    from jacobian_client.torch import remote

    from . import remote12_functions as r12
    from . import user_functions as uf

    s = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
    x = torch.tensor([0.3, -0.2, 0.5], dtype=torch.bfloat16, requires_grad=True)
    got = remote(cc.client, "r12_scaled")(s, x)
    want = r12.r12_scaled(s, x)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)
    grads = torch.autograd.grad(got.sum(), (s, x))
    local = torch.autograd.grad(want.sum(), (s, x))
    for g, w in zip(grads, local):
        assert g.dtype == w.dtype and g.device == w.device
        torch.testing.assert_close(g, w, rtol=1e-2, atol=1e-2)

    xs = x.detach().repeat(2, 1)
    power = torch.tensor(2)
    (norms, aux), (want_norms, want_aux) = remote(cc.client, "scaled_norm")(xs, s, power), uf.scaled_norm(xs, s, power)
    assert norms.dtype == aux["total"].dtype == want_norms.dtype == want_aux["total"].dtype == torch.bfloat16
    torch.testing.assert_close(norms, want_norms, rtol=1e-2, atol=1e-2)


def test_jax_a_python_float_takes_no_part_in_the_dtype(cc, jx):
    """jax's promotion leaves weakly typed values (a Python float) out: ``1.5 * x`` of a
    bfloat16 ``x`` is bfloat16. The adapter counted ``jnp.asarray(1.5)``: ``r12_scaled(1.5,
    x)`` answered the service's float32, under jit too. Now it is bfloat16 as in-process;
    a strongly typed float32 scale still promotes to float32, and the two calls, of the
    same shapes and dtypes, are learned apart."""
    jax = jx
    jnp = jax.numpy
    from jacobian_client.jax import remote

    f = remote(cc.client, "r12_scaled")
    x = jnp.array([0.3, -0.2, 0.5], dtype=jnp.bfloat16)
    local = lambda s, z: s * jnp.sin(z)  # noqa: E731 (r12_scaled in jax)
    with jax.enable_x64(False):  # a Python float is float32 then, as the strong scale is
        for s in (jnp.float32(1.5), 1.5, jnp.asarray(1.5)):  # strong first: its shapes must not answer the weak
            for call in (f, jax.jit(f)):
                got, want = call(s, x), local(s, x)
                assert got.dtype == want.dtype, (s, got.dtype, want.dtype)
                np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(want, np.float64), rtol=1e-2)


@pytest.mark.gpu
def test_a_cpu_zero_dim_input_goes_with_cuda_ones(cc):
    """A CPU 0-d scale first, ``x`` on CUDA: in-process the result is on CUDA, and so are
    the remote function's output and ``x``'s gradient (they were on the CPU, and the
    backward failed: "invalid gradient ... expected device cuda:0 but got cpu")."""
    from jacobian_client.torch import remote

    from . import remote12_functions as r12

    s = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
    x = torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64, device="cuda", requires_grad=True)
    got, want = remote(cc.client, "r12_scaled")(s, x), r12.r12_scaled(s, x)
    assert got.device == want.device and got.device.type == "cuda"
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for g, w in zip(torch.autograd.grad(got.sum(), (s, x)), torch.autograd.grad(want.sum(), (s, x))):
        assert g.device == w.device
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    jac = torch.func.jacrev(remote(cc.client, "r12_scaled"), argnums=1)(s.detach(), x.detach())
    assert jac.device.type == "cuda"
    torch.testing.assert_close(jac, torch.func.jacrev(r12.r12_scaled, argnums=1)(s.detach(), x.detach()))


# --------------------------------------------------------------------------- SciPy: complex-step differentiation


def test_scipy_complex_step_is_refused_not_cut_to_its_real_part(cc):
    """SciPy's complex-step differentiation evaluates ``fun(x + h i)``; the service
    computes in real dtypes, and the objective cast ``x`` to float64 with numpy's
    ComplexWarning alone: every difference was zero, and ``least_squares(jac="cs")``
    stopped at ``x0`` after one evaluation (1.2 off the solution it finds in-process,
    where ``lorenz96`` takes complex ``x``). It is a TypeError naming the way out now, for
    ``minimize`` too; ``'3-point'`` solves as in-process, evaluation for evaluation."""
    so = pytest.importorskip("scipy.optimize")
    from jacobian_client.scipy import remote_objective

    from jacobian_service import examples as ex

    def local(x):
        return ex.lorenz96(torch.as_tensor(x)).numpy()

    x0 = np.linspace(-1.0, 1.0, 6)
    target = local(np.linspace(0.2, 0.8, 6))
    l96 = remote_objective(cc.client, "lorenz96")
    with pytest.raises(TypeError, match=r"complex x \(complex128\).*jac='cs'.*jac=obj.jac"):
        so.least_squares(lambda x: l96.fun(x) - target, x0, jac="cs")
    rb = remote_objective(cc.client, "rosenbrock")
    with pytest.raises(TypeError, match=r"complex x"):
        so.minimize(rb.fun, x0, jac="cs", method="BFGS")
    with pytest.raises(TypeError, match=r"complex p"):
        rb.hessp(x0, x0 + 1j)
    in_process = so.least_squares(lambda x: local(x) - target, x0, jac="cs")
    remote = so.least_squares(lambda x: l96.fun(x) - target, x0, jac="3-point")
    assert in_process.success and remote.success
    np.testing.assert_allclose(remote.x, in_process.x, atol=1e-8)
    assert remote.nfev == so.least_squares(lambda x: local(x) - target, x0, jac="3-point").nfev
