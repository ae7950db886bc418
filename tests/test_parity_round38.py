"""PyTorch's own torch.func test cases, round 38 (test_eager_transforms.py's TestJac,
TestHessian, TestJvp / TestVjp and TestGradTransform cases with registrable functions:
in-place writes into an input and into a view's base, ``test_chunk_jacrev`` at every
chunk size, ``test_chunk_jacrev_composition`` as per-example Hessians, take, a
different number of elements out, several outputs with every argnums form, 0-d inputs
and outputs, a default argument, TestHessian's relu chain and unrelated outputs,
``test_jacfwd_different_levels``, ``new_tensor``, a captured output, aux pytrees on
jacobian / hessian / vjp / jvp, list-of-tuple-of-dict outputs, a seed set inside the
function, cross_entropy with integer targets, inputs by name), replayed over HTTP
against tests/parity38_functions.py and compared with in-process torch.func.

1. test_vjp_pytree_error / test_pytree_inputs_error_cases: cotangents (or tangents)
   whose lists are nested otherwise than the output (the inputs), ``[[v1, [v2, v3]]]``
   for ``(x, (x, x))``, raise in torch.func. The front end flattened a JSON tree of
   lists in reading order before the engine saw it, so any nesting of the right leaves
   was answered 200 (``v1 + v2 + v3``; an ``.npz`` so nested was already a 422). Lists
   now reach the engine nested as sent: the output's nesting or the flat list of its
   leaves is taken, anything else is a 422 saying both and quoting torch.

The rest matched torch.func (the table: the report sec-parity38.md); what it pins:

- every answer equals torch.func's (values, shapes, dtypes, structure) on every mode
  and chunk size;
- argnums torch refuses (empty, repeated, also through a negative index, out of range,
  floats, nested lists, null, objects) are 422s on jacobian, hessian, vjp and jvp, each
  saying what torch says;
- where torch's ``vmap`` cannot run the function (a dynamic-shape op in a custom
  backward with ``chunk_size=2``; a draw under ``hessian``'s randomness="error"), the
  service answers what one product at a time gives (README: never depends on
  chunk_size), not torch's vmap error.

One in-process app serves the module (no server start), as rounds 7-35.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import pytest
import torch

from . import parity38_functions as F
from .conftest import ready_app
from .test_parity_round7 import answer, arr, post, same, t

f = torch.func
RNG = np.random.default_rng(38)


def R(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape)


@pytest.fixture(scope="module")
def c():
    with ready_app("tests.parity38_functions") as client:
        yield client


X2, Y2 = R(2), R(2)
X3, Y2b, Z2 = R(3), R(2), R(2)
XC, YC = R(10, 2), R(1, 2)
XM, YM = R(5, 3), R(3, 5)
S0, Y1 = np.array(0.7), R(1)
XR, YR, ZR = R(2, 3), R(3, 5), R(5, 5)
XA, YA = R(2), R(3)
A, X1 = 0.1 * R(4, 2, 2), R(4, 20, 2)
XU, XB = R(2, 3), R(2, 2, 3)
Y32 = R(3, 2)
V3 = R(3)
X24 = R(2, 4)
CE, TARGETS = R(2, 5), np.array([1, 3])
W0, X0F = np.array(3.0, dtype=np.float32), np.array(4.0, dtype=np.float32)
X3F = X3.astype(np.float32)


def jr(fn: Callable, *inputs: np.ndarray, **kw: Any) -> Callable[[], Any]:
    return lambda: f.jacrev(fn, **kw)(*t(list(inputs)))


def hs(fn: Callable, *inputs: np.ndarray, **kw: Any) -> Callable[[], Any]:
    return lambda: f.hessian(fn, **kw)(*t(list(inputs)))


# (id, function, endpoint, inputs, options, torch.func's answer)
CASES = [
    *[(f"copy_into-{m}", "copy_into", "jacobian", [X2, Y2], {"mode": m}, jr(F.copy_into, X2, Y2)) for m in ("rev", "fwd")],
    *[(f"setitem-{m}-{cs}", "setitem_vstack", "jacobian", [X3, Y2b, Z2], {"argnums": [1, 2], "mode": m, "chunk_size": cs},
       jr(F.setitem_vstack, X3, Y2b, Z2, argnums=(1, 2))) for m in ("rev", "fwd") for cs in (None, 1)],
    *[(f"chunk_jacrev-{cs}", "chunk_nested", "jacobian", [XC, YC], {"argnums": [0, 1], "chunk_size": cs},
       jr(F.chunk_nested, XC, YC, argnums=(0, 1))) for cs in (1, 2, 3, 4, 7, 10, 1000)],
    ("chunk_composition", "chunk_composition", "hessian", [XC], {"batched": True, "chunk_size": 3},
     lambda: f.vmap(f.jacrev(f.jacrev(F.chunk_composition)))(t(XC))),
    *[(f"take-{m}", "take", "jacobian", [X3[:1].repeat(5)], {"mode": m}, jr(F.take, X3[:1].repeat(5))) for m in ("rev", "fwd")],
    *[(f"diff_numel-{m}", "diff_numel", "jacobian", [X24], {"mode": m}, jr(F.diff_numel, X24)) for m in ("rev", "fwd")],
    *[(f"multi_out-{an}-{m}", "multi_out", "jacobian", [XM, YM], {"argnums": an, "mode": m},
       jr(F.multi_out, XM, YM, argnums=tuple(an) if isinstance(an, list) else an))
      for an in (0, 1, [0, 1], [-1], -2) for m in ("rev", "fwd")],
    ("stack0", "stack0", "jacobian", [S0], {}, jr(F.stack0, S0)),
    ("stack0-hessian", "stack0", "hessian", [S0], {}, hs(F.stack0, S0)),
    ("mixed0", "mixed0", "jacobian", [S0, Y1], {"argnums": [0, 1]}, jr(F.mixed0, S0, Y1, argnums=(0, 1))),
    ("mixed0-hessian", "mixed0", "hessian", [S0, Y1], {"argnums": [0, 1]}, hs(F.mixed0, S0, Y1, argnums=(0, 1))),
    ("default_arg", "default_arg", "jacobian", [X3, V3], {"argnums": [0, 1]}, jr(F.default_arg, X3, V3, argnums=(0, 1))),
    ("relu_chain", "relu_chain", "hessian", [XR, YR, ZR], {"argnums": [0, 1, 2]}, hs(F.relu_chain, XR, YR, ZR, argnums=(0, 1, 2))),
    ("unrelated_one", "unrelated_one", "hessian", [XA, YA], {"argnums": [0, 1]}, hs(F.unrelated_one, XA, YA, argnums=(0, 1))),
    ("unrelated_all", "unrelated_all", "hessian", [XA, YA], {"argnums": [0, 1]}, hs(F.unrelated_all, XA, YA, argnums=(0, 1))),
    ("different_levels", "lsq_loss", "hessian", [A, X1, X1], {"batched": True, "argnums": [0, 1]},
     lambda: f.vmap(f.hessian(F.lsq_loss, argnums=(0, 1)))(*t([A, X1, X1]))),
    ("new_tensor-fwd", "new_tensor", "jacobian", [XU], {"mode": "fwd"}, jr(F.new_tensor, XU)),
    *[(f"unrelated_output-{m}", "unrelated_output", "jacobian", [XU], {"mode": m}, jr(F.unrelated_output, XU)) for m in ("rev", "fwd")],
    ("unrelated_output-hessian", "unrelated_output", "hessian", [XU], {}, hs(F.unrelated_output, XU)),
    *[(f"composite-{m}", "composite_output", "jacobian", [XU], {"mode": m}, jr(F.composite_output, XU)) for m in ("rev", "fwd")],
    ("composite-hessian", "composite_output", "hessian", [XU], {}, hs(F.composite_output, XU)),
    ("composite-batched", "composite_output", "jacobian", [XB], {"batched": True}, lambda: f.vmap(f.jacrev(F.composite_output))(t(XB))),
    *[(f"view_base-{m}", "inplace_on_view_base", "jacobian", [S0, Y32], {"argnums": [0, 1], "mode": m},
       jr(F.inplace_on_view_base, S0, Y32, argnums=(0, 1))) for m in ("rev", "fwd")],
    ("view_base-hessian", "inplace_on_view_base", "hessian", [S0, Y32], {"argnums": [0, 1]},
     hs(F.inplace_on_view_base, S0, Y32, argnums=(0, 1))),
    *[(f"seed-{m}-{cs}", "manual_seed_inside", "jacobian", [X3], {"mode": m, "chunk_size": cs}, jr(F.manual_seed_inside, X3))
      for m in ("rev", "fwd") for cs in (None, 2)],
    *[(f"unrelated_outputs-{m}", "unrelated_outputs", "jacobian", [W0, X0F], {"argnums": [0, 1], "mode": m},
       jr(F.unrelated_outputs, W0, X0F, argnums=(0, 1))) for m in ("rev", "fwd")],
    ("unrelated_outputs-hessian", "unrelated_outputs", "hessian", [W0, X0F], {"argnums": [0, 1]},
     hs(F.unrelated_outputs, W0, X0F, argnums=(0, 1))),
    ("view_inplace_simple", "view_inplace_simple", "hessian", [S0], {}, hs(F.view_inplace_simple, S0)),
    ("linear_w-unrelated_hessian", "linear_w", "hessian", [X3F], {}, lambda: f.jacrev(f.jacrev(F.linear_w))(t(X3F))),
    ("zero_grad", "zero_grad", "hessian", [{"a": X3 + 3, "b": V3}], {}, hs(F.zero_grad, {"a": X3 + 3, "b": V3})),
    *[(f"grad_pytree_inputs-{an}", "grad_pytree_inputs", "jacobian", [(S0, S0), {"foo": S0}], {"argnums": an},
       jr(F.grad_pytree_inputs, (S0, S0), {"foo": S0}, argnums=tuple(an) if isinstance(an, list) else an))
      for an in (0, [0], [1, 0], -1)],
    ("cross_entropy-hessian", "cross_entropy", "hessian", [CE, TARGETS], {}, hs(F.cross_entropy, CE, TARGETS)),
]


@pytest.mark.parametrize("name, endpoint, inputs, options, want", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_derivatives_as_torch_func(c, name, endpoint, inputs, options, want):
    state = torch.get_rng_state()
    try:
        expected = want()
    finally:
        torch.set_rng_state(state)
    options = {k: v for k, v in options.items() if v is not None}
    same(answer(post(c, name, endpoint, inputs, **options), endpoint)[0], expected)


def test_aux_pytree_on_every_endpoint(c):
    """test_aux_pytree: the aux beside a Jacobian, a Hessian (jacfwd(jacrev(has_aux),
    has_aux)), a VJP and a JVP, with the output."""
    x, v = t(X3), t(V3)
    r = post(c, "aux_pytree", "hessian", [X3])
    H, aux = f.jacfwd(f.jacrev(F.aux_pytree, has_aux=True), has_aux=True)(x)
    same(answer(r, "hessian")[0], H)
    same(answer(r, "aux")[0], aux)
    out, pullback, aux = f.vjp(F.aux_pytree, x, has_aux=True)
    r = c.post("/v1/functions/aux_pytree/vjp", json={"inputs": [arr(X3)], "cotangents": arr(V3), "return_output": True})
    same(answer(r, "vjp")[0], pullback(v)[0])
    same(answer(r, "aux")[0], aux)
    same(answer(r, "output")[0], out)
    out, tangent, aux = f.jvp(F.aux_pytree, (x,), (v,), has_aux=True)
    r = c.post("/v1/functions/aux_pytree/jvp", json={"inputs": [arr(X3)], "tangents": arr(V3), "return_output": True})
    same(answer(r, "jvp")[0], tangent)
    same(answer(r, "aux")[0], aux)
    same(answer(r, "output")[0], out)


def test_pytree_output_products_as_torch_func(c):
    """test_outputs_can_any_pytree's ``[(sum, {"a": x, "out": [x, sum]})]``: a pytree of
    cotangents (one and a stack) and a tangent."""
    x = t(XU)
    _, pullback = f.vjp(F.composite_output, x)
    one = [(torch.tensor(1.5, dtype=torch.float64), {"a": x, "out": [2 * x, torch.tensor(-1.0, dtype=torch.float64)]})]
    wire = [[arr(np.array(1.5)), {"a": arr(XU), "out": [arr(2 * XU), arr(np.array(-1.0))]}]]
    r = c.post("/v1/functions/composite_output/vjp", json={"inputs": [arr(XU)], "cotangents": wire})
    same(answer(r, "vjp")[0], pullback(one)[0])
    stack = [(torch.tensor([1.5, 2.0], dtype=torch.float64),
              {"a": torch.stack([x, -x]), "out": [torch.stack([x, x]), torch.tensor([-1.0, 3.0], dtype=torch.float64)]})]
    wire = [[arr(np.array([1.5, 2.0])), {"a": arr(np.stack([XU, -XU])), "out": [arr(np.stack([XU, XU])), arr(np.array([-1.0, 3.0]))]}]]
    r = c.post("/v1/functions/composite_output/vjp", json={"inputs": [arr(XU)], "cotangents": wire, "batched_vectors": True})
    same(answer(r, "vjp")[0], f.vmap(pullback)(stack)[0])
    _, tangent = f.jvp(F.composite_output, (x,), (x,))
    same(answer(c.post("/v1/functions/composite_output/jvp", json={"inputs": [arr(XU)], "tangents": arr(XU)}), "jvp")[0], tangent)


def test_unrelated_output_products_as_torch_func(c):
    """TestJvp / TestVjp test_unrelated_output: a float32 constant of float64 inputs."""
    xs = t([XA, YA])
    _, pullback = f.vjp(F.unrelated_all, *xs)
    r = c.post("/v1/functions/unrelated_all/vjp", json={"inputs": [arr(XA), arr(YA)], "cotangents": 1.5, "argnums": [0, 1]})
    same(answer(r, "vjp")[0], pullback(torch.tensor(1.5)))
    r = c.post("/v1/functions/unrelated_all/jvp",
               json={"inputs": [arr(XA), arr(YA)], "tangents": [arr(XA), arr(YA)], "argnums": [0, 1]})
    same(answer(r, "jvp")[0], f.jvp(F.unrelated_all, tuple(xs), tuple(xs))[1])
    z = np.zeros((2, 3))
    r = c.post("/v1/functions/new_tensor/jvp", json={"inputs": [arr(XU)], "tangents": arr(z)})
    same(answer(r, "jvp")[0], f.jvp(F.new_tensor, (t(XU),), (t(z),))[1])


def test_inputs_by_name_as_keyword_arguments(c):
    """test_fn_with_kwargs: inputs as an object, in any order, argnums by name."""
    x, y = t([X3, V3])
    body = {"inputs": {"y": arr(V3), "x": arr(X3)}}
    same(answer(c.post("/v1/functions/kw_product/jacobian", json=body), "jacobian")[0], f.jacrev(F.kw_product)(x, y))
    body["argnums"] = "y"
    same(answer(c.post("/v1/functions/kw_product/jacobian", json=body), "jacobian")[0],
         f.jacrev(F.kw_product, argnums=1)(x, y))


# argnums torch.func refuses, and what its message says (the service's detail says it too)
REFUSED = [([], "empty"), ([0, 0], "duplicates"), ([0, -2], "duplicates"), (2, "out of range"), (-3, "out of range"),
           (0.0, "must be an int"), ([1, 0.0], "must be an int"), ([[0, 1]], "must be an int"), (None, "must be an int"),
           ({"a": 0}, "must be an int")]


@pytest.mark.parametrize("argnums, says", REFUSED, ids=[repr(a) for a, _ in REFUSED])
def test_argnums_torch_refuses_are_422_everywhere(c, argnums, says):
    with pytest.raises(RuntimeError):
        f.jacrev(lambda x, y: x + y**2, argnums=tuple(argnums) if isinstance(argnums, list) else argnums)(*t([X3, V3]))
    extra = {"vjp": {"cotangents": arr(X3)}, "jvp": {"tangents": arr(X3)}}
    for endpoint in ("jacobian", "hessian", "vjp", "jvp"):
        r = c.post(f"/v1/functions/default_arg/{endpoint}",
                   json={"inputs": [arr(X3), arr(V3)], "argnums": argnums, **extra.get(endpoint, {})})
        assert r.status_code == 422 and r.headers["content-type"].startswith("application/problem+json"), (endpoint, r.text)
        assert r.json()["code"] == "invalid_input" and says in r.json()["detail"], (endpoint, r.text)


def test_where_torch_vmap_refuses_one_product_at_a_time(c):
    """test_chunk_jacrev_chunksize_one: torch's jacrev answers with chunk_size=1 and
    raises with 2 (a dynamic-shape op in the backward); the service's answer does not
    depend on chunk_size. hessian of a draw after a seed: torch.func.hessian raises
    (randomness="error"); its value is jacrev over jacrev one row at a time (zero)."""
    x = R(3, 3)
    want = torch.autograd.functional.jacobian(F.dynamic_backward, t(x), vectorize=False)
    with pytest.raises(RuntimeError, match="dynamic shape"):
        f.jacrev(F.dynamic_backward, chunk_size=2)(t(x))
    for cs in (None, 1, 2):
        options = {"chunk_size": cs} if cs else {}
        same(answer(post(c, "dynamic_backward", "jacobian", [x], **options), "jacobian")[0], want)
    with pytest.raises(RuntimeError, match="randomness"):
        f.hessian(F.manual_seed_inside)(t(X3))
    same(answer(post(c, "manual_seed_inside", "hessian", [X3]), "hessian")[0], np.zeros((3, 3, 3)))


# ----------------------------------------------------------------- vectors' pytree structure

X0, C1, C2, C3 = np.array(0.3), np.array(0.5), np.array(-1.0), np.array(2.0)
MISNESTED = [[[arr(C1), [arr(C2), arr(C3)]]], [arr(C1), [arr(C2)], arr(C3)], [[arr(C1), arr(C2)], arr(C3)],
             [[arr(C1), arr(C2), arr(C3)]]]


@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("cotangents", MISNESTED, ids=["wrapped", "inner-one", "regrouped", "flat-wrapped"])
def test_misnested_cotangents_are_422_as_torch_refuses_them(c, cotangents, batched):
    """test_vjp_pytree_error: cotangents nested otherwise than the output ``(x, (x, x))``
    (``((v1, (v2, v3)),)``) raise in torch.func.vjp. The front end flattened lists of
    lists in reading order, so any nesting of three arrays was answered 200 (``v1 + v2 +
    v3``); only the output's nesting and the flat list of its leaves are taken."""
    _, pullback = f.vjp(F.twice_nested, t(X0))
    with pytest.raises(RuntimeError, match="Expected pytree structure"):
        pullback(((t(C1), (t(C2), t(C3))),))
    if batched:  # a stack of one of each
        def stacked(node: Any) -> Any:
            if isinstance(node, list):
                return [stacked(n) for n in node]
            return {**node, "shape": [1], "data": [node["data"]]}
        cotangents = stacked(cotangents)
    r = c.post("/v1/functions/twice_nested/vjp",
               json={"inputs": [arr(X0)], "cotangents": cotangents, "batched_vectors": batched})
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["code"] == "invalid_input" and body["detail"].startswith("cotangents"), body
    assert "or a flat list of all 3 arrays in order" in body["detail"] and "Expected pytree structure" in body["detail"]


def test_cotangents_nested_as_the_output_or_flat_as_torch_func(c):
    """What is taken: the output's nesting (torch.func.vjp's), the flat list of its
    leaves (the service's own), one and a stack."""
    _, pullback = f.vjp(F.twice_nested, t(X0))
    want = pullback((t(C1), (t(C2), t(C3))))[0]
    for cotangents in ([arr(C1), [arr(C2), arr(C3)]], [arr(C1), arr(C2), arr(C3)]):
        r = c.post("/v1/functions/twice_nested/vjp", json={"inputs": [arr(X0)], "cotangents": cotangents})
        same(answer(r, "vjp")[0], want)
    stack = [arr(np.array([0.5, 1.0])), [arr(np.array([-1.0, 0.0])), arr(np.array([2.0, 3.0]))]]
    r = c.post("/v1/functions/twice_nested/vjp", json={"inputs": [arr(X0)], "cotangents": stack, "batched_vectors": True})
    same(answer(r, "vjp")[0], torch.tensor([1.5, 4.0], dtype=torch.float64))


def test_misnested_tangents_of_a_tuple_input_are_422(c):
    """test_pytree_inputs_error_cases ("same python structure"): tangents for a tuple
    input ``a = (x, y)`` nested otherwise (``[[tx], [ty]]``) were flattened and taken."""
    b = {"foo": S0}
    with pytest.raises(RuntimeError, match="same python structure"):
        f.jvp(lambda p: F.grad_pytree_inputs(p, t(b)), ((t(S0), t(S0)),), (((t(C1),), (t(C2),)),))
    r = c.post("/v1/functions/grad_pytree_inputs/jvp",
               json={"inputs": [[arr(S0), arr(S0)], {"foo": arr(S0)}], "tangents": [[arr(C1)], [arr(C2)]]})
    assert r.status_code == 422 and "or a flat list of all 2 arrays in order" in r.json()["detail"], r.text
    want = f.jvp(lambda p: F.grad_pytree_inputs(p, t(b)), ((t(S0), t(S0)),), ((t(C1), t(C2)),))[1]
    r = c.post("/v1/functions/grad_pytree_inputs/jvp",
               json={"inputs": [[arr(S0), arr(S0)], {"foo": arr(S0)}], "tangents": [arr(C1), arr(C2)]})
    same(answer(r, "jvp")[0], want)
