"""PyTorch's own torch.func test cases, round 16, replayed over HTTP against
tests/parity16_functions.py and compared with in-process torch.func (values, shapes,
dtypes; torch's error where torch raises).

1. test_eager_transforms.py's TestJac / TestVjp cases (per-example Jacobians, plain
   Jacobians, stacks of cotangents) at values where torch's vmap of a pullback is wrong
   for some points and right for others of the same shapes (cdist where points
   coincide): no check's pass there may stand for other values.
2. test_vmap.py's out_dims=None for an output (or aux) that depends on shared inputs
   alone, through the SDK's torch adapter (``remote``) as in-process.

One in-process app serves the module (no server start), as rounds 7-15.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import pytest
import torch
from jacobian_client import Client, wire
from jacobian_client.torch import remote
from torch.func import jacrev, vmap

from . import parity16_functions as F
from .conftest import ready_app, sdk_over, torch_tree
from .test_parity_round7 import answer, post, same, t


@pytest.fixture(scope="module")
def c() -> Iterator[Any]:
    with ready_app("tests.parity16_functions") as client:
        yield client


def differences(f: Any, x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Central differences of f at x (float64): the Jacobian, output dims first."""
    cols = [(f(x + eps * e) - f(x - eps * e)) / (2 * eps) for e in torch.eye(x.numel(), dtype=x.dtype)]
    return torch.stack(cols, -1)


def test_every_example_of_a_per_example_jacobian_is_checked(c):
    """vmap(jacrev(f)) of cdist is wrong (1.0 off) at an example with two distinct
    points, right at one whose points all coincide: the service checked the first
    example alone against one VJP, once per signature, so [[0, 0], [0, 1]] answered the
    second example 1.0 off with a 200, and so did every later request of that shape
    ([[0, 1], [1, 0]] after [[0, 0], [0, 0]]). Each example is jacrev(f, chunk_size=1)'s
    (the SPEC: the result never depends on chunk_size), which central differences
    confirm; torch's own vmap(jacrev(f)) is the wrong one."""
    f = F._self_distances
    xs = np.array([[0.0, 0.0], [0.0, 1.0]])
    want = torch.stack([jacrev(f, chunk_size=1)(x) for x in t(xs)])
    assert not torch.allclose(vmap(jacrev(f))(t(xs)), want)  # torch's vmap: the second example off
    assert torch.allclose(want[1], differences(f, t(xs[1])), atol=1e-6)
    got, _ = answer(post(c, "self_distances", "jacobian", [xs], batched=True), "jacobian")
    same(got, want, rtol=1e-12)
    # a later request of the same signature, after one whose examples all pass
    later = np.array([[0.0, 1.0], [1.0, 0.0]])
    answer(post(c, "self_distances_later", "jacobian", [np.zeros((2, 2))], batched=True), "jacobian")
    got, _ = answer(post(c, "self_distances_later", "jacobian", [later], batched=True), "jacobian")
    same(got, torch.stack([jacrev(f, chunk_size=1)(x) for x in t(later)]), rtol=1e-12)



def test_a_jacobian_whose_rows_were_checked_at_zeros_is_checked_again(c):
    """TestJac's plain jacrev of cdist: a Jacobian's row chunks were checked once per
    signature and rows, and a first request where all points coincide (x = [0, 0, 0],
    a Jacobian of zeros, which vmap gets right) passed, so x = [0, 1, 2] was answered
    torch's vmap's rows, 1.0 off jacrev(chunk_size=1) and central differences, with a
    200. A pass over zeros alone is not kept; the answer is the row loop's."""
    f = F._self_distances
    zeros, x = np.zeros(3), np.array([0.0, 1.0, 2.0])
    want = jacrev(f, chunk_size=1)(t(x))
    assert not torch.allclose(jacrev(f)(t(x)), want) and torch.allclose(want, differences(f, t(x)), atol=1e-6)
    got, _ = answer(post(c, "self_distances_plain", "jacobian", [zeros]), "jacobian")
    same(got, jacrev(f, chunk_size=1)(t(zeros)), rtol=1e-12)
    got, _ = answer(post(c, "self_distances_plain", "jacobian", [x]), "jacobian")
    same(got, want, rtol=1e-12)


def test_every_stack_of_cotangents_is_checked(c):
    """TestVjp's batched cotangents (vmap of a vjp) with cdist: torch's vmap of its
    pullback over dense cotangents is right where all points coincide and wrong where
    some do, at the same shapes. A stack was checked once per signature and batch size,
    so after x = [0, 0, 0] had passed, x = [0, 1, 2] and [0, 1, 0] were answered 5.7
    and 6.0 off with a 200; each answer is one vjp per cotangent, JSON and .npz alike."""
    f = F._self_distances
    cots = np.random.default_rng(16).standard_normal((2, 3, 3))
    for x in ([0.0, 0.0, 0.0], [0.0, 1.0, 2.0], [0.0, 1.0, 0.0]):
        _, pullback = torch.func.vjp(f, torch.tensor(x, dtype=torch.float64))
        want = torch.stack([pullback(v)[0] for v in t(cots)])
        got, _ = answer(post(c, "self_distances_vjp", "vjp", [np.array(x)], cotangents=cots.tolist(),
                             batched_vectors=True), "vjp")
        same(got, want, rtol=1e-12)
    r = c.post("/v1/functions/self_distances_vjp/vjp", headers={"Accept": "application/x-npz"},
               json={"inputs": [{"dtype": "float64", "shape": [3], "data": [1.0, 0.0, 1.0]}],
                     "cotangents": {"dtype": "float64", "shape": [2, 3, 3], "data": cots.tolist()},
                     "batched_vectors": True})
    assert r.status_code == 200, r.text
    _, pullback = torch.func.vjp(f, torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64))
    same(wire.read_result_npz(r.content)[0]["vjp"], torch.stack([pullback(v)[0] for v in t(cots)]), rtol=1e-12)


@pytest.fixture(scope="module")
def sdk(c) -> Iterator[Client]:
    """The SDK over the module's app (no socket)."""
    with sdk_over(c) as client:
        yield client


def test_an_output_of_shared_inputs_alone_is_unbatched_under_vmap(c, sdk):
    """test_vmap.py's out_dims=None (test_out_dims_none, test_nested_out_dims): an output
    that depends on no batched input is unbatched under vmap, and out_dims=None takes it.
    The SDK's torch adapter said every output of a remote function was batched, so
    vmap(remote(f), in_dims=(0, None), out_dims=(0, None)) raised torch's "can not return
    a BatchedTensor when out_dim is None" where vmap(f, ...) answers; per-example evaluate
    requests now say which outputs torch's vmap left unbatched (meta.unbatched), JSON and
    .npz alike."""
    xs, w = np.arange(6.0).reshape(3, 2) - 2, np.array([0.5, -1.5])
    body = {"inputs": [xs.tolist(), w.tolist()], "batched": True, "in_dims": [0, None]}
    r = c.post("/v1/functions/scaled_and_weight/evaluate", json=body)
    assert r.status_code == 200 and r.json()["meta"]["unbatched"] == [False, True], r.text
    r = c.post("/v1/functions/scaled_and_weight/evaluate", json=body, headers={"Accept": "application/x-npz"})
    assert r.status_code == 200 and wire.read_result_npz(r.content)[1]["unbatched"] == [False, True]
    r = c.post("/v1/functions/scaled_and_weight/evaluate", json={**body, "in_dims": 0, "inputs": [xs.tolist()] * 2})
    assert r.json()["meta"]["unbatched"] == [False, False]
    assert "unbatched" not in c.post("/v1/functions/scaled_and_weight/evaluate",
                                     json={"inputs": [w.tolist(), w.tolist()]}).json()["meta"]

    f = remote(sdk, "scaled_and_weight")
    for out_dims in ((0, None), 0, (None, None), (1, None)):
        try:
            want = vmap(F.scaled_and_weight, in_dims=(0, None), out_dims=out_dims)(t(xs), t(w))
        except ValueError as exc:
            with pytest.raises(ValueError, match="out_dim is None"):
                vmap(f, in_dims=(0, None), out_dims=out_dims)(t(xs), t(w))
            assert "out_dim is None" in str(exc)
            continue
        same(torch_tree(vmap(f, in_dims=(0, None), out_dims=out_dims)(t(xs), t(w))), want, rtol=1e-12)
    # nested: the inner vmap maps x, the outer nothing of w either
    xss = np.arange(12.0).reshape(2, 3, 2)
    nested = vmap(vmap(f, in_dims=(0, None), out_dims=(0, None)), in_dims=(0, None), out_dims=(0, None))
    want = vmap(vmap(F.scaled_and_weight, in_dims=(0, None), out_dims=(0, None)), in_dims=(0, None),
                out_dims=(0, None))(t(xss), t(w))
    same(torch_tree(nested(t(xss), t(w))), want, rtol=1e-12)
    # derivatives through it: the unbatched output's gradient counted once, not per example
    wt = t(w).requires_grad_()
    a, b = vmap(f, in_dims=(0, None), out_dims=(0, None))(t(xs), wt)
    (a.sum() + b.sum()).backward()
    w_ref = t(w).requires_grad_()
    a, b = vmap(F.scaled_and_weight, in_dims=(0, None), out_dims=(0, None))(t(xs), w_ref)
    (a.sum() + b.sum()).backward()
    same(torch_tree(wt.grad), w_ref.grad, rtol=1e-12)
    same(torch_tree(vmap(jacrev(lambda x, w: f(x, w)[0]), in_dims=(0, None))(t(xs), t(w))),
         vmap(jacrev(lambda x, w: F.scaled_and_weight(x, w)[0]), in_dims=(0, None))(t(xs), t(w)), rtol=1e-12)


def test_an_aux_of_shared_inputs_alone_is_unbatched_under_vmap(c, sdk):
    """The same for a has_aux function's aux: vmap(f, in_dims=(0, None), out_dims=(0,
    {"w2": None, "xs": 0})) takes the aux's w * 2 unbatched in-process, and raised for the
    remote f (meta.aux_unbatched, one boolean per aux leaf)."""
    xs, w = np.arange(6.0).reshape(3, 2) - 2, np.array([0.5, -1.5])
    r = c.post("/v1/functions/scaled_with_weight_aux/evaluate",
               json={"inputs": [xs.tolist(), w.tolist()], "batched": True, "in_dims": [0, None]})
    assert r.status_code == 200 and r.json()["meta"]["aux_unbatched"] == [True, False], r.text
    f = remote(sdk, "scaled_with_weight_aux")
    out_dims = (0, {"w2": None, "xs": 0})
    want = vmap(F.scaled_with_weight_aux, in_dims=(0, None), out_dims=out_dims)(t(xs), t(w))
    same(torch_tree(vmap(f, in_dims=(0, None), out_dims=out_dims)(t(xs), t(w))), want, rtol=1e-12)
    same(torch_tree(vmap(f, in_dims=(0, None))(t(xs), t(w))), vmap(F.scaled_with_weight_aux, in_dims=(0, None))(
        t(xs), t(w)), rtol=1e-12)
