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
from torch.func import jacfwd, jacrev

from . import parity20_functions as F
from .conftest import ready_app
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
