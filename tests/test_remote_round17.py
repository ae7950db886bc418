"""Remote functions inside the caller's torch code, round 17: a module that keeps its
weights in torch's parameter containers (``nn.ParameterDict``, ``nn.ParameterList``) or
a caller holding a parameter in another mapping (``types.MappingProxyType``); each case
compared with the same computation in-process.

One server: the session's ``jacobian-service serve`` subprocess (``cc``), shared with the
other adapter test files.
"""

from __future__ import annotations

import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("jacobian_service.app")

from jacobian_client.torch import remote  # noqa: E402
from jacobian_service import examples as ex  # noqa: E402

from . import pytree_functions as pf  # noqa: E402
from ._remote_support import cc, url  # noqa: E402,F401 (fixtures)

D = torch.float64


class Layer(torch.nn.Module):
    """A layer keeping its weights in a ParameterDict, as modules do; ``fn`` computes it
    (the service's ``dense_layer`` through the adapter, or the same function in-process)."""

    def __init__(self, fn) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(17)
        self.fn = fn
        self.p = torch.nn.ParameterDict({"w": torch.nn.Parameter(torch.randn(3, 2, generator=gen, dtype=D)),
                                         "b": torch.nn.Parameter(torch.randn(3, generator=gen, dtype=D))})

    def forward(self, x):
        return self.fn(self.p, x)


def test_a_modules_parameter_containers_are_pytree_parameters(cc):
    """A ParameterDict (a Module, not a dict) and a ParameterList are taken as the dict
    and the list they stand for, as the function in-process takes them: the forward and
    a backward filling each Parameter's ``.grad`` match in-process, in one evaluate and
    one vjp. Before, ``isinstance(x, dict)`` alone made a tree: the ParameterDict was
    refused as an array (TypeError "cannot send a ParameterDict as an input"), though
    the same module in-process trains."""
    x = torch.tensor([0.4, -1.3], dtype=D)
    remote_layer, local_layer = Layer(remote(cc.client, "dense_layer")), Layer(ex.dense_layer)
    outs = []
    for layer in (remote_layer, local_layer):
        y = layer(x)
        (y ** 2).sum().backward()
        outs.append(y.detach())
    assert cc.take() == ["evaluate", "vjp"]
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-12, atol=1e-12)
    for key in ("w", "b"):
        torch.testing.assert_close(remote_layer.p[key].grad, local_layer.p[key].grad, rtol=1e-12, atol=1e-12)

    # a ParameterList inside a dict parameter: tree_scalar's "c" is [a 0-d leaf, a vector]
    def params():
        return {"w": torch.nn.Parameter(torch.tensor([0.5, 1.5, -0.5], dtype=D)),
                "c": torch.nn.ParameterList([torch.tensor(0.7, dtype=D), torch.tensor([0.1, 0.2, 0.3], dtype=D)])}

    xs = torch.tensor([0.3, -0.6, 0.9], dtype=D)
    got, want = params(), params()
    remote(cc.client, "tree_scalar")(xs, got).backward()
    pf.tree_scalar(xs, want).backward()
    assert cc.take() == ["evaluate", "vjp"]
    for g, w in zip([got["w"], *got["c"]], [want["w"], *want["c"]]):
        torch.testing.assert_close(g.grad, w.grad, rtol=1e-12, atol=1e-12)


def test_any_mapping_is_a_dict_parameter_to_the_client_and_the_adapters(cc):
    """A read-only mapping (``types.MappingProxyType``: a Mapping, not a dict) holding a
    parameter answers as the dict does, through the client and the torch adapter."""
    w = np.array([[0.2, -0.1], [0.3, 0.5], [-0.7, 0.4]])
    b = np.array([0.1, -0.2, 0.3])
    x = np.array([0.4, -1.3])
    want = ex.dense_layer({"w": torch.tensor(w), "b": torch.tensor(b)}, torch.tensor(x)).numpy()
    got = cc.client.evaluate("dense_layer", types.MappingProxyType({"w": w, "b": b}), x)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    mapped = types.MappingProxyType({"w": torch.tensor(w), "b": torch.tensor(b)})
    torch.testing.assert_close(remote(cc.client, "dense_layer")(mapped, torch.tensor(x)), torch.tensor(want),
                               rtol=1e-12, atol=1e-12)
    assert cc.take() == ["evaluate", "evaluate"]


# --------------------------------------------------------------------------- scipy: held inputs


def _tree_scalar_local(x, w, c0, c1):
    """tree_scalar's value and gradient in x, in-process."""
    t = lambda v: torch.tensor(v, dtype=D)  # noqa: E731
    xt = t(x).requires_grad_()
    value = pf.tree_scalar(xt, {"w": t(w), "c": [t(c0), t(c1)]})
    value.backward()
    return value.item(), xt.grad.numpy()


def test_scipy_holds_a_tuple_or_mapping_parameter_fixed_and_sees_it_change(cc):
    """An objective's ``args`` holding a pytree parameter with a tuple inside it, or held
    in a mapping that is not a dict, is keyed by its leaves as they are sent. The tuple was
    one leaf to the cache's key: ``np.asarray`` of ``(0.7, c1)``, a ValueError before any
    request; the mapping was keyed by its ``repr``, which numpy shortens past 1000
    elements, so an element changed in place in the middle of a large leaf between two
    calls at the same ``x`` answered the old value from the cache, silently."""
    from jacobian_client.scipy import remote_objective

    n = 1200
    x = np.linspace(-1.0, 1.0, n)
    w, c1 = np.linspace(0.5, 1.5, n), np.linspace(0.1, 0.3, n)
    c0 = np.array(0.7)  # float64, as the rest (a Python 0.7 takes the declared float32)
    tupled = remote_objective(cc.client, "tree_scalar", args=({"w": w, "c": (c0, c1)},))
    want_value, want_grad = _tree_scalar_local(x, w, 0.7, c1)
    np.testing.assert_allclose(tupled.fun(x), want_value, rtol=1e-12)
    np.testing.assert_allclose(tupled.jac(x), want_grad, rtol=1e-12, atol=1e-12)
    assert cc.take() == ["jacobian+return_output"]  # jac(x) at the same x: from the cache

    c1 = c1.copy()
    mapped = remote_objective(cc.client, "tree_scalar", args=(types.MappingProxyType({"w": w, "c": [c0, c1]}),))
    np.testing.assert_allclose(mapped.fun(x), want_value, rtol=1e-12)
    c1[n // 2] += 3.0  # in place: the same mapping, the same x
    np.testing.assert_allclose(mapped.fun(x), _tree_scalar_local(x, w, 0.7, c1)[0], rtol=1e-12)
    assert cc.take() == ["jacobian+return_output"] * 2
