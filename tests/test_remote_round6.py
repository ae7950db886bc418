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

from ._remote_support import cc, url  # noqa: E402,F401 (fixtures)

f = torch.func
X = torch.tensor([0.3, -1.2, 0.7], dtype=torch.float64)
T = torch.tensor([1.0, 0.5, -2.0], dtype=torch.float64)


def close(got, want, tol=1e-10):
    got_leaves, got_spec = torch.utils._pytree.tree_flatten(got)
    want_leaves, want_spec = torch.utils._pytree.tree_flatten(want)
    assert got_spec == want_spec, (got_spec, want_spec)
    for g, w in zip(got_leaves, want_leaves):
        g, w = torch.as_tensor(g), torch.as_tensor(w)
        assert g.shape == w.shape and g.dtype == w.dtype, (g.shape, w.shape, g.dtype, w.dtype)
        torch.testing.assert_close(g, w, rtol=tol, atol=tol)


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
