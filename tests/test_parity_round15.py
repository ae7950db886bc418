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

import httpx
import numpy as np
import pytest
import torch
from jacobian_client import Client, wire
from torch.func import hessian, jacrev, jvp, vjp, vmap

from . import parity15_functions as F
from .conftest import assert_problem, ready_app
from .test_parity_round7 import answer, arr, post, same, t, wire_tree

RNG = np.random.default_rng(15)
KEY = {"evaluate": "output"}


@pytest.fixture(scope="module")
def c() -> Iterator[Any]:
    with ready_app("tests.parity15_functions") as client:
        yield client


@pytest.fixture(scope="module")
def sdk(c) -> Iterator[Client]:
    """The SDK over the module's app (no socket)."""

    def forward(request: httpx.Request) -> httpx.Response:
        r = c.request(request.method, str(request.url.copy_with(scheme="http", host="testserver", port=None)),
                      content=request.content, headers=dict(request.headers))
        headers = {k: v for k, v in r.headers.items() if k.lower() not in ("content-encoding", "transfer-encoding")}
        return httpx.Response(r.status_code, headers=headers, content=r.content)

    with Client("http://sdk.test", http_transport=httpx.MockTransport(forward), max_retries=0) as client:
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
