"""jacobian_client.scipy: scipy.optimize with remote fun / jac / hessp reaches the same
solution in the same number of evaluations as with local callables, with the requests
counted exactly."""

from __future__ import annotations

import itertools
from typing import Any, Callable

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("jacobian_service.app")

from jacobian_client.scipy import remote_objective  # noqa: E402
from jacobian_service import examples as ex  # noqa: E402

from . import _client_functions as cf  # noqa: E402
from ._remote_support import Counted, cc, url  # noqa: E402,F401 (fixtures)

f = torch.func
TARGET = np.array([1.2, 1.5])

# scipy.optimize is imported by the module's first test, not at collection: every xdist
# worker imports every test module, and this import cost each of them ~1.2 CPU-s for a
# module only one of them runs. The name stays a module global.
optimize: Any = None


@pytest.fixture(scope="module", autouse=True)
def _scipy_optimize() -> None:
    global optimize
    optimize = pytest.importorskip("scipy.optimize")


class Local:
    """In-process callables for a torch function, logging each call's kind and point."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.calls: list[tuple[str, bytes]] = []

    def _t(self, x: np.ndarray, kind: str) -> torch.Tensor:
        x = np.asarray(x, dtype=np.float64)
        self.calls.append((kind, x.tobytes()))
        return torch.from_numpy(x.copy())

    def fun(self, x):
        out = self.fn(self._t(x, "fun")).numpy()
        return float(out) if out.ndim == 0 else out

    def jac(self, x):
        return f.jacrev(self.fn)(self._t(x, "jac")).numpy()

    def hessp(self, x, p):
        t = self._t(x, "hessp")
        return f.jvp(f.grad(self.fn), (t,), (torch.from_numpy(np.asarray(p, dtype=np.float64)),))[1].numpy()

    def expected_requests(self) -> list[str]:
        """With prefetch: one jacobian+output request per fun/jac call at a new point (the
        last two are cached), while at least 1 in 4 of the last 16 evaluated points had
        their Jacobian asked for (judged from the 4th point on); else an evaluate, and a
        jacobian when jac asks for that point. One hvp per hessp call."""
        out: list[str] = []
        cache: list[list] = []  # the last two points, oldest first: [x, has its Jacobian, its asked flag]
        asked: list[list[bool]] = []  # per evaluated point: was its Jacobian asked for
        for kind, x in self.calls:
            if kind == "hessp":
                out.append("hvp")
                continue
            entry = next((e for e in cache if e[0] == x), None)
            if kind == "fun" and entry is None:
                recent = asked[-16:]
                pays = len(recent) < 4 or 4 * sum(a[0] for a in recent) >= len(recent)
                entry = [x, pays, [False]]
                asked.append(entry[2])
                out.append("jacobian+return_output" if pays else "evaluate")
            elif kind == "jac" and entry is None:
                entry = [x, True, [False]]
                asked.append(entry[2])
                out.append("jacobian+return_output")
            elif kind == "jac" and not entry[1]:
                entry[1] = True
                out.append("jacobian")
            else:
                if kind == "jac":
                    entry[2][0] = True
                continue  # answered from the cache: its place in it unchanged
            if kind == "jac":
                entry[2][0] = True
            cache = [e for e in cache if e[0] != x][-1:] + [entry]
        return out


def test_least_squares_inverse_kinematics(cc):
    local = Local(ex.planar_arm)
    arm = remote_objective(cc.client, "planar_arm")
    q0 = np.array([0.1, 0.2, 0.3])
    want = optimize.least_squares(lambda q: local.fun(q) - TARGET, q0, jac=local.jac)
    got = optimize.least_squares(lambda q: arm.fun(q) - TARGET, q0, jac=arm.jac)
    assert want.success and got.success
    np.testing.assert_allclose(ex.planar_arm(torch.from_numpy(got.x)).numpy(), TARGET, atol=1e-8)  # solved
    np.testing.assert_allclose(got.x, want.x, rtol=1e-10, atol=1e-10)
    assert (got.nfev, got.njev) == (want.nfev, want.njev)
    assert cc.take() == ["jacobian+return_output"] * got.nfev  # jac(x) was always prefetched
    assert cc.take() == [] and local.expected_requests() == ["jacobian+return_output"] * want.nfev


def test_least_squares_without_prefetch_asks_separately(cc):
    arm = remote_objective(cc.client, "planar_arm", prefetch=False)
    q0 = np.array([0.1, 0.2, 0.3])
    got = optimize.least_squares(lambda q: arm.fun(q) - TARGET, q0, jac=arm.jac)
    requests = cc.take()
    assert requests.count("evaluate") == got.nfev and requests.count("jacobian") == got.njev
    assert len(requests) == got.nfev + got.njev


def test_minimize_trust_krylov_with_remote_hessp(cc):
    local = Local(ex.rosenbrock)
    rosen = remote_objective(cc.client, "rosenbrock")
    x0 = np.array([-1.2, 1.0, -0.5, 0.8])
    want = optimize.minimize(local.fun, x0, jac=local.jac, hessp=local.hessp, method="trust-krylov")
    got = optimize.minimize(rosen.fun, x0, jac=rosen.jac, hessp=rosen.hessp, method="trust-krylov")
    assert want.success and got.success
    np.testing.assert_allclose(got.x, np.ones(4), atol=1e-6)  # the Rosenbrock minimum
    np.testing.assert_allclose(got.x, want.x, rtol=1e-10, atol=1e-10)
    assert (got.nit, got.nfev, got.njev, got.nhev) == (want.nit, want.nfev, want.njev, want.nhev)
    requests = cc.take()
    assert requests == local.expected_requests()
    # one hvp per hessp call (scipy's nhev counts one more than the calls it makes here)
    assert requests.count("hvp") == sum(kind == "hessp" for kind, _ in local.calls)
    assert requests.count("jacobian+return_output") == got.nfev  # fun and jac of a point: one request


def test_minimize_fun_and_jac_is_one_request_per_point(cc):
    local = Local(ex.rosenbrock)
    rosen = remote_objective(cc.client, "rosenbrock")
    x0 = np.array([-1.2, 1.0])
    want = optimize.minimize(lambda x: (local.fun(x), local.jac(x)), x0, jac=True, method="BFGS")
    got = optimize.minimize(rosen.fun_and_jac, x0, jac=True, method="BFGS")
    np.testing.assert_allclose(got.x, want.x, rtol=1e-10, atol=1e-10)
    assert got.nfev == want.nfev
    assert cc.take() == ["jacobian+return_output"] * got.nfev


def test_root_two_joint_arm(cc):
    local = Local(ex.planar_arm)
    arm = remote_objective(cc.client, "planar_arm")
    q0 = np.array([0.3, 0.6])
    want = optimize.root(lambda q: local.fun(q) - TARGET, q0, jac=local.jac, method="hybr")
    got = optimize.root(lambda q: arm.fun(q) - TARGET, q0, jac=arm.jac, method="hybr")
    assert want.success and got.success
    np.testing.assert_allclose(ex.planar_arm(torch.from_numpy(got.x)).numpy(), TARGET, atol=1e-8)
    np.testing.assert_allclose(got.x, want.x, rtol=1e-10, atol=1e-10)
    assert (got.nfev, got.njev) == (want.nfev, want.njev)
    assert cc.take() == local.expected_requests()


def test_hessp_and_fixed_args_and_shape(cc):
    """hessp equals H @ p; other inputs held fixed; a shaped input seen as flat x."""
    x, w = np.array([0.3, -0.7, 1.1]), np.array([1.5, 0.5, -2.0])
    pair = remote_objective(cc.client, "cubic_pair", args=(w,), argnum=0)
    p = np.array([1.0, 2.0, -1.0])
    H = f.hessian(lambda a: cf.cubic_pair(a, torch.from_numpy(w))[0])(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(pair.hessp(x, p), H @ p, rtol=1e-12)
    assert cc.take() == ["hvp"]
    pair_w = remote_objective(cc.client, "cubic_pair", args=(x,), argnum=1)
    g = f.grad(lambda b: cf.cubic_pair(torch.from_numpy(x), b)[0])(torch.from_numpy(w)).numpy()
    np.testing.assert_allclose(pair_w.jac(w), g, rtol=1e-12)
    np.testing.assert_allclose(pair_w.fun(w), cf.cubic_pair(torch.from_numpy(x), torch.from_numpy(w))[0].item())
    assert cc.take() == ["jacobian+return_output"]  # fun(w) came with jac(w)
    A = np.random.default_rng(0).standard_normal((2, 3))
    norms = remote_objective(cc.client, "scaled_norm", args=(np.float64(2.0), np.int64(1)), shape=(2, 3))
    J = norms.jac(A.ravel())
    want = f.jacrev(lambda a: cf_scaled(a))(torch.from_numpy(A)).numpy().reshape(2, 6)
    np.testing.assert_allclose(J, want, rtol=1e-12)


def cf_scaled(a):
    from . import user_functions as uf

    return uf.scaled_norm(a, torch.tensor(2.0, dtype=torch.float64), torch.tensor(1))[0]


def test_returned_arrays_are_the_callers_own(cc):
    """A solver may write into what fun / jac return; that must not reach the cache."""
    arm = remote_objective(cc.client, "planar_arm")
    q = np.array([0.3, -0.2, 0.5])
    t = torch.from_numpy(q)
    want_value, want_jac = ex.planar_arm(t).numpy(), f.jacrev(ex.planar_arm)(t).numpy()
    g = arm.jac(q)
    g *= 0  # used to zero the cached Jacobian: the next jac(q) returned zeros
    v = arm.fun(q)
    v *= 0
    value, jac = arm.fun_and_jac(q)
    value *= 0
    jac *= 0
    np.testing.assert_allclose(arm.jac(q), want_jac, rtol=1e-12)
    np.testing.assert_allclose(arm.fun(q), want_value, rtol=1e-12)
    np.testing.assert_allclose(arm.fun_and_jac(q)[1], want_jac, rtol=1e-12)
    assert cc.take() == ["jacobian+return_output"]  # all from one request: the cache still works
    lazy = remote_objective(cc.client, "planar_arm", prefetch=False)
    lazy.fun(q)[:] = 0
    lazy.jac(q)[:] = 0
    np.testing.assert_allclose(lazy.fun(q), want_value, rtol=1e-12)
    np.testing.assert_allclose(lazy.jac(q), want_jac, rtol=1e-12)
    assert cc.take() == ["evaluate", "jacobian"]



@pytest.mark.parametrize(("name", "args", "what"), [
    ("dict_out", (), "a dict of 2 outputs"),
    ("polar", (np.array([0.3, 0.7]),), "a tuple of 2 outputs"),
])
@pytest.mark.parametrize("prefetch", [True, False])
def test_a_function_of_several_outputs_is_refused_clearly(cc, name, args, what, prefetch):
    """SciPy's objectives are one array or a float: a dict output failed deep in SciPy
    ("float() argument must be ... not 'dict'"), and polar's (x, y) was stacked into one
    (2, n) array that the function never returned, silently."""
    objective = remote_objective(cc.client, name, args=args, prefetch=prefetch)
    for call in (objective.fun, objective.jac, objective.fun_and_jac):
        with pytest.raises(TypeError, match=f"returns {what}; SciPy needs one array"):
            call(np.array([0.5, 1.5]))

def test_an_async_client_is_refused_up_front(url):
    """It used to be accepted, then failed in fun with "'coroutine' object is not
    subscriptable" and a never-awaited coroutine warning."""
    import jacobian_client as jc

    with pytest.raises(TypeError, match="synchronous"):
        remote_objective(jc.AsyncClient(url), "sum_sin")
    with pytest.raises(TypeError, match="pass a jacobian_client.Client"):
        remote_objective(object(), "sum_sin")


def test_the_cache_follows_the_inputs_held_fixed(cc):
    """Found by an outside tester: after `args` changed (in place, or rebound) fun and jac
    answered the old args' value from the cache, with no request and no error."""
    x, w = np.array([0.3, -0.7, 1.1]), np.array([1.5, 0.5, -2.0])
    pair = remote_objective(cc.client, "cubic_pair", args=(w,), argnum=0)

    def want(w_now):
        return cf.cubic_pair(torch.from_numpy(x), torch.from_numpy(w_now))[0].item()

    np.testing.assert_allclose(pair.fun(x), want(w))
    np.testing.assert_allclose(pair.fun(x), want(w))  # the same point and args: from the cache
    assert cc.take() == ["jacobian+return_output"]
    w += 10  # in place
    np.testing.assert_allclose(pair.fun(x), want(w))
    pair.args = (np.zeros(3),)  # rebound
    np.testing.assert_allclose(pair.fun(x), want(np.zeros(3)))
    g = f.grad(lambda a: cf.cubic_pair(a, torch.zeros(3, dtype=torch.float64))[0])(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(pair.jac(x), g, rtol=1e-12)
    assert cc.take() == ["jacobian+return_output"] * 2


def test_torch_tensors_held_fixed_are_read_as_they_are_sent(cc):
    """The cache key read a torch tensor in `args` with `.numpy()`: a bfloat16 tensor
    raised TypeError ("unsupported ScalarType BFloat16"), a lazily negated view
    (`z.conj().imag`) RuntimeError, though the client sends both."""
    x = np.array([0.3, -0.7, 1.1])
    z = torch.tensor([1 + 1.5j, 2 - 0.5j, 3 + 2.0j], dtype=torch.complex128)
    for w in (z.conj().imag, torch.tensor([1.5, 0.5, -2.0], dtype=torch.bfloat16)):
        pair = remote_objective(cc.client, "cubic_pair", args=(w,), argnum=0)
        want = cf.cubic_pair(torch.from_numpy(x), w.resolve_neg().double())[0].item()
        np.testing.assert_allclose(pair.fun(x), want, rtol=1e-12)
        np.testing.assert_allclose(pair.fun(x), want, rtol=1e-12)  # from the cache
    assert cc.take() == ["jacobian+return_output"] * 2


def test_scipys_own_args_reach_every_callable_and_hess_is_one_request(cc):
    """SciPy passes `args=` to fun, jac, hess and hessp: the objective's callables took
    `x` alone (TypeError "takes 2 positional arguments but 3 were given"), and there was
    no `hess` for trust-exact / dogleg."""
    w = np.array([1.5, 0.5, 2.0])
    x0 = np.array([0.3, -0.7, 1.1])
    pair = remote_objective(cc.client, "cubic_pair")  # its second input w comes from scipy

    def loss(x, w):
        return cf.cubic_pair(x, torch.from_numpy(w))[0]

    def lf(x, w):
        return loss(torch.from_numpy(x), w).item()

    def lj(x, w):
        return f.grad(loss)(torch.from_numpy(x), w).numpy()

    def lhp(x, p, w):
        return f.jvp(lambda t: f.grad(loss)(t, w), (torch.from_numpy(x),), (torch.from_numpy(np.asarray(p, np.float64)),))[1].numpy()

    def lh(x, w):
        return f.hessian(loss)(torch.from_numpy(x), w).numpy()

    bounds = optimize.Bounds(-2.0, 2.0)
    want = optimize.minimize(lf, x0, args=(w,), jac=lj, hessp=lhp, method="trust-constr", bounds=bounds)
    got = optimize.minimize(pair.fun, x0, args=(w,), jac=pair.jac, hessp=pair.hessp, method="trust-constr",
                            bounds=bounds)
    np.testing.assert_allclose(got.x, want.x, rtol=1e-10, atol=1e-10)
    assert (got.nfev, got.njev) == (want.nfev, want.njev)
    requests = cc.take()
    assert set(requests) == {"jacobian+return_output", "hvp"}
    np.testing.assert_allclose(pair.fun(x0, 2 * w), lf(x0, 2 * w))  # other args: not the cached value
    np.testing.assert_allclose(pair.fun_and_jac(x0, w)[1], lj(x0, w))
    assert cc.take() == ["jacobian+return_output"] * 2

    local = Local(ex.rosenbrock)
    rosen = remote_objective(cc.client, "rosenbrock")
    x0 = np.array([-1.2, 1.0, -0.5, 0.8])
    np.testing.assert_allclose(rosen.hess(x0), f.hessian(ex.rosenbrock)(torch.from_numpy(x0)).numpy(), rtol=1e-12)
    assert cc.take() == ["hessian"]
    for method in ("trust-exact", "Newton-CG"):
        want = optimize.minimize(local.fun, x0, jac=local.jac,
                                 hess=lambda x: f.hessian(ex.rosenbrock)(torch.from_numpy(x)).numpy(), method=method)
        got = optimize.minimize(rosen.fun, x0, jac=rosen.jac, hess=rosen.hess, method=method)
        np.testing.assert_allclose(got.x, want.x, rtol=1e-10, atol=1e-10)
        assert (got.nfev, got.njev, got.nhev) == (want.nfev, want.njev, want.nhev)
        assert cc.take().count("hessian") == got.nhev


def test_an_objective_pickles_with_its_client(cc):
    """Its Client held locks: an objective could not go to a process pool."""
    import pickle

    rosen = pickle.loads(pickle.dumps(remote_objective(cc.client, "rosenbrock", prefetch=False)))
    x = np.array([-1.2, 1.0])
    np.testing.assert_allclose(rosen.jac(x), f.grad(ex.rosenbrock)(torch.from_numpy(x)).numpy(), rtol=1e-12)
    rosen.client.close()


def test_a_negative_argnum_counts_from_the_end_for_the_value_too(cc):
    """argnum=-1 put x one before the last input (list.insert) while the service took the
    derivative at the last: fun and jac answered for two different functions, silently."""
    x, w = np.array([0.3, -0.7, 1.1]), np.array([1.5, 0.5, -2.0])
    last = remote_objective(cc.client, "cubic_pair", args=(x,), argnum=-1)
    by_index = remote_objective(cc.client, "cubic_pair", args=(x,), argnum=1)

    def loss(b):
        return cf.cubic_pair(torch.from_numpy(x), b)[0]

    want_value, want_grad = loss(torch.from_numpy(w)).item(), f.grad(loss)(torch.from_numpy(w)).numpy()
    for objective in (last, by_index):
        np.testing.assert_allclose(objective.fun(w), want_value, rtol=1e-12)
        np.testing.assert_allclose(objective.jac(w), want_grad, rtol=1e-12)
    import jacobian_client as jc

    with pytest.raises(jc.InvalidInput, match="argnums"):
        remote_objective(cc.client, "cubic_pair", args=(x,), argnum=-3).fun(w)


def test_a_function_that_evaluates_but_cannot_be_differentiated_still_gives_its_values(cc):
    """fun(x) prefetched the Jacobian and raised its error: a derivative-free solve
    (least_squares' finite differences, Nelder-Mead) of a function whose value works
    but whose Jacobian fails (a backward that raises, a black box through numpy)
    failed at its first point, where the same function in-process is solved."""
    import jacobian_client as jc

    from . import user_functions as uf

    local = Local(uf.fails_midway)  # the identity; its backward raises
    remote = remote_objective(cc.client, "fails_midway")
    x0 = np.array([0.1, 0.2, 0.3])
    want = optimize.least_squares(lambda x: local.fun(x) - 0.5, x0)
    got = optimize.least_squares(lambda x: remote.fun(x) - 0.5, x0)
    assert want.success and got.success
    np.testing.assert_allclose(got.x, want.x, rtol=1e-12, atol=1e-12)
    assert (got.nfev, got.njev) == (want.nfev, want.njev)
    points = [x for _, x in local.calls]
    distinct = 1 + sum(a != b for a, b in itertools.pairwise(points))
    # the first point's prefetch failed; from then on, the value alone, once per point
    assert cc.take() == ["jacobian+return_output"] + ["evaluate"] * distinct
    assert remote.prefetch is False
    with pytest.raises(jc.FunctionError, match="backward failed half-way"):  # the derivative itself
        remote.jac(got.x)
    with pytest.raises(jc.FunctionError, match="backward failed half-way"):
        remote.fun_and_jac(x0)
    # a value that fails too raises the value's own error, and the objective keeps
    # prefetching (a caller may turn such points into inf and go on)
    broken = remote_objective(cc.client, "broken")
    with pytest.raises(jc.FunctionError, match="diverged"):
        broken.fun(x0)
    assert broken.prefetch is True


def test_threads_sharing_an_objective_each_get_their_own_points_jacobian(cc):
    """One objective used from several threads (multi-start solves in a thread pool: the
    service is I/O for the caller): its one cached point was read and written in steps,
    so a thread could get another thread's Jacobian, silently. The interleaving is forced
    here: thread A is held while it reads its cache, between finding its point and
    taking the arrays, while the main thread evaluates another point."""
    import threading

    rosen = remote_objective(cc.client, "rosenbrock")
    xa, xb = np.array([-1.2, 1.0, 0.5]), np.array([0.3, -0.4, 2.0])
    key_of = rosen._key_of
    asking, held, release = threading.Event(), threading.Event(), threading.Event()

    def holding_key_of(x, args):  # the cache's key of a point: A's jac is held right after it
        key = key_of(x, args)
        if threading.get_ident() != main and asking.is_set() and not held.is_set():
            held.set()
            assert release.wait(30)
        return key

    main = threading.get_ident()
    rosen._key_of = holding_key_of
    got: dict[str, Any] = {}

    def thread_a() -> None:
        got["fun"] = rosen.fun(xa)
        asking.set()
        got["jac"] = rosen.jac(xa)

    a = threading.Thread(target=thread_a)
    a.start()
    try:
        assert held.wait(30)
        value_b = rosen.fun(xb)  # another point, while A is between finding its point and reading it
    finally:
        release.set()
        a.join(30)
    grad = f.grad(ex.rosenbrock)
    np.testing.assert_allclose(got["fun"], ex.rosenbrock(torch.from_numpy(xa)).item(), rtol=1e-12)
    np.testing.assert_allclose(got["jac"], grad(torch.from_numpy(xa)).numpy(), rtol=1e-12)
    np.testing.assert_allclose(value_b, ex.rosenbrock(torch.from_numpy(xb)).item(), rtol=1e-12)
    np.testing.assert_allclose(rosen.jac(xb), grad(torch.from_numpy(xb)).numpy(), rtol=1e-12)
    assert cc.take() == ["jacobian+return_output"] * 2  # each thread's point: one request
