"""Remote functions and the SDK in real programs, round 19: the SDK's retries of answers
the server paces with ``Retry-After`` (bounded by time, past the count of retries the
client decides on), JAX's ``vmap(hessian)`` outside ``jit`` (one batched Jacobian for
jacfwd's and jacrev's products), and programs as users write them: ``jax.grad`` through
a ``lax.scan`` of remote calls, ``jax.jit`` with static arguments and donated buffers,
SciPy's minimizers and ``least_squares`` (a Jacobian from the adapter, or SciPy's finite
differences over a ``jac_sparsity``); each compared with the same computation
in-process, request by request.

One server: the session's ``jacobian-service serve`` subprocess (``url``), shared with
the other adapter test files; the retry cases put a scripted refusal in front of it
(``httpx.MockTransport``), the answer that ends them the server's own.
"""

from __future__ import annotations

import time
from typing import Any

import httpx
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("jacobian_service.app")

import jacobian_client as jc  # noqa: E402
from jacobian_client import wire  # noqa: E402
from jacobian_client._protocol import RetryPolicy  # noqa: E402
from jacobian_service import examples as ex  # noqa: E402

from ._remote_support import cc, jx, url  # noqa: E402,F401 (fixtures)

X = np.array([0.3, -1.2, 0.7])

# --------------------------------------------------------------------------- retries


class Refusing:
    """An httpx transport's handler: the first ``refusals`` requests answered as the
    service refuses one past a client's share of streams (429 ``overloaded`` with
    ``Retry-After``), the rest forwarded to the real server. Records when each came."""

    def __init__(self, server: str, refusals: int, retry_after: str | None = "0.05", status: int = 429) -> None:
        self.url, self.refusals, self.retry_after, self.status = server, refusals, retry_after, status
        self.times: list[float] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.times.append(time.monotonic())
        if len(self.times) <= self.refusals:
            code = "overloaded" if self.status == 429 else "unavailable"
            problem = {"type": f"urn:jacobian-service:problem:{code}", "title": code, "status": self.status,
                       "code": code, "detail": "this client holds its share of streams", "request_id": "r"}
            headers = {"content-type": wire.PROBLEM}
            if self.retry_after is not None:
                headers["retry-after"] = self.retry_after
            return httpx.Response(self.status, content=wire.dumps(problem), headers=headers)
        headers = {k: v for k, v in request.headers.items() if k not in ("host", "accept-encoding", "content-length")}
        real = httpx.request(request.method, self.url + request.url.raw_path.decode(), headers=headers,
                             content=request.content, timeout=30)
        return httpx.Response(real.status_code, content=real.content,
                              headers={k: v for k, v in real.headers.items() if k != "content-encoding"})

    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.times, self.times[1:])]


# short backoffs: the waits are the server's Retry-After (0.05 s) in these cases
QUICK = {"backoff_base": 0.01, "backoff_max": 0.04}


def test_answers_the_server_paces_are_retried_past_the_count_within_the_retry_time(url):
    """One client's concurrent streamed Jacobians past its share of streams are refused
    429 ``Retry-After: 1`` until its first ones are sent; 40 of 11.5 MB each took 15 s,
    and the default three retries were spent in 4 s: ``Overloaded`` for calls the server
    would have answered a few seconds on. A refusal with ``Retry-After`` (the server up,
    saying when to come back) is now retried until ``max_retry_time`` is spent, each
    wait at least the Retry-After; ``max_retries`` bounds the retries the client decides
    on alone, and 0 retries nothing. Sync and async alike."""
    want = torch.func.jacrev(ex.softmax)(torch.tensor(X)).numpy()
    refusing = Refusing(url, refusals=4)
    with jc.Client("http://sdk.test", http_transport=httpx.MockTransport(refusing), retry=RetryPolicy(**QUICK)) as c:
        np.testing.assert_allclose(c.jacobian("softmax", X), want, rtol=1e-12, atol=1e-12)
    assert len(refusing.times) == 5 and min(refusing.gaps()) >= 0.05, refusing.gaps()

    async def async_call(handler: Refusing, policy: RetryPolicy) -> Any:
        async with jc.AsyncClient("http://sdk.test", http_transport=httpx.MockTransport(handler), retry=policy) as c:
            return await c.jacobian("softmax", X)

    import anyio

    refusing = Refusing(url, refusals=4)
    got = anyio.run(async_call, refusing, RetryPolicy(**QUICK))
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    assert len(refusing.times) == 5 and min(refusing.gaps()) >= 0.05, refusing.gaps()

    # bounded by time: refused for ever, the last refusal is raised within max_retry_time
    refusing = Refusing(url, refusals=10**6)
    started = time.monotonic()
    with jc.Client("http://sdk.test", http_transport=httpx.MockTransport(refusing),
                   retry=RetryPolicy(max_retry_time=0.5, **QUICK)) as c, pytest.raises(jc.Overloaded) as info:
        c.jacobian("softmax", X)
    assert time.monotonic() - started < 0.5 + 0.3 and len(refusing.times) > 4 and info.value.retry_after == 0.05

    # without a Retry-After the count bounds them (a 503 of a proxy, say), and 0 is none
    refusing = Refusing(url, refusals=10**6, retry_after=None, status=503)
    with jc.Client("http://sdk.test", http_transport=httpx.MockTransport(refusing),
                   retry=RetryPolicy(max_retries=2, **QUICK)) as c, pytest.raises(jc.Unavailable):
        c.jacobian("softmax", X)
    assert len(refusing.times) == 3
    refusing = Refusing(url, refusals=10**6)
    with jc.Client("http://sdk.test", http_transport=httpx.MockTransport(refusing), max_retries=0) as c, \
            pytest.raises(jc.Overloaded):
        c.jacobian("softmax", X)
    assert len(refusing.times) == 1


def test_past_the_count_a_server_asking_for_tiny_waits_is_not_asked_again_at_once():
    """Past ``max_retries`` a server answering ``Retry-After: 0.001`` to every try is asked
    again after at least half the backoff's cap, not in a tight loop until the retry time
    is spent: the retries stay few (a bounded number, as SPEC.md says). ``Retry-After: 0``
    asks for no wait: the count holds, as without one."""
    policy = RetryPolicy(max_retries=3, backoff_base=0.25, backoff_max=8.0, max_retry_time=60.0)
    waits, elapsed, attempt = [], 0.0, 0
    while (delay := policy.delay(attempt, elapsed, retry_after=0.001)) is not None:
        waits.append(delay)
        elapsed += delay
        attempt += 1
    assert all(w >= min(8.0, 0.25 * 2**a) / 2 for a, w in enumerate(waits) if a >= 3), waits
    assert 3 < len(waits) <= 3 + 4 + 60 // 4 and elapsed <= 60.0
    assert policy.delay(3, 0.0) is None and policy.delay(3, 0.0, retry_after=0.0) is None
    assert policy.delay(2, 0.0, retry_after=0.0) is not None


# --------------------------------------------------------------------------- JAX


def _torch(transform: Any, at: Any) -> np.ndarray:
    """planar_arm's ``transform`` in-process, by torch.func, at a JAX array."""
    return transform(ex.planar_arm)(torch.tensor(np.asarray(at))).numpy()


def test_jax_vmap_hessian_outside_jit_asks_one_batched_jacobian(cc, jx):
    """Outside ``jit``, ``vmap(hessian(f))`` binds jacfwd's jvp of the forward and jacrev's
    vjp at the same inputs, one after the other, and each asked the service for the same
    batched Jacobian: 1 evaluate + 2 jacobian + 1 hessian. The second product now takes
    the first one's (as torch's adapter shares it within a call): one jacobian. Nothing
    is kept past the next request: a later call, at the same inputs or others, asks
    again, and under ``jit`` (where XLA drops the products the Hessian does not use)
    nothing is kept at all."""
    jax = jx
    from jacobian_client.jax import remote

    arm = remote(cc.client, "planar_arm")
    xs = jax.numpy.array([[0.3, -1.2, 0.7], [0.1, 0.5, -0.4]])
    arm(xs[0])  # the signature learned first: each call below asks what its transform needs
    cc.take()
    vmap, func = torch.func.vmap, torch.func
    for at in (xs, xs + 0.5):
        got = jax.vmap(jax.hessian(arm))(at)
        np.testing.assert_allclose(got, _torch(lambda f: vmap(func.hessian(f)), at), rtol=1e-12, atol=1e-12)
        assert cc.take() == ["evaluate+batched", "jacobian+batched", "hessian+batched"]
    for _ in range(2):
        got = jax.vmap(jax.jacrev(arm))(xs)
        np.testing.assert_allclose(got, _torch(lambda f: vmap(func.jacrev(f)), xs), rtol=1e-12, atol=1e-12)
        assert cc.take() == ["evaluate+batched", "jacobian+batched"]
    jitted = jax.jit(jax.vmap(jax.jacrev(arm)))
    for _ in range(2):
        np.testing.assert_allclose(jitted(xs), _torch(lambda f: vmap(func.jacrev(f)), xs), rtol=1e-12, atol=1e-12)
        assert cc.take() == ["jacobian+batched"]


# --------------------------------------------------------------------------- SciPy


def test_scipy_solvers_on_remote_functions_take_the_local_path_one_request_per_point(cc):
    """``minimize(method="BFGS", jac=obj.jac)`` on the remote Rosenbrock takes the path
    the in-process function takes (the same iterates, iterations and evaluations), one
    ``jacobian`` with its output per evaluated point; ``least_squares`` with SciPy's own
    finite differences over a ``jac_sparsity`` (the remote value alone) solves as
    in-process, one request per value SciPy asks for."""
    optimize = pytest.importorskip("scipy.optimize")
    from jacobian_client.scipy import remote_objective

    def local(fn: Any) -> tuple[Any, Any]:
        return (lambda x: fn(torch.tensor(x)).numpy()), (lambda x: torch.func.jacrev(fn)(torch.tensor(x)).numpy())

    rosen = remote_objective(cc.client, "rosenbrock")
    x0 = np.array([-1.2, 1.0, -0.5, 0.8])
    got = optimize.minimize(rosen.fun, x0, jac=rosen.jac, method="BFGS")
    fun, jac = local(ex.rosenbrock)
    want = optimize.minimize(fun, x0, jac=jac, method="BFGS")
    np.testing.assert_allclose(got.x, want.x, rtol=1e-12, atol=1e-12)
    assert (got.nit, got.nfev, got.njev) == (want.nit, want.nfev, want.njev)
    assert cc.take() == ["jacobian+return_output"] * got.nfev

    n = 16
    fun, jac = local(ex.lorenz96)
    pattern = (jac(np.linspace(0.5, 1.5, n)) != 0).astype(int)  # a band: 4 groups of columns
    target, y0 = np.sin(np.arange(n)), np.full(n, 0.1)
    l96 = remote_objective(cc.client, "lorenz96")
    calls = []

    def residual(x):
        calls.append(1)
        return l96.fun(x) - target

    got = optimize.least_squares(residual, y0, jac_sparsity=pattern)
    want = optimize.least_squares(lambda x: fun(x) - target, y0, jac_sparsity=pattern)
    np.testing.assert_allclose(got.x, want.x, rtol=1e-10, atol=1e-12)
    assert got.nfev == want.nfev and len(cc.take()) == len(calls)
