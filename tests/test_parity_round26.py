"""PyTorch's own torch.func test cases, round 26 (test_eager_transforms.py's TestJac and
TestVjp over pytree outputs: test_outputs_can_any_pytree's dicts, whose keys torch's
pytree takes of any hashable kind), replayed over HTTP against
tests/parity26_functions.py and compared with in-process torch.func and finite
differences.

1. A dict output with two keys written alike on the wire (``{1: a, "1": b}``, ``True``
   and ``"True"``, ``None`` and ``"None"``, at any depth): torch.func.jacrev answers
   both blocks; the service answered 200 with one of them, the other dropped without a
   word (JSON and ``.npz`` alike; measured: ``{"1": ...}``, one 3x3 block of torch's
   two). It is now the function's 500 naming the dict and both keys, on every route.
2. Cotangents for a dict output whose keys are of mixed kinds (``{1: a, "2": b, (3,
   "a"): c}``) that leave a key out: the engine sorted the output's keys to say which
   were expected, ``int < str`` raised TypeError, and the answer was a 500
   ``internal_error`` (a traceback in the log) where a 422 naming the keys to send was
   due; on ``vjp`` and ``hvp`` with cotangents.

3. has_aux with an aux dict keyed by ints (``{0: h0, 1: h1}``, a tuple, a float): torch.func
   answers it; the service refused it as the function's 500 "aux dict keys must be
   strings, got int" on every route. Aux keys are now written as their text, as an
   output's are (two written alike: the function's 500, as for outputs).

4. The SDK's vjp and hvp (TestVjp's pytree cotangents) for a dict output keyed ``"a/b"``
   or ``""``: its default transport sent the cotangents as ``.npz`` members named by
   their paths, ``cotangents/a/b`` (read as two levels) and ``cotangents/`` (no name),
   and the call raised InvalidInput (422 "cotangents keys ['a'] do not match ['a',
   'a/b']") where JSON answered. Such vectors now go as JSON.

5. JSON cotangents for a dict output keyed ``"dtype"``, ``"shape"``, ``"data"``: each
   key's cotangent an array object, the object holding them was read as one array
   object (its "shape" an object), a 422 "cotangents: 'dtype' must be a string" on vjp
   and hvp (and so the SDK's JSON transport). An object whose "shape" is an object is
   now the dict node it is.

One in-process app serves the module (no server start), as rounds 7-25.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from jacobian_client import wire

from . import parity26_functions as F
from .conftest import assert_problem, ready_app, sdk_over
from .test_parity_round7 import answer, arr, post, same, t

f = torch.func
RNG = np.random.default_rng(26)
X = RNG.standard_normal(3)


@pytest.fixture(scope="module")
def c() -> Iterator[Any]:
    with ready_app("tests.parity26_functions") as client:
        yield client


# every endpoint and mode, each with what it needs besides the input (cotangents keyed as
# the wire writes the keys: the service reads the output before it matches them)
ROUTES = [("jacobian", {}), ("jacobian", {"mode": "fwd"}), ("jacobian", {"chunk_size": 1}),
          ("jacobian", {"batched": True}), ("hessian", {}), ("evaluate", {}),
          ("vjp", {"cotangents": {"1": arr(X)}}), ("jvp", {"tangents": arr(X)}),
          ("hvp", {"tangents": arr(X), "cotangents": {"1": arr(X)}})]
# name -> (where the dict is, its two keys as the detail quotes them, their text)
ALIKE = {"int_and_text": ("the output", "1 and '1'", "'1'"),
         "nested": ("the output[1]['k']", "None and 'None'", "'None'"),
         "bool_and_text": ("the output", "'True' and True", "'True'")}


@pytest.mark.parametrize("name", sorted(ALIKE))
def test_dict_keys_written_alike_are_the_functions_500_on_every_route(c, name):
    fn = F.KEYED[name]
    where, keys, text = ALIKE[name]
    # torch keeps both keys apart: its Jacobian has a block for each (3 or 2 leaves)
    want = f.jacrev(fn)(t(X))
    blocks = torch.utils._pytree.tree_leaves(want)
    assert len(blocks) == len(torch.utils._pytree.tree_leaves(fn(t(X)))) >= 2
    assert not torch.equal(blocks[-1], blocks[-2])
    for endpoint, options in ROUTES:
        inputs = [np.stack([X, X])] if options.get("batched") else [X]
        body = assert_problem(post(c, f"keys_{name}", endpoint, inputs, **options), 500, "function_error")
        assert body["detail"] == (f"{where} has keys {keys}, both written {text} on the wire (dict keys travel "
                                  "as their text; the answer would keep one of them): give them distinct text"), \
            (endpoint, options, body)
    # in .npz too, whose members and skeleton are named by that text
    r = c.post(f"/v1/functions/keys_{name}/jacobian", json={"inputs": [arr(X)]}, headers={"accept": "application/x-npz"})
    assert_problem(r, 500, "function_error")


def test_keys_of_mixed_kinds_are_answered_and_their_cotangents_matched_by_text(c):
    fn = F.KEYED["distinct"]
    # distinct as text, the keys are answered as torch's, keyed by that text
    got, _ = answer(post(c, "keys_distinct", "jacobian", [X]), "jacobian")
    same(got, {str(k): v for k, v in f.jacrev(fn)(t(X)).items()})
    cot = {k: RNG.standard_normal(3) for k in fn(t(X))}
    sent = {str(k): arr(v) for k, v in cot.items()}
    _, pull = f.vjp(fn, t(X))
    want = pull({k: t(v) for k, v in cot.items()})[0]
    # the math: central differences of c . f(x)
    h = 1e-6
    dot = lambda x: sum(float((fn(x)[k] * t(v)).sum()) for k, v in cot.items())
    fd = torch.tensor([(dot(t(X + h * e)) - dot(t(X - h * e))) / (2 * h) for e in np.eye(3)], dtype=torch.float64)
    torch.testing.assert_close(want, fd, rtol=1e-6, atol=1e-8)
    got, _ = answer(post(c, "keys_distinct", "vjp", [X], cotangents=sent), "vjp")
    same(got, want)
    v = RNG.standard_normal(3)
    got, _ = answer(post(c, "keys_distinct", "hvp", [X], tangents=arr(v), cotangents=sent), "hvp")
    same(got, f.jvp(lambda x: pull_at(fn, x, cot), (t(X),), (t(v),))[1])
    # one key left out, or one more: a 422 naming the keys as the wire writes them
    expected = "[\"(3, 'a')\", '1', '2']"
    for endpoint, extra in (("vjp", {}), ("hvp", {"tangents": arr(v)})):
        for cotangents, got_keys in (({"1": sent["1"]}, "['1']"), ({**sent, "4": sent["1"]}, "[\"(3, 'a')\", '1', '2', '4']")):
            body = assert_problem(post(c, "keys_distinct", endpoint, [X], cotangents=cotangents, **extra), 422,
                                  "invalid_input")
            assert body["detail"] == f"cotangents keys {got_keys} do not match {expected}", body


def pull_at(fn: Any, x: torch.Tensor, cot: dict[Any, np.ndarray]) -> torch.Tensor:
    return f.vjp(fn, x)[1]({k: t(v) for k, v in cot.items()})[0]


def as_text(tree: Any) -> Any:
    """torch's answer with its dict keys as the wire writes them."""
    if isinstance(tree, dict):
        return {str(k): as_text(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(as_text(v) for v in tree)
    return tree


def test_an_aux_keyed_by_any_hashable_is_torchs_keyed_by_text(c):
    fn = F.aux_keyed
    v = RNG.standard_normal(3)
    jac, aux = f.jacrev(fn, has_aux=True)(t(X))
    # the math: the Jacobian of x sin x is diagonal, sin x + x cos x
    torch.testing.assert_close(jac, torch.diag(t(X).sin() + t(X) * t(X).cos()))
    xs = np.stack([X, RNG.standard_normal(3)])
    _, pull, vjp_aux = f.vjp(fn, t(X), has_aux=True)
    # (endpoint, options, torch's result, torch's aux)
    cases = [
        ("jacobian", {}, jac, aux),
        ("jacobian", {"mode": "fwd"}, jac, aux),
        ("jacobian", {"batched": True}, *f.vmap(f.jacrev(fn, has_aux=True))(t(xs))),
        ("hessian", {}, f.hessian(lambda x: fn(x)[0])(t(X)), aux),
        ("evaluate", {}, *fn(t(X))),
        ("vjp", {"cotangents": arr(v)}, pull(t(v))[0], vjp_aux),
        ("jvp", {"tangents": arr(v)}, *f.jvp(fn, (t(X),), (t(v),), has_aux=True)[1:]),
    ]
    for endpoint, options, result, want_aux in cases:
        inputs = [xs] if options.get("batched") else [X]
        key = "output" if endpoint == "evaluate" else endpoint
        got, doc = answer(post(c, "aux_keyed", endpoint, inputs, **options), key)
        same(got, result, endpoint)
        same(wire.decode_tree(doc["aux"]), as_text(want_aux), f"{endpoint} {options} aux")
    # keys written alike in the aux: the function's 500, as in an output
    body = assert_problem(post(c, "aux_alike", "jacobian", [X]), 500, "function_error")
    assert body["detail"] == ("aux has two keys of one dict written '1' on the wire (dict keys travel as their text; "
                              "the answer would keep one of them): give them distinct text"), body


def test_the_sdks_cotangents_keyed_as_no_npz_member_can_be_named_are_answered(c):
    fn = F.slash_keys
    x, v = t(X), t(RNG.standard_normal(3))
    cot = {k: t(RNG.standard_normal(3)) if k != "a" else {"c": t(RNG.standard_normal(3))} for k in fn(x)}
    _, pull = f.vjp(fn, x)
    want = pull(cot)[0]
    # the math: c . f(x) = sum of c_ab (x sin x) + c_c exp(x) + c_ x^3, term by term
    grad = cot["a/b"] * (x.sin() + x * x.cos()) + cot["a"]["c"] * x.exp() + cot[""] * 3 * x**2
    torch.testing.assert_close(want, grad)
    host = {k: (w.numpy() if k != "a" else {"c": w["c"].numpy()}) for k, w in cot.items()}
    with sdk_over(c) as sdk:
        for transport in (None, "binary", "json"):  # None: the default, binary
            same(sdk.vjp("slash_keys", X, cotangents=host, transport=transport), want)
            same(sdk.hvp("slash_keys", X, tangents=v.numpy(), cotangents=host, transport=transport),
                 f.jvp(lambda y: f.vjp(fn, y)[1](cot)[0], (x,), (v,))[1])


def test_json_cotangents_for_an_output_keyed_like_an_array_object_are_its_keys(c):
    fn = F.array_keys
    x, v = t(X), t(RNG.standard_normal(3))
    cot = {k: t(RNG.standard_normal(3)) for k in fn(x)}
    _, pull = f.vjp(fn, x)
    want = pull(cot)[0]
    # the math, term by term: d(sin x), d(x cos x), d(x^2)
    torch.testing.assert_close(want, cot["dtype"] * x.cos() + cot["shape"] * (x.cos() - x * x.sin())
                               + cot["data"] * 2 * x)
    sent = {k: arr(w.numpy()) for k, w in cot.items()}
    got, _ = answer(post(c, "array_keys", "vjp", [X], cotangents=sent), "vjp")
    same(got, want)
    want_hvp = f.jvp(lambda y: f.vjp(fn, y)[1](cot)[0], (x,), (v,))[1]
    got, _ = answer(post(c, "array_keys", "hvp", [X], tangents=arr(v.numpy()), cotangents=sent), "hvp")
    same(got, want_hvp)
    with sdk_over(c) as sdk:
        for transport in ("json", "binary"):
            host = {k: w.numpy() for k, w in cot.items()}
            same(sdk.vjp("array_keys", X, cotangents=host, transport=transport), want)
            same(sdk.hvp("array_keys", X, tangents=v.numpy(), cotangents=host, transport=transport), want_hvp)
    # an array object's own shape is still a list: one that is not is still its 422
    body = assert_problem(post(c, "array_keys", "vjp", [X], cotangents={"shape": "3", "data": [1, 2, 3]}), 422,
                          "invalid_input")
    assert body["detail"] == "cotangents: 'shape' must be a list of integers", body
