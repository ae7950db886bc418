"""Remote functions inside the caller's torch, JAX and SciPy code, round 7: torch.compile
with an AOT backend around torch.func transforms, inputs by name, a service that is down
(a ConnectionError in every adapter), and sparse Jacobians for SciPy's least_squares.
Every derivative is compared with the same function computed in-process.

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

from ._remote_support import close_trees, cc, url  # noqa: E402,F401 (fixtures)

f = torch.func
X = torch.tensor([0.3, -1.2, 0.7], dtype=torch.float64)
T = torch.tensor([1.0, 0.5, -2.0], dtype=torch.float64)


def close(got, want, tol=1e-10):
    close_trees(got, want, tol)


# --------------------------------------------------------------------------- torch.compile


@pytest.mark.filterwarnings("ignore::UserWarning")  # dynamo's notes on graph breaks and non-leaf .grad
def test_torch_compile_with_an_aot_backend_runs_the_requests_of_transforms_eagerly(cc):
    """torch.compile(grad(remote)) (or of a function calling jacrev, vmap) with an AOT
    backend (aot_eager, and inductor, the default) failed inside the SDK's .npy reader: dynamo does not trace
    under torch.func's transforms, so the frame ran eagerly with dynamo's frame hook
    still set, and every frame below it, the SDK's request code included, was compiled
    on its own ("AssertionError: Expected np.nditer base, got <class 'bytes'>"). The
    requests now run with dynamo disabled wherever it is loaded."""
    import torch._dynamo

    arm = remote(cc.client, "planar_arm")
    try:
        cc.take()
        # torch.compile of the transform itself: an AOT backend compiles around the break
        # (the eager backend cannot, for any graph break under grad: torch's own limit)
        grad = torch.compile(f.grad(lambda y: (arm(y) ** 2).sum()), backend="aot_eager")
        close(grad(X), f.grad(lambda y: (ex.planar_arm(y) ** 2).sum())(X))
        assert cc.take() == ["evaluate", "vjp"]
    finally:
        torch._dynamo.reset()


# --------------------------------------------------------------------------- calls by name


def test_remote_functions_take_their_inputs_by_name_as_in_process(cc):
    """``arm(angles=q)``, as the function itself is called in-process, failed with
    "Remade.__call__() got an unexpected keyword argument 'angles'", a class the caller
    never wrote. Keywords are now placed by the names the function declares (asked once,
    on the first keyword call), in torch (under autograd and torch.func) and JAX (under
    jit and grad), and a wrong call is a TypeError as Python's own."""
    pol = remote(cc.client, "polar")
    r = (X.abs() + 0.5).requires_grad_()
    cc.take()
    u, v = pol(theta=X, r=r)
    (u * v).sum().backward()
    want_r = r.detach().clone().requires_grad_()
    wu, wv = ex.polar(want_r, X)
    (wu * wv).sum().backward()
    close((u.detach(), v.detach(), r.grad), (wu.detach(), wv.detach(), want_r.grad))
    assert cc.take() == ["polar", "evaluate", "vjp"]  # the names, once
    close(f.grad(lambda t: pol(r.detach(), theta=t)[1].sum())(X), f.grad(lambda t: ex.polar(r.detach(), t)[1].sum())(X))
    assert cc.take() == ["evaluate", "vjp"]
    for call, message in [(lambda: pol(X, r=X), "multiple values for input 'r'"),
                          (lambda: pol(X, angle=X), "unexpected keyword argument 'angle'; its inputs are r, theta"),
                          (lambda: pol(theta=X), "missing input 'r'"),
                          (lambda: pol(X, X, X, theta=X), "takes 2 inputs (r, theta) but 3 positional")]:
        with pytest.raises(TypeError, match=message.replace("(", r"\(").replace(")", r"\)")):
            call()
    assert cc.take() == []

    jax = pytest.importorskip("jax")
    from jacobian_client.jax import remote as jremote

    jpol = jremote(cc.client, "polar")
    rn, tn = r.detach().numpy().astype(np.float32), X.numpy().astype(np.float32)
    grad = jax.jit(jax.grad(lambda t: (jpol(theta=t, r=rn)[1] ** 2).sum()))(tn)
    want = f.grad(lambda t: (ex.polar(torch.from_numpy(rn), t)[1] ** 2).sum())(torch.from_numpy(tn))
    np.testing.assert_allclose(np.asarray(grad), want.numpy(), rtol=1e-5)


# --------------------------------------------------------------------------- failures


def test_a_service_that_is_down_is_a_connection_error_in_every_adapter():
    """With the service down (nothing listening), a remote call in torch, JAX (under jit
    too: the shape probe runs at trace time) or a SciPy solve raised the SDK's plain
    TransportError, which ``except ConnectionError`` (code written for sockets: a loop
    that waits for the service to come back) did not catch. It is now a
    ServiceUnreachable, a TransportError and a builtin ConnectionError, saying what to
    check; it pickles as itself."""
    import pickle
    import socket

    from scipy.optimize import minimize

    from jacobian_client.scipy import remote_objective

    with socket.socket() as held:  # bound, never listening: connections are refused
        held.bind(("127.0.0.1", 0))
        client = jc.Client(f"http://127.0.0.1:{held.getsockname()[1]}", max_retries=0)
        calls = [lambda: remote(client, "planar_arm")(X),
                 lambda: minimize(remote_objective(client, "sum_sin").fun, X.numpy(),
                                  jac=remote_objective(client, "sum_sin").jac)]
        jax = pytest.importorskip("jax")
        from jacobian_client.jax import remote as jremote

        calls += [lambda: jremote(client, "planar_arm")(jax.numpy.ones(3)),
                  lambda: jax.jit(jremote(client, "planar_arm"))(jax.numpy.ones(3))]
        for call in calls:
            with pytest.raises(ConnectionError, match="Connection refused; is the service running") as info:
                call()
            assert isinstance(info.value, jc.ServiceUnreachable) and isinstance(info.value, jc.TransportError)
        back = pickle.loads(pickle.dumps(info.value))
        assert type(back) is jc.ServiceUnreachable and str(back) == str(info.value)


# --------------------------------------------------------------------------- SciPy


def test_scipy_least_squares_with_a_sparse_jacobian_from_the_service(cc):
    """least_squares(jac=) takes a sparse Jacobian (and then solves with lsmr), and the
    service computes one from a few compressed products; but remote_objective's jac was
    always dense (n^2 numbers on the wire for lorenz96's 13-wide band). With
    ``sparsity=`` it is a scipy.sparse CSR array, fetched with the value as before (one
    request per point), and the solve is the one a local sparse Jacobian gives; ``hess``
    likewise (trust-constr takes a sparse Hessian)."""
    import scipy.sparse as sp
    from scipy.optimize import least_squares

    from jacobian_client.scipy import remote_objective

    n = 32
    lz = remote_objective(cc.client, "lorenz96", sparsity="band")
    x = np.linspace(-1.0, 2.0, n)
    J = lz.jac(x)
    want = f.jacrev(ex.lorenz96)(torch.from_numpy(x)).numpy()
    assert sp.issparse(J) and J.format == "csr" and J.shape == (n, n) and J.nnz == 13 * n
    np.testing.assert_allclose(J.toarray(), want, rtol=1e-10, atol=1e-12)
    J.data[:] = 0  # the caller's own copy: the cache keeps its matrix
    np.testing.assert_allclose(lz.jac(x).toarray(), want, rtol=1e-10, atol=1e-12)

    target = ex.lorenz96(torch.from_numpy(np.sin(x))).numpy()
    local_fun = lambda q: ex.lorenz96(torch.from_numpy(q)).numpy() - target  # noqa: E731
    local_jac = lambda q: sp.csr_array(f.jacrev(ex.lorenz96)(torch.from_numpy(q)).numpy())  # noqa: E731
    wanted = least_squares(local_fun, x, jac=local_jac)
    cc.take()
    got = least_squares(lambda q: lz.fun(q) - target, x, jac=lz.jac)
    np.testing.assert_allclose(got.x, wanted.x, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(got.x, np.sin(x), atol=1e-6)
    assert (got.nfev, got.njev) == (wanted.nfev, wanted.njev)
    # the value brings the sparse Jacobian along (x0's is cached from the jac above)
    assert cc.take() == ["jacobian+return_output"] * (got.nfev - 1), got.nfev

    # a scalar function: its Hessian sparse, its gradient the dense array minimize takes
    grad = f.grad(ex.rosenbrock)(torch.from_numpy(x)).numpy()
    for prefetch in (True, False):
        rb = remote_objective(cc.client, "rosenbrock", sparsity="auto", prefetch=prefetch)
        H = rb.hess(x)
        assert sp.issparse(H) and H.shape == (n, n) and H.nnz == 3 * n - 2  # tridiagonal
        np.testing.assert_allclose(H.toarray(), f.hessian(ex.rosenbrock)(torch.from_numpy(x)).numpy(), rtol=1e-10)
        g = rb.jac(x)
        assert type(g) is np.ndarray and g.shape == (n,)
        np.testing.assert_allclose(g, grad, rtol=1e-10)


# --------------------------------------------------------------------------- threads


def test_threads_sharing_a_remote_function_over_many_input_shapes():
    """A remote function remembers the output shapes of its last 64 input signatures;
    threads sharing it (a thread pool, DDP-like training on sequences of many lengths)
    evicted the oldest at once, and a forward raised KeyError (both deleting it) or
    "dictionary changed size during iteration". Writers now take turns. (A stub client:
    no server; the eviction holds each thread until the other arrives or 0.2 s pass, so
    the two meet there whenever they can.)"""
    import threading

    from jacobian_client._remote import RemoteOps

    class Stub:
        def _parts(self, kind, name, inputs, options, vectors=None):
            return {"value": 2 * np.asarray(inputs[0])}

    ops = RemoteOps(Stub(), "double")
    for n in range(1, 65):
        ops.evaluate([np.ones(n)])
    meet = threading.Barrier(2)

    class Meeting(dict):
        def __delitem__(self, key):
            try:
                meet.wait(timeout=0.2)
            except threading.BrokenBarrierError:  # taking turns: nobody else comes
                pass
            super().__delitem__(key)

    ops._templates = Meeting(ops._templates)
    errors, results = [], {}

    def work(n):
        try:
            results[n] = ops.evaluate([np.full(n, 3.0)]).outputs[0]
        except Exception as exc:  # noqa: BLE001 (reported below)
            errors.append(repr(exc))

    threads = [threading.Thread(target=work, args=(n,)) for n in (100, 101)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert all(np.array_equal(results[n], np.full(n, 6.0)) for n in (100, 101))
    assert len(ops._templates) == 64 and list(ops._templates)[-2:] in (
        [(((100,), "<f8"),), (((101,), "<f8"),)], [(((101,), "<f8"),), (((100,), "<f8"),)])
