"""PyTorch's own torch.func test cases, round 14, replayed over HTTP against
tests/parity14_functions.py and compared with in-process torch.func (values, shapes,
dtypes; torch's error where torch raises).

TestHessian's checks (``hessian(f)(x)`` against torch's reference) at points where f
is not twice differentiable: the answer is ``torch.func.hessian``'s whatever the
service measured fastest at other points before.

One in-process app serves the module (no server start), as rounds 7-13.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
import torch

from . import parity14_functions as F
from .conftest import ready_app
from .test_parity_round7 import answer, arr, post, same, t

f = torch.func


@pytest.fixture(scope="module")
def c() -> Iterator[Any]:
    with ready_app("tests.parity14_functions") as client:
        yield client


def engine(c) -> Any:
    return c.app.service_state.engines.workers[0].worker.engine


KINK = np.array([0.0, 1.0, -1.0])  # prelu_energy's gradient has a kink at 0
SMOOTH = np.array([0.3, 1.0, -1.0])


@pytest.mark.parametrize("strategy", ["jacrev_grad", "jacrev_jacrev"])
def test_a_hessian_at_a_kink_is_torchs_whatever_was_measured_before(c, strategy):
    """The first Hessian of a function and shapes measures the strategies and keeps the
    fastest (README); each is checked against one HVP there, so at a point where they
    disagree torch's own is answered. Measured at a smooth point (where all agree, and
    reverse over reverse may well win), the kept strategy answered every later point:
    at x = [0, 1, -1] the Hessian's [0, 0] was 0.6 where torch.func.hessian says 1 (and
    a server whose first request was that x answered 1). Now an answer that is not
    torch's own strategy's is checked against one HVP at its own inputs."""
    table = engine(c).profiles["prelu_energy"].hessian
    want_smooth = f.hessian(F.prelu_energy)(t(SMOOTH))
    got, _ = answer(post(c, "prelu_energy", "hessian", [SMOOTH]), "hessian")
    same(got, want_smooth, rtol=1e-12)
    for key in list(table._d):  # whichever won here: the one reverse mode takes the kink with
        table[key] = strategy
    want = f.hessian(F.prelu_energy)(t(KINK))
    assert want[0, 0] == 1 and f.jacrev(f.grad(F.prelu_energy))(t(KINK))[0, 0] == pytest.approx(0.6)
    got, doc = answer(post(c, "prelu_energy", "hessian", [KINK]), "hessian")
    same(got, want, rtol=1e-12)
    assert doc["meta"]["mode"] == "jacfwd_jacrev"
    # the strategy kept stays the function's fast one where it agrees
    got, doc = answer(post(c, "prelu_energy", "hessian", [SMOOTH]), "hessian")
    same(got, want_smooth, rtol=1e-12)
    assert doc["meta"]["mode"] == strategy


def test_hessians_stacked_from_several_requests_are_each_torchs(c):
    """Hessian requests of one function arriving together are stacked into one
    per-example call (request batching), which checked its first example alone, once
    per signature: a request at a tie stacked behind one at a smooth point was
    answered jacrev(grad)'s Hessian, 2 off where torch.func.hessian (and the same
    request sent alone) answers. A request's answer does not depend on what it was stacked with:
    every stacked request's Hessian is checked against one HVP at its own inputs."""
    smooth, tie = np.array([1.0, 0.5, 0.3, 1.0]), np.array([1.0, 0.5, 1.0, 0.3])
    xs = [smooth, tie, smooth * 2, tie * 3]
    assert not torch.allclose(f.hessian(F.fmax_pairs)(t(tie)), f.jacrev(f.grad(F.fmax_pairs))(t(tie)))
    answer(post(c, "fmax_pairs", "hessian", [smooth]), "hessian")  # measures the strategies, alone
    with ThreadPoolExecutor(5) as pool:
        busy = pool.submit(post, c, "hold", "evaluate", [np.float64(0.6)])
        time.sleep(0.2)  # the engine holds: the Hessians queue behind it and leave as one batch
        sent = []
        for x in xs:  # in this order: the stack's first example, which was checked, is at a smooth point
            sent.append(pool.submit(post, c, "fmax_pairs", "hessian", [x]))
            time.sleep(0.05)
        assert busy.result().status_code == 200
        responses = [s.result() for s in sent]
    for x, response in zip(xs, responses):
        got, _ = answer(response, "hessian")
        same(got, f.hessian(F.fmax_pairs)(t(x)), rtol=1e-12)
    assert max(r.json()["meta"]["batch_size"] for r in responses) > 1


def test_a_per_example_hessian_at_a_tie_is_vmap_of_torchs(c):
    """vmap(torch.func.hessian(f)) answers each example's forward-over-reverse Hessian;
    the service checked only the first example of a signature against one HVP, once,
    so the second example, at a tie of fmax, was answered jacrev(grad)'s, 2 off. Now
    every example is checked, in_dims and out_dims laid out after."""
    smooth, tie = np.array([1.0, 0.5, 0.3, 1.0]), np.array([1.0, 0.5, 1.0, 0.3])
    xb = np.stack([smooth * 3, tie, smooth, tie * 2])
    want = f.vmap(f.hessian(F.fmax_pairs))(t(xb))
    assert not torch.allclose(want, f.vmap(f.jacrev(f.grad(F.fmax_pairs)))(t(xb)))
    got, _ = answer(post(c, "fmax_pairs", "hessian", [xb], batched=True), "hessian")
    same(got, want, rtol=1e-12)
    got, _ = answer(post(c, "fmax_pairs", "hessian", [xb.T], batched=True, in_dims=1, out_dims=-1), "hessian")
    same(got, f.vmap(f.hessian(F.fmax_pairs), in_dims=1, out_dims=-1)(t(xb.T)), rtol=1e-12)


def test_jacobian_rows_checked_at_other_rows_are_checked_again(c):
    """TestJac's chunk_size cases with cdist, whose pullback torch's vmap gets right at
    some rows and wrong at others of the same count: vmap's rows were checked once per
    signature and rows per chunk, so once rows 1:3 (right) had passed, chunk_size=2's
    chunks 0:2 and 2:4 (wrong: torch's own jacrev(chunk_size=2) is too) were answered
    unchecked, the result depending on chunk_size (README: it never does). A streamed
    .npy's calibration (chunks 0:1, 1:3, 3:4) led there the same way. Now each chunk's
    rows are checked once, and the answer is the row loop's, jacrev(chunk_size=1)'s."""
    x = np.random.default_rng(14).standard_normal((2, 3))
    want = f.jacrev(F.cdist, chunk_size=1)(t(x))
    assert not torch.allclose(f.jacrev(F.cdist, chunk_size=2)(t(x)), want)
    got, _ = answer(post(c, "cdist", "jacobian", [x], rows=[1, 3]), "jacobian")
    same(got, want.reshape(4, 2, 3)[1:3], rtol=1e-12)
    for chunk in (2, 4, None):
        got, _ = answer(post(c, "cdist", "jacobian", [x], chunk_size=chunk), "jacobian")
        same(got, want, rtol=1e-12)


def test_stacked_one_hot_cotangents_are_checked_every_time(c):
    """TestVjp's batched cotangents (vmap of a vjp) with cdist: torch's vmap of its
    pullback is right for the one-hot cotangents of rows 1:3 and wrong for rows 0:2, 2:4
    and dense ones. vmap's products were checked once per signature and batch size, so
    after a stack of rows 1:3 had passed, rows 0:2 were answered wrong (a 200, rows of
    the wrong output). A stack holding zeros is checked every time now, and a dense one
    is not taken on a sparse one's pass; each answer is one vjp per cotangent."""
    x = np.random.default_rng(14).standard_normal((2, 3))
    _, pullback = f.vjp(F.cdist, t(x))
    basis = np.eye(4).reshape(4, 2, 2)
    for cots in (basis[1:3], basis[0:2], basis[2:4], np.random.default_rng(1).standard_normal((2, 2, 2))):
        want = torch.stack([pullback(v)[0] for v in t(cots)])
        got, _ = answer(post(c, "cdist", "vjp", [x], cotangents=arr(cots), batched_vectors=True), "vjp")
        same(got, want, rtol=1e-12)
    assert not torch.allclose(f.vmap(pullback)(t(basis[0:2]))[0], torch.stack([pullback(v)[0] for v in t(basis[0:2])]))
