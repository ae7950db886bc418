"""Remote functions inside the caller's torch, JAX and SciPy code, round 8: pytree (dict)
parameters in the torch and JAX adapters, compared leaf by leaf with torch.func and
jax on the same function in-process.

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

from . import pytree_functions as pf  # noqa: E402
from ._remote_support import cc, url  # noqa: E402,F401 (fixtures)

f = torch.func
tree_map = torch.utils._pytree.tree_map


def same(got, want, tol=1e-10):
    """Equal trees (dicts by key, tuples and lists alike), leaf shapes and values."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and sorted(got) == sorted(want), (got, want)
        for k in want:
            same(got[k], want[k], tol)
    elif isinstance(want, (tuple, list)):
        assert isinstance(got, (tuple, list)) and len(got) == len(want), (got, want)
        for g, w in zip(got, want):
            same(g, w, tol)
    else:
        g, w = (x.detach() if isinstance(x, torch.Tensor) else torch.from_numpy(np.array(x)) for x in (got, want))
        assert g.shape == w.shape and g.dtype == w.dtype, (g.shape, w.shape, g.dtype, w.dtype)
        torch.testing.assert_close(g, w, rtol=tol, atol=tol)


def _layer_params(batch: int | None = None) -> tuple[dict, torch.Tensor]:
    g = torch.Generator().manual_seed(8)
    params = {"w": torch.randn(2, 3, generator=g, dtype=torch.float64),
              "b": torch.randn(*(() if batch is None else (batch,)), 2, generator=g, dtype=torch.float64)}
    return params, torch.randn(3, generator=g, dtype=torch.float64)


# --------------------------------------------------------------------------- pytree parameters


def test_torch_remote_takes_a_dict_of_tensors_as_a_parameter(cc):
    """``remote(client, "dense_layer")(params, x)`` with ``params`` a dict of tensors, as
    the function itself is called in-process, raised "takes one array per parameter;
    pytree parameters ... are not supported here" (round 7 left it open). Each leaf is now
    one input of the autograd Function, and the request carries the parameter nested as
    declared: backward, jacrev, jacfwd and vmap (with in_dims nested inside the dict) give
    torch.func's answers, structure included, in the same requests as for arrays."""
    layer = remote(cc.client, "dense_layer")
    params, x = _layer_params()
    mine = {k: v.clone().requires_grad_() for k, v in params.items()}
    theirs = {k: v.clone().requires_grad_() for k, v in params.items()}
    cc.take()
    y = layer(mine, x)
    (y * torch.tensor([1.0, -2.0], dtype=torch.float64)).sum().backward()
    want = ex.dense_layer(theirs, x)
    (want * torch.tensor([1.0, -2.0], dtype=torch.float64)).sum().backward()
    same((y.detach(), mine["w"].grad, mine["b"].grad), (want.detach(), theirs["w"].grad, theirs["b"].grad))
    assert cc.take() == ["evaluate", "vjp"]

    same(f.jacrev(layer, argnums=(0, 1))(params, x), f.jacrev(ex.dense_layer, argnums=(0, 1))(params, x))
    assert cc.take() == ["evaluate", "vjp+batched_vectors"]
    # forward mode in one leaf of the dict: the other leaf's tangent is zero on the wire
    same(f.jvp(lambda w: layer({"w": w, "b": params["b"]}, x), (params["w"],), (torch.ones(2, 3, dtype=torch.float64),)),
         f.jvp(lambda w: ex.dense_layer({"w": w, "b": params["b"]}, x), (params["w"],),
               (torch.ones(2, 3, dtype=torch.float64),)))
    assert cc.take() == ["evaluate", "jvp"]
    same(f.jacfwd(layer)(params, x), f.jacfwd(ex.dense_layer)(params, x))
    assert cc.take() == ["evaluate", "jvp+batched_vectors"]

    # per example: a bias per example beside one shared weight (in_dims nested in the dict)
    batched, _ = _layer_params(batch=4)
    xs = torch.linspace(-1, 1, 12, dtype=torch.float64).reshape(4, 3)
    dims = ({"w": None, "b": 0}, 0)
    same(f.vmap(layer, in_dims=dims)(batched, xs), f.vmap(ex.dense_layer, in_dims=dims)(batched, xs))
    assert cc.take() == ["evaluate+batched"]
    loss = lambda fn: lambda p, x: (fn(p, x) ** 2).sum()  # noqa: E731
    same(f.vmap(f.grad(loss(layer)), in_dims=(None, 0))(params, xs),
         f.vmap(f.grad(loss(ex.dense_layer)), in_dims=(None, 0))(params, xs))
    assert cc.take() == ["evaluate+batched", "jacobian+batched"]


def test_second_derivatives_in_a_dict_parameter_holding_a_list(cc):
    """torch.func.hessian over a dict parameter holding a list (``tree_scalar``: a 0-d and
    a vector leaf) and an array, and a double backward into the dict's leaves: the
    Hessian's blocks nest as torch's do (outputs, argnums, the dict's leaves, argnums
    again), each from the service's hvp."""
    fn = remote(cc.client, "tree_scalar")
    x = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
    params = {"w": torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64),
              "c": [torch.tensor(0.5, dtype=torch.float64), torch.tensor([1.0, 1.0, 2.0], dtype=torch.float64)]}
    cc.take()
    same(f.hessian(fn, argnums=(0, 1))(x, params), f.hessian(pf.tree_scalar, argnums=(0, 1))(x, params))
    assert cc.take() == ["evaluate", "jvp+batched_vectors", "vjp+batched_vectors", "hvp+batched_vectors"]

    def penalty(g):  # a gradient penalty: the gradient's norm, differentiated again
        p = tree_map(lambda t: t.clone().requires_grad_(), params)
        (gw, gc0, gc1) = torch.autograd.grad(g(x, p), (p["w"], *p["c"]), create_graph=True)
        ((gw ** 2).sum() + gc0 ** 2 + (gc1 ** 2).sum()).backward()
        return p["w"].grad, p["c"][0].grad, p["c"][1].grad

    same(penalty(fn), penalty(pf.tree_scalar))
    assert cc.take() == ["evaluate", "vjp", "hvp"]


def test_jax_grad_over_a_dict_parameter(url):
    """``jax.grad(loss)(params, x)`` with ``params`` a dict of arrays (what a flax or optax
    user holds) raised the adapter's TypeError; now the gradient is the dict torch.func
    computes for the same function in-process, under jit too (the second derivatives
    go through the same leaf-by-parameter translation as torch's, tested above)."""
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    from jacobian_client.jax import remote as jremote

    from ._remote_support import counted

    params, x = _layer_params()
    offset = torch.tensor([0.5, -0.5], dtype=torch.float64)
    want = f.grad(lambda p, x: ((ex.dense_layer(p, x) - offset) ** 2).sum(), argnums=(0, 1))(params, x)
    before = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        with counted(url) as cc:
            layer = jremote(cc.client, "dense_layer")
            loss = lambda p, x: jnp.sum((layer(p, x) - jnp.asarray(offset.numpy())) ** 2)  # noqa: E731
            jp, jx = tree_map(lambda t: jnp.asarray(t.numpy()), (params, x))
            same(jax.grad(loss, argnums=(0, 1))(jp, jx), want)
            assert cc.take() == ["evaluate", "vjp"]
            same(jax.jit(jax.grad(loss, argnums=(0, 1)))(jp, jx), want)
            assert cc.take() == ["evaluate", "vjp"]  # the shapes known from the call before: no probe
    finally:
        jax.config.update("jax_enable_x64", before)


# --------------------------------------------------------------------------- the async SDK


def test_an_async_client_serves_several_event_loops(url):
    """An AsyncClient used by a second ``asyncio.run`` (a script that runs one per step)
    failed with "RuntimeError: Event loop is closed": httpx pooled the first loop's
    connection and the second loop reused it; threads each running a loop of their own
    failed so too, or drove one socket from two loops. Each loop now has connections of
    its own, so every call answers, the Jacobian torch.func computes; once closed, the
    client is closed for every loop."""
    import asyncio
    import threading

    client = jc.AsyncClient(url, max_retries=0)
    x = torch.tensor([0.3, -1.2, 0.7])
    want = f.jacrev(ex.softmax)(x).numpy()

    async def jacobian(scale: float) -> np.ndarray:
        return await client.jacobian("softmax", (scale * x).numpy())

    for _ in range(2):  # one loop after another: the first loop is closed when the second asks
        np.testing.assert_allclose(asyncio.run(jacobian(1.0)), want, rtol=1e-6, atol=1e-7)

    got, errors = {}, []

    def work(i: int) -> None:
        async def both() -> list[np.ndarray]:
            return await asyncio.gather(jacobian(1.0 + i), jacobian(1.0 + i))

        try:
            got[i] = asyncio.run(both())
        except Exception as exc:  # noqa: BLE001 (reported below)
            errors.append(repr(exc))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]  # three loops at once
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for i in range(3):
        for J in got[i]:
            np.testing.assert_allclose(J, f.jacrev(ex.softmax)((1.0 + i) * x).numpy(), rtol=1e-6, atol=1e-7)

    asyncio.run(client.aclose())
    with pytest.raises(jc.JacobianServiceError, match="this client is closed"):
        asyncio.run(jacobian(1.0))


# --------------------------------------------------------------------------- a changed registry


def test_a_remote_function_after_its_server_restarted_with_a_changed_registry(cc):
    """``r8_changed(a, b)`` becomes ``r8_changed(b, a)`` returning two rows (another
    registry after a restart: here the same server's ``r8_changed_v2``, which the client
    reaches under the old name from then on). A keyword call ``fn(a=A, b=B)`` placed the
    inputs by the names asked before, by position: the service read b=A, a=B, and
    answered a wrong value (and gradient) with a 200. Keyword calls now go by name, so the
    service places them: the new function's answers, as in-process. JAX's learned output
    shape no longer matches: a ValueError saying so and what to do, never a reshaped
    answer."""
    pytest.importorskip("jax")
    from jacobian_client.jax import remote as jremote

    from . import remote8_functions as r8

    a = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    b = torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64)
    fn, jfn = remote(cc.client, "r8_changed"), jremote(cc.client, "r8_changed")
    same(fn(b=b, a=a), r8.r8_changed(a, b))
    np.testing.assert_allclose(jfn(a=a.numpy(), b=b.numpy()), r8.r8_changed(a, b).numpy())

    def restarted(request):  # the service restarted with the changed registry
        request.url = request.url.copy_with(path=request.url.path.replace("/r8_changed/", "/r8_changed_v2/"))

    cc.client._http.event_hooks["request"].insert(0, restarted)
    cc.take()
    same(fn(b=b, a=a), r8.r8_changed_v2(a=a, b=b))
    same(f.grad(lambda a: fn(a=a, b=b)[0].sum())(a), f.grad(lambda a: r8.r8_changed_v2(a=a, b=b)[0].sum())(a))
    same(fn(b, a), r8.r8_changed_v2(b, a))  # by position: the new order, as in-process
    assert cc.take() == ["evaluate", "evaluate", "vjp", "evaluate"]  # the names are not asked again
    with pytest.raises(ValueError, match=r"returned output 0 of shape \[2, 3\], expected \[3\].*changed on the "
                                         r"service \(a restart with another registry\), make the remote function"):
        jfn(a=a.numpy(), b=b.numpy())
    np.testing.assert_allclose(jremote(cc.client, "r8_changed")(a=a.numpy(), b=b.numpy()),
                               r8.r8_changed_v2(a=a, b=b).numpy())


# --------------------------------------------------------------------------- a client's timeout


def test_a_client_timeout_inside_an_adapter_frees_the_engine(url):
    """``jacrev`` of a remote function whose VJPs torch's vmap cannot batch (``r8_slow_pull``:
    20 ms each) is one vjp request of n cotangents, which the engine runs one at a time.
    With the SDK's ``timeout`` past, the client left (the front end logs 499 and cancels
    the job), but the engine ran the loop to its end for nobody: the next request, anyone's,
    waited those seconds (4 s for 200 cotangents). The loop now looks for the cancel before
    each product, as a Jacobian's row chunks do, and the engine is free at once."""
    import time

    x = torch.linspace(0.0, 1.0, 400, dtype=torch.float64)  # 8 s of VJPs, one at a time
    with jc.Client(url, timeout=1.0, max_retries=0) as hasty:
        pull = remote(hasty, "r8_slow_pull")
        # the server's 504 at the deadline the SDK sends (round 9), or on a loaded box the client's own clock
        with pytest.raises((jc.Timeout, jc.TransportError), match=r"504 timeout|r8_slow_pull/vjp: ReadTimeout"):
            f.jacrev(pull)(x)
    with jc.Client(url, timeout=30) as other:
        started = time.monotonic()
        np.testing.assert_allclose(other.evaluate("sin", np.array([0.1, 0.2])), np.sin([0.1, 0.2]), rtol=1e-6)
        assert time.monotonic() - started < 4.0  # the 7 s of the cancelled loop are not waited for


# --------------------------------------------------------------------------- torch, as users write it


def test_torch_idioms_around_a_remote_call(cc):
    """What a torch user wraps a model in, each compared with the arm run in-process:
    functional_call of a module whose forward calls the remote function on its parameter,
    a parametrization of that parameter, a distribution's log_prob of its output, forward
    AD's dual tensors; and under no_grad / inference_mode, one evaluate and no request for
    derivatives."""
    import torch.autograd.forward_ad as fwAD
    from torch.nn.utils import parametrize

    arm = remote(cc.client, "planar_arm")
    target = torch.tensor([1.0, 2.0], dtype=torch.float64)

    class Reach(torch.nn.Module):
        def __init__(self, fn):
            super().__init__()
            self.q = torch.nn.Parameter(torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64))
            self.fn = fn

        def forward(self, scale):
            return torch.distributions.Normal(self.fn(self.q), scale).log_prob(target).sum()

    mine, theirs = Reach(arm), Reach(ex.planar_arm)
    params = {k: v.detach() for k, v in mine.named_parameters()}
    scale = torch.tensor(0.5, dtype=torch.float64)
    cc.take()
    same(f.grad(lambda p: f.functional_call(mine, p, (scale,)))(params),
         f.grad(lambda p: f.functional_call(theirs, p, (scale,)))(params))
    assert cc.take() == ["evaluate", "vjp"]

    for m in (mine, theirs):
        parametrize.register_parametrization(m, "q", torch.nn.Tanh())
        m(scale).backward()
    same(mine.parametrizations.q.original.grad, theirs.parametrizations.q.original.grad)
    assert cc.take() == ["evaluate", "vjp"]

    q, t = params["q"], torch.tensor([1.0, 0.5, -2.0], dtype=torch.float64)
    with fwAD.dual_level():
        got = fwAD.unpack_dual(arm(fwAD.make_dual(q, t))).tangent
        want = fwAD.unpack_dual(ex.planar_arm(fwAD.make_dual(q, t))).tangent
    same(got, want)
    assert cc.take() == ["evaluate", "jvp"]

    leaf = q.clone().requires_grad_()
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            y = arm(leaf)
        assert not y.requires_grad and y.grad_fn is None
        same(y, ex.planar_arm(q))
    assert cc.take() == ["evaluate", "evaluate"]
