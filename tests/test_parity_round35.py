"""PyTorch's own torch.func test cases, round 35 (test_eager_transforms.py's TestHessian,
TestJac through ``mode=fwd``, TestLinearize, TestHigherOrder / TestComposability with
transforms inside the function, TestFunctionalize, has_aux as grad_and_value, hvp and
hessian over argnums tuples of pytrees; outputs that are the input, views of it, the same
tensor twice, empty, boolean), replayed over HTTP against tests/parity35_functions.py
and compared with in-process torch.func.

1. Per-example Hessians (``vmap(hessian(f))``, ``batched: true``) of a function whose
   output or input has no elements (``x[:0]``; ``x`` of shape ``(2, 0)``): reverse over
   reverse's outer chunking divided the memory budget by the bytes per row, 0 there, a
   500 ``internal_error`` (ZeroDivisionError, a traceback in the log) where torch
   answers the empty Hessian. Nothing to chunk: it is answered.
2. A batch of no examples (``(0, n)``) with ``chunk_size: 1``: torch's
   ``jacrev(chunk_size=1)`` asserts on an output of no elements, which the engine avoids
   by the first example's output; with no example to look at it ran chunk 1, and the
   request was a 422 "cannot be batched with vmap (AssertionError)" where the same
   request without ``chunk_size`` answers. The chunk cannot matter there: unchunked.
3. Guards (no fix needed; of about 1,300 replayed cases the rest agreed): the identity, its views
   (transposed, strided, expanded, one element), the same tensor twice in a tuple, the
   input beside its own view, an in-place write through a view of a clone, functions
   that run torch.func inside (grad, jacrev, jvp, vmap, functionalize, hessian,
   grad_and_value), grad_and_value-like has_aux, and hvp / hessian / jvp over
   argnums tuples of a pytree parameter through the SDK, on every route.

One in-process app serves the module (no server start), as rounds 7-34.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from jacobian_client import wire

from . import parity35_functions as F
from .conftest import ready_app, sdk_over
from .test_parity_round7 import post, same, t, wire_tree

f = torch.func
tree_map = torch.utils._pytree.tree_map
RNG = np.random.default_rng(35)
X = RNG.standard_normal(4)
V = RNG.standard_normal(4)
XS = RNG.standard_normal((2, 4))


@pytest.fixture(scope="module")
def c() -> Iterator[Any]:
    with ready_app("tests.parity35_functions") as client:
        yield client


def answer(response: Any, key: str) -> Any:
    assert response.status_code == 200, response.text
    return wire.decode_tree(response.json()[key])


# --- 1. per-example Hessians of empty outputs / inputs ---


@pytest.mark.parametrize(
    "name, xs",
    [("empty_out", XS), ("empty_and_sin", np.zeros((2, 0))), ("sum_sq", np.zeros((2, 0))), ("ident", np.zeros((2, 0)))],
)
@pytest.mark.parametrize("chunk_size", [None, 1])
def test_per_example_hessian_of_an_empty_output_or_input_is_torchs(c, name, xs, chunk_size):
    want = f.vmap(f.hessian(getattr(F, name)))(t(xs))
    got = answer(post(c, name, "hessian", [xs], batched=True, chunk_size=chunk_size), "hessian")
    same(got, want)  # was: 500 internal_error (ZeroDivisionError)


def test_per_example_hessian_of_an_empty_output_as_npy(c):
    buf = io.BytesIO()
    np.save(buf, XS)
    r = c.post("/v1/functions/empty_out/hessian?batched=true", content=buf.getvalue(),
               headers={"content-type": "application/x-npy", "accept": "application/x-npy"})
    assert r.status_code == 200, r.text
    same(np.load(io.BytesIO(r.content)), f.vmap(f.hessian(F.empty_out))(t(XS)))


# --- 2. a batch of no examples with chunk_size 1 ---


@pytest.mark.parametrize("name", ["empty_out", "same_twice"])
def test_a_batch_of_no_examples_answers_whatever_the_chunk_size(c, name):
    xs = np.zeros((0, 3))
    want = f.vmap(f.jacrev(getattr(F, name)))(t(xs))
    for chunk_size in (None, 1, 2):
        same(answer(post(c, name, "jacobian", [xs], batched=True, chunk_size=chunk_size), "jacobian"), want)


# --- 3. guards ---

ALIASING = ["same_twice", "input_twice", "ident", "transpose_view", "expand_view", "strided_view", "first_elem",
            "x_and_view", "inplace_view", "empty_and_sin"]
INNER = ["inner_grad", "inner_jacrev", "inner_jvp", "inner_vmap", "inner_functionalize", "inner_hessian_sum"]


def point(name: str) -> np.ndarray:
    return RNG.standard_normal((2, 3)) if name == "transpose_view" else X


@pytest.mark.parametrize("name", ALIASING + INNER)
def test_every_route_of_outputs_that_alias_the_input_or_run_torch_func_inside(c, name):
    fn, x = getattr(F, name), point(name)
    tx = t(x)
    v = RNG.standard_normal(x.shape)
    for mode, chunk_size in (("rev", None), ("rev", 1), ("fwd", None)):
        got = answer(post(c, name, "jacobian", [x], mode=mode, chunk_size=chunk_size), "jacobian")
        same(got, f.jacrev(fn)(tx))
    same(answer(post(c, name, "hessian", [x]), "hessian"), f.hessian(fn)(tx))
    out = fn(tx)
    ct = tree_map(lambda o: torch.from_numpy(RNG.standard_normal(tuple(o.shape))), out)
    cw = tree_map(lambda o: o.numpy(), ct)
    same(answer(post(c, name, "vjp", [x], cotangents=wire_tree(cw)), "vjp"), f.vjp(fn, tx)[1](ct)[0])
    same(answer(post(c, name, "jvp", [x], tangents=wire_tree(v)), "jvp"), f.jvp(fn, (tx,), (t(v),))[1])
    hvp = f.jvp(lambda y: f.vjp(fn, y)[1](ct)[0], (tx,), (t(v),))[1]
    same(answer(post(c, name, "hvp", [x], tangents=wire_tree(v), cotangents=wire_tree(cw)), "hvp"), hvp)
    xs = RNG.standard_normal((2,) + x.shape)
    same(answer(post(c, name, "jacobian", [xs], batched=True), "jacobian"), f.vmap(f.jacrev(fn))(t(xs)))


@pytest.mark.parametrize("name", ["value_aux", "aux_is_input", "aux_int", "inner_grad_and_value"])
def test_has_aux_as_grad_and_value(c, name):
    fn = getattr(F, name)
    tx = t(X)
    for endpoint, want, options in (
        ("jacobian", f.jacrev(fn, has_aux=True)(tx), {"return_output": True}),
        ("jacobian", f.jacfwd(fn, has_aux=True)(tx), {"return_output": True, "mode": "fwd"}),
        ("jvp", f.jvp(fn, (tx,), (t(V),), has_aux=True)[1:], {"tangents": wire_tree(V), "return_output": True}),
    ):
        r = post(c, name, endpoint, [X], **options)
        doc = r.json()
        assert r.status_code == 200, r.text
        same((wire.decode_tree(doc[endpoint]), wire.decode_tree(doc["aux"])), want)
        same(wire.decode_tree(doc["output"]), fn(tx)[0])


def test_hvp_hessian_jvp_over_argnums_tuples_of_a_pytree_through_the_sdk(c):
    fn = F.tree_loss
    p, tp = {"w": RNG.standard_normal(4), "b": np.array(0.3)}, {"w": RNG.standard_normal(4), "b": np.array(0.7)}
    prim, tans = (t(p), t(X)), (t(tp), t(V))
    with sdk_over(c) as sdk:
        for argnums in ((0, 1), (1, 0), (0,)):
            primals = tuple(prim[i] for i in argnums)

            def sub(*a: Any, argnums: tuple[int, ...] = argnums) -> Any:
                full = list(prim)
                for i, ai in zip(argnums, a):
                    full[i] = ai
                return fn(*full)

            tangents = tuple(tans[i] for i in argnums)
            sent = tuple(tree_map(lambda a: a.numpy(), tans[i]) for i in argnums)
            same(sdk.hessian("tree_loss", p, X, argnums=argnums), f.hessian(fn, argnums=argnums)(*prim))
            same(sdk.jvp("tree_loss", p, X, tangents=sent, argnums=argnums), f.jvp(sub, primals, tangents)[1])
            want = f.jvp(f.grad(sub, argnums=tuple(range(len(argnums)))), primals, tangents)[1]
            same(sdk.hvp("tree_loss", p, X, tangents=sent, argnums=argnums), want)
