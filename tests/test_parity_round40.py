"""Round 40: lazy modules over HTTP (tests/parity40_functions.py), on one real server.

A ``torch.nn.LazyLinear`` (``LazyConv1d``, ``LazyBatchNorm1d``) materialises its
parameters, and becomes a ``Linear``, at its first call. That call inside a ``torch.func``
transform sets a Parameter's ``.data`` to a tensor of the transform's level: SIGSEGV
(pytorch/pytorch#184876; in-process ``jacrev`` over a fresh LazyLinear crashes as well,
or where it survives raises, then an INTERNAL ASSERT at every later call). The engine's
warm-up Jacobian was that call: the engine died, was restarted with the warm-up skipped,
and the first request crashed it again. Now the engine runs such a function once
outside any transform first (the dry run lazy modules ask for), and a put-back of state
never rebuilds a module whose class its first call changed.

Answers are compared with in-process torch.func over modules holding the weights the
server's dry run drew (read back through ``params_of``).
"""

from __future__ import annotations

import httpx
import numpy as np
import pytest
import torch

from ._fault_support import restarts
from .conftest import live_server
from .test_parity_round7 import answer, post, wire_tree

f = torch.func
RNG = np.random.default_rng(40)
X3, V3, X15, X43 = RNG.standard_normal(3), RNG.standard_normal(3), RNG.standard_normal((1, 5)), RNG.standard_normal((4, 3))
T = lambda a: torch.from_numpy(np.array(a, copy=True))  # noqa: E731


@pytest.fixture(scope="module")
def c():
    with live_server(functions="tests.parity40_functions", workers=1) as (url, proc):
        with httpx.Client(base_url=url, timeout=120) as client:
            client.proc = proc
            client.url = url
            yield client


def modules(c):
    """nn modules holding the server's materialised weights, its count, and
    COUNTED's in_features."""
    p = torch.from_numpy(answer(post(c, "params_of", "evaluate", [np.array(0.0)]), "output")[0])
    lin, conv, counted = torch.nn.Linear(3, 2).double(), torch.nn.Conv1d(1, 2, 2).double(), torch.nn.Linear(3, 2).double()
    i = 0
    with torch.no_grad():
        for m in (lin, conv, counted):
            for q in m.parameters():
                q.copy_(p[i:i + q.numel()].reshape(q.shape))
                i += q.numel()
    return lin, conv, counted, (float(p[i]), float(p[i + 1]))


def test_lazy_modules_answer_torch_funcs_values_and_no_engine_dies(c):
    # (the warm-ups ran each function's dry run, then its Jacobian: before, SIGSEGV)
    got = {route: answer(post(c, "lazy_lin", route, [X3], **kw), key)[0]
           for route, key, kw in [("jacobian", "jacobian", {}), ("jacobian", "jacobian", {"mode": "fwd"}),
                                  ("jvp", "jvp", {"tangents": wire_tree(V3)})]}
    lin, conv, _, _ = modules(c)
    net = lambda x: (torch.tanh(lin(x)) ** 2).sum()  # noqa: E731
    want_j = f.jacrev(lin)(T(X3)).detach().numpy()
    np.testing.assert_allclose(got["jacobian"], want_j, rtol=1e-12)
    np.testing.assert_allclose(got["jvp"], f.jvp(lin, (T(X3),), (T(V3),))[1].detach().numpy(), rtol=1e-12)
    h, _ = answer(post(c, "lazy_net", "hessian", [X3]), "hessian")
    np.testing.assert_allclose(h, f.hessian(net)(T(X3)).detach().numpy(), rtol=1e-10, atol=1e-12)
    xs = np.stack([X3, V3])
    hb, _ = answer(post(c, "lazy_net", "hessian", [xs], batched=True), "hessian")
    np.testing.assert_allclose(hb, f.vmap(f.hessian(net))(T(xs)).detach().numpy(), rtol=1e-10, atol=1e-12)
    jc, _ = answer(post(c, "lazy_conv", "jacobian", [X15]), "jacobian")
    np.testing.assert_allclose(jc, f.jacrev(lambda x: conv(x).sin())(T(X15)).detach().numpy(), rtol=1e-12)
    bn = torch.nn.BatchNorm1d(3).double().eval()
    jb, _ = answer(post(c, "lazy_bn", "jacobian", [X43]), "jacobian")
    np.testing.assert_allclose(jb, f.jacrev(lambda x: bn(x) ** 2)(T(X43)).detach().numpy(), rtol=1e-12)
    # a Parameter's .data replaced at the first call (set up on first use): that call
    # inside a transform was SIGSEGV as well
    h, _ = answer(post(c, "replaced_at_first_call", "hessian", [X3]), "hessian")
    np.testing.assert_array_equal(h, np.diag([2.0, 4.0, 6.0]))
    assert restarts(c.url) == 0
    assert "died" not in c.proc.read_log()


def test_a_counter_beside_a_lazy_module_is_put_back_and_the_module_kept(c):
    """The dry run's and the warm-up's steps of the counter are put back (the first
    request is torch.func's first call: count 1), the module they materialised is kept:
    before, the put-back restored its ``__dict__`` (the lazy hook, ``in_features = 0``)
    under its new class Linear."""
    _, _, counted, (count, in_features) = modules(c)
    assert (count, in_features) == (0, 3)  # (before: in_features put back to 0, a Linear's)
    for n in (1, 2):
        got, _ = answer(post(c, "lazy_counted", "hessian" if n == 2 else "jacobian", [X3]),
                        "hessian" if n == 2 else "jacobian")
        _, _, counted, (count, in_features) = modules(c)
        assert (count, in_features) == (n, 3)
        if n == 1:
            np.testing.assert_allclose(got, f.jacrev(counted)(T(X3)).detach().numpy(), rtol=1e-12)
        else:
            np.testing.assert_array_equal(got, np.zeros((2, 3, 3)))


def test_a_lazy_module_a_first_request_materialises(c):
    """lazy_late's warm-up failed before its module ran: its first request (batched,
    vmap's call) materialises it, outside vmap, then as torch.func answers."""
    xs = RNG.standard_normal((2, 4))
    jb, _ = answer(post(c, "lazy_late", "jacobian", [xs], batched=True), "jacobian")
    j, doc = answer(post(c, "lazy_late", "jacobian", [xs[0]], return_output=True), "jacobian")
    np.testing.assert_array_equal(jb[0], j)
    np.testing.assert_array_equal(jb[1], j)  # (a linear map: W for each example)
    # a second module over the weights the server drew: its outputs are torch's too
    late = torch.nn.Linear(4, 2).double()
    with torch.no_grad():
        late.weight.copy_(T(j))
        late.bias.copy_(T(wire_decode(doc["output"]) - j @ xs[0]))
    x2 = RNG.standard_normal(4)
    out, _ = answer(post(c, "lazy_late", "evaluate", [x2]), "output")
    np.testing.assert_allclose(out, late(T(x2)).detach().numpy(), rtol=1e-12)
    assert restarts(c.url) == 0


def wire_decode(tree):
    from jacobian_client import wire

    return wire.decode_tree(tree)
