"""Remote functions inside the caller's torch, JAX and SciPy code, round 6: second-order
products of a non-scalar remote function from the service's ``hvp`` with cotangents
(``c . H t``, the jvp of the vjp) instead of its whole Hessian; the fall-back to the
Hessian for a function without a forward-mode rule; optimisations carried through a
restart of the service's engine; and the adapters under the transforms users reach for
(torch.compile, torch.autograd.functional, checkpoint, threads, jit of vmap of jacrev,
linearize, Newton-CG). Every derivative is compared with the same function computed
in-process.

One server: the session's ``jacobian-service serve`` subprocess (``cc``), shared with the
other adapter test files.
"""

from __future__ import annotations

import httpx
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("jacobian_service.app")

import jacobian_client as jc  # noqa: E402
from jacobian_client.torch import remote  # noqa: E402
from jacobian_service import examples as ex  # noqa: E402

from . import _client_functions as cf  # noqa: E402
from ._remote_support import close_trees, cc, url  # noqa: E402,F401 (fixtures)

f = torch.func
X = torch.tensor([0.3, -1.2, 0.7], dtype=torch.float64)
T = torch.tensor([1.0, 0.5, -2.0], dtype=torch.float64)


def close(got, want, tol=1e-10):
    close_trees(got, want, tol)


def vhv(fn, primals, cot, tangents):
    """``c . H t`` in-process: the jvp (in the primals) of the vjp with ``c``."""
    return f.jvp(lambda *p: f.vjp(fn, *p)[1](cot), primals, tangents)[1]


# --------------------------------------------------------------------------- the service's hvp with cotangents


@pytest.mark.parametrize("transport", ["binary", "json"])
def test_hvp_with_cotangents_is_the_jvp_of_the_vjp_for_any_output(cc, transport):
    """hvp answered a scalar function only (422 "hvp needs a function with one scalar
    output" for planar_arm): a second-order product of a vector output took its whole
    Hessian (m n^2 numbers). With ``cotangents`` shaped like the output it answers
    ``c . H t`` as torch.func's jvp of the vjp does, one vector, a stack of pairs, a
    tuple output and tuple argnums alike."""
    client = cc.client
    c = np.array([1.0, -2.0])
    got = client.hvp("planar_arm", X.numpy(), tangents=T.numpy(), cotangents=c, transport=transport)
    close(torch.from_numpy(got), vhv(ex.planar_arm, (X,), torch.from_numpy(c), (T,))[0])
    rng = np.random.default_rng(0)
    ts, cs = rng.standard_normal((4, 3)), rng.standard_normal((4, 2))
    got, out = client.hvp("planar_arm", X.numpy(), tangents=ts, cotangents=cs, batched_vectors=True,
                          return_output=True, transport=transport)
    want = torch.stack([vhv(ex.planar_arm, (X,), torch.from_numpy(ck), (torch.from_numpy(tk),))[0]
                        for ck, tk in zip(cs, ts)])
    close(torch.from_numpy(got), want)
    close(torch.from_numpy(out), ex.planar_arm(X))
    # two inputs, a tuple output: cotangents as a tuple, tangents per argnum
    r, th = X.abs() + 0.5, T
    cr, ct = torch.tensor([0.5, 1.0, -1.0], dtype=torch.float64), torch.tensor([2.0, 0.0, 1.0], dtype=torch.float64)
    got = client.hvp("polar", r.numpy(), th.numpy(), tangents=(T.numpy(), X.numpy()), cotangents=(cr.numpy(), ct.numpy()),
                     argnums=(0, 1), transport=transport)
    close(tuple(torch.from_numpy(g) for g in got), vhv(ex.polar, (r, th), (cr, ct), (T, X)))
    # a scalar function: c is a number (H t scaled), the plain hvp's answer times c
    got = client.hvp("sum_sin", X.numpy(), tangents=T.numpy(), cotangents=np.float64(3.0), transport=transport)
    close(torch.from_numpy(got), 3 * client_free_hvp(ex.sum_sin, X, T))


def client_free_hvp(fn, x, t):
    return f.jvp(f.grad(fn), (x,), (t,))[1]


def test_hvp_cotangents_are_checked_as_a_vjps_are(url):
    """Bad cotangents are a 422 naming them, before (pairing) or at (shapes) the engine;
    a jvp or vjp that is given cotangents it does not take is refused as before; a
    vector output without cotangents says how to ask."""
    post = lambda name, body, kind="hvp": httpx.post(f"{url}/v1/functions/{name}/{kind}", json=body, timeout=60)  # noqa: E731
    x, t = [0.3, -1.2, 0.7], [1.0, 0.5, -2.0]
    cases = [
        ({"inputs": [x], "tangents": t, "cotangents": [1.0, 2.0, 3.0]}, "cotangents: expected shape [2], got [3]"),
        ({"inputs": [x], "tangents": [t, t], "cotangents": [[1.0, 2.0]] * 3, "batched_vectors": True},
         "cotangents and tangents pair up by index"),
        ({"inputs": [x], "tangents": [t], "cotangents": [1.0, 2.0], "batched_vectors": True},
         "cotangents and tangents pair up by index"),
        ({"inputs": [x], "tangents": t, "cotangents": {"a": [1.0, 2.0]}}, "cotangents"),
        ({"inputs": [x], "tangents": t}, "or 'cotangents' shaped like its output"),
    ]
    for body, detail in cases:
        r = post("planar_arm", body)
        assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json", r.text
        assert r.json()["code"] == "invalid_input" and detail in r.json()["detail"], r.text
    r = post("planar_arm", {"inputs": [x], "tangents": t, "cotangents": [1.0, 2.0]}, "jvp")
    assert r.status_code == 422 and "unknown option 'cotangents'" in r.json()["detail"], r.text


# --------------------------------------------------------------------------- torch: second order through the hvp


def _double_backward(fn, x):
    """A gradient penalty: the gradient with create_graph, then the gradient of its norm.
    The cotangent (2 y) depends on x, so both halves of the second derivative count."""
    x = x.clone().requires_grad_()
    y = fn(torch.sin(x))
    (g,) = torch.autograd.grad((y * y).sum(), x, create_graph=True)
    return torch.autograd.grad((g**2).sum(), x)[0]


def test_a_double_backward_through_a_vector_output_asks_for_one_hvp_not_the_hessian(cc):
    """The gradient penalty through planar_arm (2 outputs, 3 inputs) fetched its whole
    Hessian (m n^2 = 18 numbers; m n^2 grows as n^2 for a wide input) and contracted it on
    the client; it now sends the one (cotangent, tangent) pair to the service's hvp and
    gets n numbers back. (torch.func.hessian, whose m n pairs would carry the Hessian over
    in pieces, still asks for the Hessian: test_remote_round5.py.) So does a jvp's jvp
    (H[w, d], output-shaped), from one hvp pairing w with the output's basis."""
    r = remote(cc.client, "planar_arm")
    cc.take()
    close(_double_backward(r, X), _double_backward(ex.planar_arm, X))
    assert cc.take() == ["evaluate", "vjp", "jvp", "hvp", "vjp"]  # the last: through y = f(sin x)
    # a jvp of the vjp (forward over reverse, torch.autograd.functional's vhp / hvp):
    # the vectors stacked, one request
    cot = torch.tensor([[1.0, -1.0], [0.5, 2.0]], dtype=torch.float64)
    jvp_of_vjp = lambda fn: f.vmap(lambda c: vhv(fn, (X,), c, (T,))[0])(cot)  # noqa: E731
    close(jvp_of_vjp(r), jvp_of_vjp(ex.planar_arm))
    assert cc.take() == ["evaluate", "jvp", "vjp+batched_vectors", "hvp+batched_vectors"]
    # a jvp's jvp (a second directional derivative, H[w, d] per output): each w paired
    # with each output element's basis cotangent, one hvp (m n numbers, not m n^2)
    W, D = torch.tensor([0.2, 1.0, 0.3], dtype=torch.float64), T
    jvp_of_jvp = lambda fn: f.jvp(lambda x: f.jvp(fn, (x,), (W,))[1], (X,), (D,))[1]  # noqa: E731
    close(jvp_of_jvp(r), jvp_of_jvp(ex.planar_arm))
    assert cc.take() == ["evaluate", "jvp", "jvp", "hvp+batched_vectors"]
    two = lambda fn: f.jvp(lambda a, b: f.jvp(fn, (a, b), (W, D))[1], (X.abs(), W), (D, X))[1]  # noqa: E731
    close(two(remote(cc.client, "polar")), two(ex.polar))
    assert cc.take() == ["evaluate", "jvp", "jvp", "hvp+batched_vectors"]
    # two inputs, a tuple output (polar), in float32
    rr, th = (X.abs() + 0.5).float(), T.float()

    def penalty(fn):
        a, b = rr.clone().requires_grad_(), th.clone().requires_grad_()
        u, v = fn(a, b)
        ga, gb = torch.autograd.grad((u**3).sum() + (u * v).sum(), (a, b), create_graph=True)
        return torch.autograd.grad((ga * gb).sum() + (gb**2).sum(), (a, b))

    cc.take()
    close(penalty(remote(cc.client, "polar")), penalty(ex.polar), 1e-5)
    assert "hessian" not in cc.take()


def test_a_function_without_a_forward_rule_falls_back_to_its_hessian_once(cc):
    """An op without a forward-mode rule (a custom autograd.Function without jvp) cannot
    run the service's forward mode: jacrev(jacrev(f)) and the gradient penalty of such a
    function failed with the hvp's (or the jvp's) 500 (NotImplementedError: ... jvp ...),
    where in-process reverse over reverse answers. The SDK now asks the Hessian (reverse
    over reverse, checked by the service) or the Jacobian, warns once, and asks them
    alone from then on."""
    local = cf.energy_no_jvp
    r = remote(cc.client, "energy_no_jvp")
    want = f.jacrev(f.jacrev(local))(X)
    close(want, torch.diag(2 * torch.cos(2 * X)))  # d2/dx2 sin(x)^2
    cc.take()
    with pytest.warns(RuntimeWarning, match=r"hvp of 'energy_no_jvp' failed \(NotImplementedError.*Hessian"):
        close(f.jacrev(f.jacrev(r))(X), want)
    assert cc.take() == ["evaluate", "vjp+batched_vectors", "hvp+batched_vectors", "hessian"]
    close(f.jacrev(f.jacrev(r))(X), want)  # no warning (errors here), no hvp
    assert cc.take() == ["evaluate", "vjp+batched_vectors", "hessian"]
    # a vector output's gradient penalty: its cotangent's gradient J u came from the
    # jvp (forward mode too), now from the Jacobian; its c . H u from the Hessian
    local, r = cf.square_no_jvp, remote(cc.client, "square_no_jvp")
    with pytest.warns(RuntimeWarning) as record:
        close(_double_backward(r, X), _double_backward(local, X))
    assert sorted(str(w.message).split(" failed")[0] for w in record) == [
        "the service's hvp of 'square_no_jvp'", "the service's jvp of 'square_no_jvp'"]
    cc.take()
    close(_double_backward(r, X), _double_backward(local, X))
    assert cc.take() == ["evaluate", "vjp", "jacobian+batched", "hessian", "vjp"]


# --------------------------------------------------------------------------- optimisations through a restart


def _kill_engine(url):
    """SIGKILL the engine between two requests: the supervisor starts another, and the
    requests meanwhile are 503 ``unavailable`` (Retry-After), which the SDK retries."""
    import os
    import signal

    before = httpx.get(f"{url}/v1/info", timeout=30).json()["engine_pids"]
    os.kill(before[0], signal.SIGKILL)
    return before


def test_an_lbfgs_goes_on_through_an_engine_restart(cc, url):
    """The engine killed in the middle of an optimisation (between two of its requests):
    the requests until another engine is up are answered 503 with Retry-After, which
    the SDK's default retries wait out, and the solve ends where the local one does, in
    as many steps. (SciPy's and JAX's adapters send their requests through the same
    client, retries and all; one restart costs seconds of the suite.)"""
    target = torch.tensor([1.5, 1.2], dtype=torch.float64)
    killed = []

    def lbfgs(fn, kill_at=None):
        q = torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([q], lr=1, max_iter=25, line_search_fn="strong_wolfe")
        calls = []

        def closure():
            calls.append(1)
            if len(calls) == kill_at:
                killed.append(_kill_engine(url))
            opt.zero_grad()
            loss = ((fn(q) - target) ** 2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        return q.detach(), len(calls)

    q_local, n_local = lbfgs(ex.planar_arm)
    q_remote, n_remote = lbfgs(remote(cc.client, "planar_arm"), kill_at=3)
    assert killed and n_remote == n_local > 3
    close(q_remote, q_local, 1e-9)

    pids = httpx.get(f"{url}/v1/info", timeout=30).json()["engine_pids"]
    assert pids[0] != killed[0][0]


# --------------------------------------------------------------------------- as users use them: torch


def test_checkpoint_autograd_functional_and_jacfwd_of_a_remote_function(cc):
    """torch.utils.checkpoint recomputes the remote call in the backward pass (its
    evaluate again, then the vjp); torch.autograd.functional's jacobian / hessian
    (vectorize=False) and jacfwd (forward mode through the service's jvp) give what they
    give in-process."""
    arm = remote(cc.client, "planar_arm")
    A = torch.autograd.functional

    def checkpointed(fn):
        x = X.clone().requires_grad_()
        y = torch.utils.checkpoint.checkpoint(lambda q: (fn(torch.sin(q)) ** 2).sum(), x, use_reentrant=False)
        y.backward()
        return y.detach(), x.grad

    cc.take()
    close(checkpointed(arm), checkpointed(ex.planar_arm))
    assert cc.take() == ["evaluate", "evaluate", "vjp"]
    close(A.jacobian(arm, X), A.jacobian(ex.planar_arm, X))
    assert cc.take() == ["evaluate", "vjp", "vjp"]  # one vjp per output row
    close(A.hessian(ex.sum_sin, X), A.hessian(remote(cc.client, "sum_sin"), X))
    close(f.jacfwd(arm)(X), f.jacrev(ex.planar_arm)(X))
    assert cc.take()[-2:] == ["evaluate", "jvp+batched_vectors"]


def test_threads_share_one_client_and_one_remote_function(cc):
    """DDP-like use: several threads train through one remote function on one client
    (one connection pool) at once; each thread's gradients are its own inputs', as
    in-process."""
    from concurrent.futures import ThreadPoolExecutor

    arm = remote(cc.client, "planar_arm")

    def step(fn, k):
        q = (X * (1 + k / 4)).clone().requires_grad_()
        for _ in range(3):
            loss = ((fn(q) - torch.tensor([1.0, 0.5], dtype=torch.float64)) ** 2).sum()
            (g,) = torch.autograd.grad(loss, q)
            q = (q - 0.1 * g).detach().requires_grad_()
        return q.detach()

    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda k: step(arm, k), range(8)))
    for k, q in enumerate(got):
        close(q, step(ex.planar_arm, k))


def test_asyncio_users_call_remote_functions_in_threads_and_the_async_client_alongside(url):
    """An asyncio program: the torch adapter (synchronous, as torch is) runs in worker
    threads (asyncio.to_thread) beside AsyncClient calls on the same loop; answers as
    in-process."""
    import asyncio

    async def main():
        with jc.Client(url) as client:
            arm = remote(client, "planar_arm")
            async with jc.AsyncClient(url) as aclient:
                jac = lambda x: f.jacrev(arm)(x)  # noqa: E731
                got = await asyncio.gather(*(asyncio.to_thread(jac, X * k) for k in (1, 2)),
                                           aclient.hvp("planar_arm", X.numpy(), tangents=T.numpy(),
                                                       cotangents=np.array([1.0, -2.0])))
        return got

    j1, j2, h = asyncio.run(main())
    close(j1, f.jacrev(ex.planar_arm)(X))
    close(j2, f.jacrev(ex.planar_arm)(2 * X))
    close(torch.from_numpy(h), vhv(ex.planar_arm, (X,), torch.tensor([1.0, -2.0], dtype=torch.float64), (T,))[0])
    with pytest.raises(TypeError, match="AsyncClient"):
        remote(jc.AsyncClient(url), "planar_arm")


# --------------------------------------------------------------------------- as users use them: JAX


def test_jax_jit_of_vmap_of_jacrev_with_static_args_and_grad_of_grad_of_a_vector_output(cc):
    """jax.jit(jax.vmap(jax.jacrev(remote))) with a static argument (recompiled per value,
    one batched jacobian per call), and jax's grad of grad through a vector output: one
    hvp with cotangents, as torch's double backward."""
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    from jacobian_client.jax import remote as jremote

    before = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        arm = jremote(cc.client, "planar_arm")
        xs = jnp.asarray(np.stack([X.numpy(), 2 * X.numpy()]))

        scaled = jax.jit(lambda x, k: k * jax.vmap(jax.jacrev(arm))(x), static_argnums=1)
        want = f.vmap(f.jacrev(ex.planar_arm))(torch.from_numpy(np.array(xs)))
        np.testing.assert_allclose(scaled(xs, 3.0), 3 * want.numpy(), rtol=1e-10)
        cc.take()
        np.testing.assert_allclose(scaled(2 * xs, 3.0), 3 * f.vmap(f.jacrev(ex.planar_arm))(
            torch.from_numpy(2 * np.array(xs))).numpy(), rtol=1e-10)
        assert cc.take() == ["jacobian+batched"]  # compiled once: the evaluate dropped, as unused
        # grad of grad: the cotangent (2 y) depends on x; a vector output's c . H u
        # comes from one hvp with cotangents, not the Hessian
        penalty = lambda fn: jax.grad(lambda q: jnp.sum(jax.grad(lambda p: jnp.sum(fn(jnp.sin(p)) ** 2))(q) ** 2))  # noqa: E731
        x = jnp.asarray(X.numpy())
        cc.take()
        got = penalty(arm)(x)
        assert "hvp" in cc.take()
        np.testing.assert_allclose(got, _double_backward(ex.planar_arm, X).numpy(), rtol=1e-10)
    finally:
        jax.config.update("jax_enable_x64", before)


# --------------------------------------------------------------------------- as users use them: SciPy


def test_scipy_newton_cg_with_hessp_and_float32_functions(cc):
    """minimize(method="Newton-CG", hessp=) through the service's hvp reaches the local
    solution in as many steps; a function without a forward-mode rule
    gets hessp from its Hessian (one per point, a warning once); a function declared
    float32 under SciPy's float64 gives float64 answers of its float32 values."""
    from scipy.optimize import minimize

    from jacobian_client.scipy import remote_objective

    grad = lambda fn: lambda x: f.grad(fn)(torch.from_numpy(x)).numpy()  # noqa: E731
    hessp = lambda fn: lambda x, p: client_free_hvp(fn, torch.from_numpy(x), torch.from_numpy(p)).numpy()  # noqa: E731
    sines = remote_objective(cc.client, "sum_sin")
    x0 = np.array([-1.0, -2.0, 0.5])  # to (-pi/2, -pi/2, -pi/2)
    want = minimize(lambda x: ex.sum_sin(torch.from_numpy(x)).item(), x0, jac=grad(ex.sum_sin),
                    hessp=hessp(ex.sum_sin), method="Newton-CG")
    cc.take()
    got = minimize(sines.fun, x0, jac=sines.jac, hessp=sines.hessp, method="Newton-CG")
    np.testing.assert_allclose(got.x, want.x, rtol=1e-10)
    assert (got.nit, got.nfev, got.njev, got.nhev) == (want.nit, want.nfev, want.njev, want.nhev)
    requests = cc.take()  # SciPy's nhev counts one hessp more than it calls (Newton-CG)
    assert set(requests) == {"jacobian+return_output", "hvp"} and got.nhev - 1 <= requests.count("hvp") <= got.nhev

    energy = remote_objective(cc.client, "energy_no_jvp")
    local_e = lambda x: cf.energy_no_jvp(torch.from_numpy(x)).item()  # noqa: E731
    hess_e = lambda x, p: f.jacrev(f.jacrev(cf.energy_no_jvp))(torch.from_numpy(x)).numpy() @ p  # noqa: E731
    y0 = np.array([0.4, -0.3, 1.0])
    want = minimize(local_e, y0, jac=grad(cf.energy_no_jvp), hessp=hess_e, method="Newton-CG")
    cc.take()
    with pytest.warns(RuntimeWarning, match="hvp of 'energy_no_jvp' failed"):
        got = minimize(energy.fun, y0, jac=energy.jac, hessp=energy.hessp, method="Newton-CG")
    np.testing.assert_allclose(got.x, want.x, rtol=1e-8, atol=1e-10)
    assert got.nhev == want.nhev
    requests = cc.take()
    assert requests.count("hvp") == 1 and requests.count("hessian") <= got.nit + 1

    # float32 values under SciPy's float64 x: the function's own float32 numbers, as a
    # local float32 function gives them (the same solution in as many evaluations)
    from scipy.optimize import least_squares

    from tests import user_functions as uf

    f32 = remote_objective(cc.client, "to_float32")
    target = np.sin(np.array([0.2, -0.4, 0.9])).astype(np.float32).repeat(3)
    x0 = np.array([0.1, -0.1, 0.5])
    local_f32 = lambda x: uf.to_float32(torch.from_numpy(x)).numpy()  # noqa: E731
    want = least_squares(lambda x: local_f32(x) - target, x0,
                         jac=lambda x: f.jacrev(uf.to_float32)(torch.from_numpy(x)).numpy())
    got = least_squares(lambda x: f32.fun(x) - target, x0, jac=f32.jac)
    assert f32.fun(x0).dtype == local_f32(x0).dtype == np.float32 and got.x.dtype == np.float64
    np.testing.assert_allclose(got.x, want.x, rtol=1e-12)
    assert (got.nfev, got.njev) == (want.nfev, want.njev)


def test_an_hvp_that_fails_for_another_reason_is_raised_not_taken_for_a_missing_forward_rule(cc, monkeypatch):
    """Only an error that says the function has no forward-mode rule switches a remote
    function to its Hessian: an engine that crashed or hung on the hvp (a transient
    ``function_error``, seen in a full suite run) switched forward mode off for good, with
    a warning that the function lacked a rule it has."""
    import warnings

    from jacobian_client.scipy import remote_objective

    crash = {"code": "function_error", "detail": "the engine stopped answering for 10 s while running this request; "
                                                 "the engine was restarted"}
    sines = remote_objective(cc.client, "sum_sin")
    real = cc.client._parts

    def parts(kind, *args, **kwargs):
        if kind == "hvp":
            raise jc.FunctionError(httpx.Response(500, json=crash), crash)
        return real(kind, *args, **kwargs)

    monkeypatch.setattr(cc.client, "_parts", parts)
    x, p = np.array([0.1, 0.2, 0.3]), np.array([1.0, 0.0, 0.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(jc.FunctionError, match="stopped answering"):
            sines.hessp(x, p)
    assert sines._hvp_works  # the next hessp asks the hvp again
    monkeypatch.setattr(cc.client, "_parts", real)
    np.testing.assert_allclose(sines.hessp(x, p), [-np.sin(0.1), 0.0, 0.0], rtol=1e-6)
