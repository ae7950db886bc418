"""PyTorch's own torch.func test cases, round 20, replayed over HTTP against
tests/parity20_functions.py and compared with in-process torch.func (values, shapes,
dtypes; torch's error where torch raises).

1. TestHessian over an op without forward-mode AD (index_reduce, test_ops.py's
   jacfwd/hessian skips): reverse over reverse's answer, forward over reverse tried
   once per function on the dense and sparse routes, not at every request; where its
   error is the answer, this request's own.
2. TestJacfwd over a custom autograd.Function without a vmap rule: jacfwd fails (a vmap
   failure, not a missing forward AD), which must not keep the function's later
   requests, on any route, off forward mode.

One in-process app serves the module (no server start), as rounds 7-19.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import pytest
import torch
from torch.func import grad, hessian, jacfwd, jacrev, jvp

from . import parity20_functions as F
from .conftest import assert_problem, ready_app
from .test_parity_round7 import answer, post, same, t

pytestmark = pytest.mark.filterwarnings("ignore:index_reduce.. is in beta")


@pytest.fixture(scope="module")
def c() -> Iterator[Any]:
    with ready_app("tests.parity20_functions") as client:
        yield client


def _runs(c: Any) -> float:
    """How many times the module's functions ran under a jvp so far."""
    return float(answer(post(c, "jvp_runs", "evaluate", [np.zeros(1)]), "output")[0])


def _dense(matrix: Any) -> np.ndarray:
    return np.asarray(matrix.todense())


def test_the_hessian_of_an_op_without_forward_ad_tries_forward_mode_once(c):
    """index_reduce has no forward AD: torch.func.hessian raises, reverse over reverse
    answers (jacrev(jacrev)). The dense /hessian ran its check against one
    forward-over-reverse HVP at every request (failing: 1 jvp run each), the sparse one
    its forward-over-reverse products, vmapped then one by one (2 each), for the same
    reverse-over-reverse answer. The profile now keeps it (hvp_forward) for both."""
    x = np.array([[0.3, -1.2], [0.7, 0.1], [0.5, 0.2]])
    with pytest.raises(NotImplementedError, match="forward AD"):
        hessian(F.reduced)(t(x))
    want = jacrev(jacrev(F.reduced))(t(x))
    assert want.abs().sum() > 0
    flat = want.numpy().reshape(6, 6)
    before = _runs(c)
    got, doc = answer(post(c, "reduced", "hessian", [x], sparsity="auto"), "hessian")
    same(_dense(got), flat)
    first = _runs(c)
    assert first > before  # forward over reverse was tried, and failed
    for _ in range(2):
        got, _ = answer(post(c, "reduced", "hessian", [x], sparsity="auto"), "hessian")
        same(_dense(got), flat)
    assert _runs(c) == first  # not again on the sparse route
    got, _ = answer(post(c, "reduced", "hessian", [x]), "hessian")  # a new signature: torch's own once,
    same(got, want)  # its error kept for the check of reverse over reverse's answer
    once = _runs(c)
    assert once <= first + 1
    for _ in range(2):
        got, _ = answer(post(c, "reduced", "hessian", [x * 0.5]), "hessian")
        same(got, jacrev(jacrev(F.reduced))(t(x * 0.5)))
    assert _runs(c) == once  # not again on the dense route


def test_where_forward_over_reverse_is_skipped_its_error_is_still_this_requests_answer(c):
    """A Function with neither jvp nor vmap rule whose backward cuts its graph where
    x[0] > 0: reverse over reverse misses part of the Hessian there, which the check
    against jacrev's differences sees, and the answer is torch's error. Once forward
    over reverse was skipped for the function (it failed before for want of forward
    AD), that error is still the one this request's own products raise."""
    keeps = np.linspace(-1.6, -0.6, 5)
    cuts = -keeps
    got, _ = answer(post(c, "cut_where_positive", "hessian", [keeps], sparsity="auto"), "hessian")
    g = jacrev(F.cut_where_positive, chunk_size=1)
    eps = 1e-6
    want = torch.stack([(g(t(keeps) + eps * e) - g(t(keeps) - eps * e)) / (2 * eps)
                        for e in torch.eye(5, dtype=torch.float64)])
    same(_dense(got), want.numpy(), rtol=1e-6)
    with pytest.raises(NotImplementedError) as caught:
        jvp(grad(F.cut_where_positive), (t(cuts),), (t(cuts),))
    error = f"NotImplementedError: {str(caught.value).splitlines()[0]}"
    doc = assert_problem(post(c, "cut_where_positive", "hessian", [cuts], sparsity="auto"), 500, "function_error")
    assert doc["detail"] == error, doc


def test_a_jacfwd_that_fails_under_vmap_for_one_input_leaves_forward_mode_to_the_others(c):
    """jacfwd of a custom Function with a jvp but no vmap rule fails ('You tried to vmap
    over _CubeNoVmap'), jacrev runs: mode=fwd answers jacrev's. The dense route then
    marked forward mode failed for the whole function, so its other inputs (plain x ** 3,
    where jacfwd runs) got reverse mode from then on, dense and sparse alike
    (meta.mode "rev"). Only a failure saying forward AD is missing is remembered now."""
    long = np.array([0.3, -1.2, 0.7, 0.45])
    with pytest.raises(RuntimeError, match="vmap"):
        jacfwd(F.cube_no_vmap_past_3)(t(long))
    want = jacrev(F.cube_no_vmap_past_3)(t(long))
    got, doc = answer(post(c, "cube_no_vmap_past_3", "jacobian", [long], mode="fwd"), "jacobian")
    same(got, want)
    assert doc["meta"]["mode"] == "rev"
    x = long[:3]
    want = jacfwd(F.cube_no_vmap_past_3)(t(x))
    for mode in ("fwd", "auto"):
        for options in ({}, {"sparsity": "auto"}):
            got, doc = answer(post(c, "cube_no_vmap_past_3", "jacobian", [x], mode=mode, **options), "jacobian")
            same(got if not options else _dense(got).reshape(want.shape), want)
            assert doc["meta"]["mode"] == "fwd", (mode, options, doc["meta"])
