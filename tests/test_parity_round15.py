"""PyTorch's own torch.func test cases, round 15, replayed over HTTP against
tests/parity15_functions.py and compared with in-process torch.func (values, shapes,
dtypes, structure; torch's error where torch raises): test/functorch/test_vmap.py's
TestVmapAPI (out_dims and in_dims as pytrees, None and negative dims, batches of 0 and 1
examples, non-tensor outputs, functions returning their inputs) over the per-example
endpoints, and test_eager_transforms.py's TestJvp / TestVjp (pytrees, aux, aliasing
outputs, a tuple output with an integer element, empty inputs and stacks of no vectors)
over JSON, .npy and the SDK.

One in-process app serves the module (no server start), as rounds 7-13.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from jacobian_client import Client, InvalidInput, wire
from torch.func import hessian, jacrev, jvp, vjp, vmap

from . import parity15_functions as F
from .conftest import assert_problem, ready_app, sdk_over
from .test_parity_round7 import answer, arr, post, same, t

RNG = np.random.default_rng(15)
KEY = {"evaluate": "output"}


@pytest.fixture(scope="module")
def c() -> Iterator[Any]:
    with ready_app("tests.parity15_functions") as client:
        yield client


@pytest.fixture(scope="module")
def sdk(c) -> Iterator[Client]:
    """The SDK over the module's app (no socket)."""
    with sdk_over(c) as client:
        yield client


def rand(*shape: int, dtype: str = "float32") -> np.ndarray:
    return RNG.standard_normal(shape).astype(dtype)


def npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


# --------------------------------------------------------------------------- TestVmapAPI


def test_out_dims_of_one_for_a_result_of_one_tensor(c, sdk):
    """test_out_dims_edge_case: torch's vmap takes out_dims=(1,) for a function returning
    one tensor, as out_dims=1. The service answered 422 "out_dims: [*] does not match the
    result's structure *" on every per-example endpoint, in JSON, the query string
    (out_dims=1,) and the SDK (out_dims=(1,)). Now it is torch's answer; a tuple of two
    for one tensor, or a tuple of one for two outputs, stays torch's error."""
    xs, s = rand(4, 3), rand(4, dtype="float64")
    for name, endpoint, x, out_dims, transform in (
            ("identity", "evaluate", xs, (1,), F.identity), ("identity", "jacobian", xs, (1,), jacrev(F.identity)),
            ("identity", "hessian", xs, (-1,), hessian(F.identity)),
            ("scalar_out", "jacobian", s, (0,), jacrev(F.scalar_out))):
        got, _ = answer(post(c, name, endpoint, [x], batched=True, out_dims=list(out_dims)), KEY.get(endpoint, endpoint))
        same(got, vmap(transform, out_dims=out_dims)(t(x)))
    want = vmap(jacrev(F.identity), out_dims=(1,))(t(xs))
    r = c.post("/v1/functions/identity/jacobian?batched=true&out_dims=1,", content=npy(xs),
               headers={"content-type": wire.NPY, "accept": wire.NPY})
    assert r.status_code == 200, r.text
    same(np.load(io.BytesIO(r.content)), want)
    for transport in ("binary", "json"):
        same(sdk.jacobian("identity", xs, batched=True, out_dims=(1,), transport=transport), want)
        same(sdk.evaluate("identity", xs, batched=True, out_dims=(1,), transport=transport),
             vmap(F.identity, out_dims=(1,))(t(xs)))
    xb, y = rand(4, 2, 3), rand(3)
    for name, inputs, options, torch_call in (
            ("identity", [xs], {"out_dims": [1, 0]}, lambda: vmap(F.identity, out_dims=(1, 0))(t(xs))),
            ("pair_out", [xb, y], {"in_dims": [0, None], "out_dims": [1]},
             lambda: vmap(F.pair_out, in_dims=(0, None), out_dims=(1,))(t(xb), t(y))),
            ("pair_out", [xb, y], {"in_dims": [0, None], "out_dims": [[1], [-1]]},
             lambda: vmap(F.pair_out, in_dims=(0, None), out_dims=((1,), (-1,)))(t(xb), t(y)))):
        with pytest.raises(ValueError, match="out_dims is not compatible with the structure of `outputs`"):
            torch_call()
        body = assert_problem(post(c, name, "evaluate", inputs, batched=True, **options), 422, "invalid_input")
        assert "out_dims is not compatible with the structure of `outputs`" in body["detail"], body


def test_examples_run_one_by_one_each_see_the_shared_inputs_as_sent(c):
    """test_vmap.py's in-place cases: f writes into y (y.add_(x)). torch's vmap refuses
    it with y shared and x batched ("output with shape [3] doesn't match the broadcast
    shape [4, 3]"), so the service runs the examples one by one (README), and each
    example wrote into the one shared y the next example read: a batched evaluate of
    x = 0..11 and y = 1 answered [[2,4,6],[8,12,16],[20,26,32],[38,46,54]], every row
    after the first off by the earlier examples' writes. Now each example is f of its x
    and y as sent, as each alone answers (and as vmap answers y batched); the Jacobian's
    output too."""
    xs, y = np.arange(12, dtype="float32").reshape(4, 3), np.ones(3, dtype="float32")
    with pytest.raises(RuntimeError, match="doesn't match the broadcast shape"):
        vmap(F.add_into_y, in_dims=(0, None))(t(xs), t(y))
    want = torch.stack([F.add_into_y(x, t(y)) for x in t(xs)])
    same(want.numpy(), vmap(F.add_into_y)(t(xs), t(np.stack([y] * 4))))  # y per example: vmap runs it alike
    got, _ = answer(post(c, "add_into_y", "evaluate", [xs, y], batched=True, in_dims=[0, None]), "output")
    same(got, want)
    jac, doc = answer(post(c, "add_into_y", "jacobian", [xs, y], batched=True, in_dims=[0, None], return_output=True),
                      "jacobian")
    same(jac, torch.stack([jacrev(F.add_into_y)(x, t(y)) for x in t(xs)]))
    same(wire.decode_tree(doc["output"]), want)


def test_batches_of_no_example_and_of_one(c):
    """test_vmap.py's batch sizes 0 and 1: vmap answers an empty batch (shapes from the
    example's), and one example keeps its batch dim, on every per-example endpoint; in_dims
    null beside it and out_dims moved as torch moves them."""
    y = rand(3)
    for n in (0, 1):
        xb = rand(n, 2, 3)
        for endpoint, transform in (("evaluate", F.pair_out), ("jacobian", jacrev(F.pair_out, argnums=(0, 1)))):
            options = {"argnums": [0, 1]} if endpoint == "jacobian" else {}
            got, _ = answer(post(c, "pair_out", endpoint, [xb, y], batched=True, in_dims=[0, None], out_dims=-1,
                                 **options), KEY.get(endpoint, endpoint))
            same(got, vmap(transform, in_dims=(0, None), out_dims=-1)(t(xb), t(y)))


def test_functions_returning_their_inputs_under_vmap_and_products(c):
    """f returning its inputs unchanged, swapped (test_vmap.py's identity cases,
    TestVjp / TestJvp of outputs that alias inputs): a shared input comes back expanded
    over the batch (out_dims 0) or once (out_dims null), its Jacobian the identity;
    vjp and jvp, one vector or a stack, with the output beside them."""
    xs, y = rand(4, 3), rand(3)
    for options, dims in (({}, 0), ({"out_dims": [None, 0]}, (None, 0))):
        got, _ = answer(post(c, "return_both", "evaluate", [xs, y], batched=True, in_dims=[0, None], **options), "output")
        same(got, vmap(F.return_both, in_dims=(0, None), out_dims=dims)(t(xs), t(y)))
    # torch's vmap cannot move the batch of an output that does not depend on it (y,
    # expanded) anywhere but dim 0: it expands y (3,) to (3, 4) with the batch's size
    # inserted at out_dim without the dim ("The expanded size of the tensor (4) must
    # match the existing size (3)"; for -1, a size read from garbage). The service
    # answers it as torch's out_dims=0, the batch moved, as for any other output.
    with pytest.raises(RuntimeError, match="expanded size"):
        vmap(F.return_both, in_dims=(0, None), out_dims=(1, -1))(t(xs), t(y))
    got, _ = answer(post(c, "return_both", "evaluate", [xs, y], batched=True, in_dims=[0, None], out_dims=[1, -1]),
                    "output")
    same(got, tuple(o.movedim(0, -1) for o in vmap(F.return_both, in_dims=(0, None))(t(xs), t(y))))
    got, _ = answer(post(c, "return_both", "jacobian", [xs, y], batched=True, in_dims=[0, None], argnums=1,
                         out_dims=[None, 0]), "jacobian")
    same(got, vmap(jacrev(F.return_both, argnums=1), in_dims=(0, None), out_dims=(None, 0))(t(xs), t(y)))
    x, v, w = rand(3), rand(3), rand(2, 3)
    out, tangent = jvp(F.return_both, (t(x), t(y)), (t(v), t(2 * v)))
    got, doc = answer(post(c, "return_both", "jvp", [x, y], argnums=[0, 1], tangents=[arr(v), arr(2 * v)],
                           return_output=True), "jvp")
    same((got, wire.decode_tree(doc["output"])), (tangent, out))
    got, _ = answer(post(c, "return_both", "vjp", [x, y], argnums=[0, 1], cotangents=[arr(w), arr(3 * w)],
                         batched_vectors=True), "vjp")
    same(got, vmap(vjp(F.return_both, t(x), t(y))[1])((t(w), t(3 * w))))


def test_a_tuple_output_with_an_integer_element_on_every_transport(c, sdk):
    """TestVjp / TestJvp: f returns (sin x, (x > 0).sum()). torch.func.jvp answers the
    integer output's tangent as integer zeros (a stack of them under vmap), and
    torch.func.vjp refuses the function; the service answers both as torch in JSON, .npz
    and the SDK, the refusal a 422 quoting torch's words (a 500 before round 21)."""
    x, v = rand(3), rand(2, 3)
    want = jvp(F.with_int_output, (t(x),), (t(v[0]),))
    got, doc = answer(post(c, "with_int_output", "jvp", [x], tangents=arr(v[0]), return_output=True), "jvp")
    same((wire.decode_tree(doc["output"]), got), want)
    got, _ = answer(post(c, "with_int_output", "jvp", [x], tangents=arr(v), batched_vectors=True), "jvp")
    same(got, vmap(lambda u: jvp(F.with_int_output, (t(x),), (u,))[1])(t(v)))
    with pytest.raises(RuntimeError, match="All outputs of f must be floating-point") as raised:
        vjp(F.with_int_output, t(x))
    says = str(raised.value)
    body = assert_problem(post(c, "with_int_output", "vjp", [x], cotangents=[arr(x), 1]), 422, "invalid_input")
    assert says in body["detail"], body
    buf = io.BytesIO()
    np.savez(buf, x=x, **{"cotangents/0": x, "cotangents/1": np.array(1)})
    r = c.post("/v1/functions/with_int_output/vjp", content=buf.getvalue(), headers={"content-type": wire.NPZ})
    assert says in assert_problem(r, 422, "invalid_input")["detail"]
    for transport in ("binary", "json"):
        same(sdk.jvp("with_int_output", x, tangents=v[0], transport=transport), want[1])
        with pytest.raises(InvalidInput, match="All outputs of f must be floating-point"):
            sdk.vjp("with_int_output", x, cotangents=(x, np.array(1)), transport=transport)


def test_empty_inputs_and_stacks_of_no_vectors_through_the_sdk(sdk):
    """TestJvp / TestVjp of zero-size tensors, and vmap over a stack of no vectors (an
    empty batch), on both of the SDK's transports, as torch answers them."""
    e, x, none = np.zeros(0, dtype="float32"), rand(3), np.zeros((0, 3), dtype="float32")
    for transport in ("binary", "json"):
        same(sdk.jvp("identity", e, tangents=e, transport=transport), jvp(F.identity, (t(e),), (t(e),))[1])
        same(sdk.vjp("identity", e, cotangents=e, transport=transport), vjp(F.identity, t(e))[1](t(e))[0])
        same(sdk.vjp("identity", x, cotangents=none, batched_vectors=True, transport=transport),
             vmap(vjp(F.identity, t(x))[1])(t(none))[0])
        same(sdk.jvp("identity", x, tangents=none, batched_vectors=True, transport=transport),
             vmap(lambda u: jvp(F.identity, (t(x),), (u,))[1])(t(none)))


# float() of a tensor under grad warns (once per process: the test failed when it ran first)
@pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")
@pytest.mark.parametrize("name", ["returns_float", "returns_none"])
def test_a_function_returning_no_tensor_is_its_error_on_every_endpoint(c, name):
    """test_vmap.py's non-tensor outputs: torch's vmap, jvp and vjp refuse a function
    returning a float or None; every endpoint, per example too, is the function's 500
    saying what it returned."""
    x, xs = rand(3), rand(2, 3)
    for transform in (vmap(getattr(F, name)), lambda a: jvp(getattr(F, name), (a,), (a,)),
                      lambda a: vjp(getattr(F, name), a)):
        with pytest.raises((ValueError, RuntimeError)):
            transform(t(xs))
    says = "the output is a float, not a tensor" if name == "returns_float" else "the output is None: no tensor"
    for endpoint, inputs, options in (("evaluate", [xs], {"batched": True}), ("jacobian", [xs], {"batched": True}),
                                      ("jvp", [x], {"tangents": arr(x)}), ("vjp", [x], {"cotangents": arr(x)})):
        body = assert_problem(post(c, name, endpoint, inputs, **options), 500, "function_error")
        assert body["detail"].startswith(says), body
