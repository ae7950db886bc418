"""PyTorch's own torch.func test cases, round 25 (test_eager_transforms.py's TestJac),
replayed over HTTP against tests/parity25_functions.py and compared with in-process
torch.func (values, shapes, dtypes; torch's error where torch raises).

1. test_outputs_can_any_pytree: an output torch.func refuses (None, an empty tuple, dict
   or list, a number, a string, a None or an int inside a tuple or dict) was a 500
   "the function returned tuple; expected a tensor or a tuple/dict of tensors", said of
   a tuple, of ``{}`` (a dict) and of ``[]`` (lists are served): neither which leaf nor
   that nothing was there. The detail now names the leaf (``the output[1] is None``) or
   the emptiness, in torch.func's words, on every endpoint.
2. test_negative_argnums through jacfwd: torch's own ``jacfwd(f, argnums=-2)`` answers
   zeros (torch 2.13: the tangents never reach the input), and so does
   ``torch.func.hessian(f, argnums=-2)``; the service's forward mode, Hessians and HVPs
   take -2 as the position it names, as ``argnums=1`` (a guard: they did already).
3. TestHessian in float16 and bfloat16: the Hessian strategy measured fastest (reverse
   over reverse, or per example jacrev(jacrev) under vmap, always) rounds otherwise
   than torch.func.hessian (forward over reverse), 25 of 96 entries off, up to 0.5 at
   values near 6, past torch's own float16 tolerance; the strategies are equal only to
   round-off, which in 16 bits is no longer small. In half precision the Hessian is
   torch's own strategy's now, bit for bit.

One in-process app serves the module (no server start), as rounds 7-24.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

from . import parity25_functions as F
from .conftest import assert_problem, ready_app
from .test_parity_round7 import answer, arr, post, same, t

f = torch.func
RNG = np.random.default_rng(25)
X = RNG.standard_normal(3)


@pytest.fixture(scope="module")
def c() -> Iterator[Any]:
    with ready_app("tests.parity25_functions") as client:
        yield client


# name -> how the detail begins: the leaf (pytree's path) or the emptiness
SAYS = {
    "none": "the output is None: no tensor to answer",
    "empty_tuple": "the output is a tuple, empty or of empty containers: no tensor to answer",
    "empty_dict": "the output is a dict, empty or of empty containers: no tensor to answer",
    "empty_list": "the output is a list, empty or of empty containers: no tensor to answer",
    "nested_empty": "the output is a tuple, empty or of empty containers: no tensor to answer",
    "number": "the output is a float, not a tensor",
    "flag": "the output is a bool, not a tensor",
    "text": "the output is a str, not a tensor",
    "none_inside": "the output[1] is None, not a tensor",
    "int_inside": "the output['a'][1] is an int, not a tensor",
}
# every endpoint and mode, each with what it needs besides the input
ROUTES = [("jacobian", {}), ("jacobian", {"mode": "fwd"}), ("jacobian", {"chunk_size": 1}),
          ("jacobian", {"batched": True}), ("hessian", {}), ("evaluate", {}), ("vjp", {"cotangents": 1.0}),
          ("jvp", {"tangents": X.tolist()}), ("hvp", {"tangents": X.tolist()})]


@pytest.mark.parametrize("name", sorted(F.NOT_TENSORS))
def test_an_output_that_is_not_tensors_is_named_as_torch_names_it(c, name):
    fn = F.NOT_TENSORS[name]
    with pytest.raises(RuntimeError) as raised:
        f.jacrev(fn)(t(X))
    with pytest.raises(RuntimeError) as forward:
        f.jacfwd(fn)(t(X))
    # torch's words past its transform's name ("vjp(f, *primals): "), the same in both
    # modes, less the repr of an empty output it appends ("(got output = [None])")
    words = str(raised.value).split(": ", 1)[1].split(" (got output = ")[0]
    assert words == str(forward.value).split(": ", 1)[1].split(" (got output = ")[0]
    for endpoint, options in ROUTES:
        inputs = [np.stack([X, X])] if options.get("batched") else [X]
        body = assert_problem(post(c, f"out_{name}", endpoint, inputs, **options), 500, "function_error")
        assert body["detail"].startswith(SAYS[name] + ": return a tensor, or a tuple, list or dict of tensors" if
                                         "not a tensor" in SAYS[name] else SAYS[name] + "; return a tensor"), body
        assert body["detail"].endswith(f"(torch.func: {words})"), (endpoint, body["detail"], words)


def test_negative_argnums_through_forward_mode_are_the_position_they_name(c):
    x, y, z = X, RNG.standard_normal(2), np.float64(0.7)
    fn = F.three_scalar
    want = f.hessian(fn, argnums=1)(*t([x, y, z]))
    assert float(want.abs().min()) == 0.0 < float(want.abs().max())  # diagonal: the ys do not mix
    # finite differences of the gradient in y say the same
    eps, g = 1e-6, f.grad(fn, argnums=1)
    fd = torch.stack([(g(*t([x, y + eps * e, z])) - g(*t([x, y - eps * e, z]))) / (2 * eps) for e in np.eye(2)], -1)
    torch.testing.assert_close(fd, want, rtol=1e-6, atol=1e-8)
    for options in ({}, {"chunk_size": 1}):
        got, doc = answer(post(c, "three_scalar", "hessian", [x, y, z], argnums=-2, **options), "hessian")
        same(got, want)
    got, _ = answer(post(c, "three_scalar", "hessian", [x, y, z], argnums=[-1, -2]), "hessian")
    same(got, f.hessian(fn, argnums=(2, 1))(*t([x, y, z])))
    v = RNG.standard_normal(2)
    got, _ = answer(post(c, "three_scalar", "hvp", [x, y, z], argnums=-2, tangents=arr(v)), "hvp")
    same(got, want @ t(v))
    got, _ = answer(post(c, "three_scalar", "jacobian", [x, y, z], argnums=-2, mode="fwd"), "jacobian")
    same(got, f.jacrev(fn, argnums=1)(*t([x, y, z])))
    xs, ys, zs = RNG.standard_normal((2, 3)), RNG.standard_normal((2, 2)), RNG.standard_normal(2)
    got, _ = answer(post(c, "three_scalar", "hessian", [xs, ys, zs], argnums=-2, batched=True), "hessian")
    same(got, f.vmap(f.hessian(fn, argnums=1))(*t([xs, ys, zs])))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_a_half_precision_hessian_is_torch_hessians_bit_for_bit(c, dtype):
    tx = torch.tensor(np.linspace(-1.3, 1.7, 12).reshape(3, 4), dtype=getattr(torch, dtype))
    want = f.vmap(f.hessian(F.mixed))(tx)
    # the premise: reverse over reverse (what the service measured fastest) rounds otherwise
    rev_rev = f.vmap(f.jacrev(f.jacrev(F.mixed)))(tx)
    assert not torch.equal(rev_rev, want)
    # JSON carries bfloat16 as its values, answered as float32 arrays holding them (README)
    host = want.numpy() if dtype == "float16" else want.float().numpy()

    def sent(v: torch.Tensor) -> dict[str, Any]:
        return {"dtype": dtype, "shape": list(v.shape), "data": v.float().tolist()}

    def check(v: torch.Tensor, expected: np.ndarray, **options: Any) -> None:
        got, doc = answer(c.post("/v1/functions/mixed/hessian", json={"inputs": [sent(v)], **options}), "hessian")
        assert got.dtype == expected.dtype
        np.testing.assert_array_equal(got, expected)
        assert doc["meta"]["mode"] == "jacfwd_jacrev", doc["meta"]

    check(tx, host, batched=True)
    for i, x in enumerate(tx):  # measured (the first), then the strategy kept
        for _ in range(2):
            check(x, host[i])
