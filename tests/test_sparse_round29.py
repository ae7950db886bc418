"""Sparse derivatives, round 29: mixed-dtype outputs in a batch, and in the dense fallback.

Round 28 held each output row of the pattern check to the coarser of its leaf's dtype
and the inputs' (a float16 leaf rounds its share of the random product), for a request
alone. What a user still saw (in-process engine, a ring of n = 40 as float64, float32,
float16 and bfloat16 leaves, float64 input, 3 requests batched): the batch's check had no
leaf dtypes, proved the right pattern wrong at every point, and each member ran again
alone: 6 calls of the function (12 the first time) with mode=rev, where 2 answer them;
with mode=auto the batch went to each alone before its products (the VJP colouring takes
8 products to the JVPs' 2, though alone those JVPs are proven no jacrev's and VJPs answer
after them): 7 calls. And where the products prove a pattern wrong (computed densely),
the dense Jacobian's (and a float16 energy's dense Hessian's) check ran at the inputs'
round-off: jacrev's right vmapped rows were taken for wrong ones and the derivative
computed again row by row (the Hessian then 2e-3 off torch.func.hessian's).

The real engine in-process (no server); answers are compared with torch.func.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import pytest
import torch
from jacobian_service.engine.core import Engine
from jacobian_service.registry import FunctionSpec, Input
from jacobian_service.types import Call

from . import sparse29_functions as f

N = 40
RNG = np.random.default_rng(29)
ROW_BY_ROW = "row by row"  # (sparsity.dense's warning when it takes vmap's rows for wrong ones)


def _spec(fn) -> FunctionSpec:
    return FunctionSpec(fn.__name__, fn, (Input("x", shape=("n",), dtype="float64"),))


def _call(spec: FunctionSpec, x: np.ndarray, mode: str = "auto") -> Call:
    return Call(spec, [x], ["float64"], mode=mode, sparsity="auto", deadline=time.monotonic() + 60)


def _jacrev(fn, x: np.ndarray) -> np.ndarray:
    jac = torch.func.jacrev(fn)(torch.from_numpy(x))
    return np.concatenate([b.to(torch.float64).numpy() for b in ([jac] if isinstance(jac, torch.Tensor) else jac)])


@pytest.mark.parametrize("mode", ["rev", "auto"])
def test_a_batch_of_mixed_dtype_leaves_runs_as_one(mode):
    """After one request alone (detection), batches of 3: the first checks vmap over the
    points at each (one call each), then one vmapped forward pass and one vmapped VJP
    answer all three: 2 calls (before: 6 for mode=rev, each member proven wrong and run
    again alone; 7 for auto, each alone at once). Every answer exactly jacrev's."""
    engine = Engine(torch.device("cpu"), 1 << 30)
    spec = _spec(f.leaves29)
    engine.jacobian(_call(spec, RNG.standard_normal(N), mode))
    for first in (True, False):
        xs = [RNG.standard_normal(N) for _ in range(3)]
        f.CALLS.clear()
        results = engine.run_batch("jacobian", [_call(spec, x, mode) for x in xs])
        # (the first: 5, or 2 where vmap over these points was checked for the function already)
        assert len(f.CALLS) <= (5 if first else 2), (mode, first, len(f.CALLS))
        for r, x in zip(results, xs):
            np.testing.assert_array_equal(r.value.toarray(), _jacrev(f.leaves29, x))
            assert r.mode == "rev" and r.sparse_meta["products"] == 8 and not r.sparse_meta["notes"], r.sparse_meta


def test_a_dense_jacobian_of_mixed_leaves_keeps_jacrevs_vmapped_rows(caplog):
    """The traced pattern misses column 0, the products prove it wrong: jacrev's dense
    answer, its vmapped rows checked against one VJP held to each leaf's round-off (the
    float16 rows' own). Before: held to float64's, computed again one VJP a row."""
    engine = Engine(torch.device("cpu"), 1 << 30)
    x = RNG.standard_normal(N)
    with caplog.at_level(logging.WARNING, logger="jacobian_service.sparsity"):
        r = engine.jacobian(_call(_spec(f.wrong_leaves29), x))
    assert any(n.startswith("the products proved this pattern wrong") for n in r.sparse_meta["notes"]), r.sparse_meta
    np.testing.assert_array_equal(r.value.toarray(), _jacrev(f.wrong_leaves29, x))
    assert not [m.getMessage() for m in caplog.records if ROW_BY_ROW in m.getMessage()]


def test_a_float16_energys_hessian_keeps_vmap(caplog):
    """A float16-arithmetic energy of float64 inputs whose traced Hessian pattern misses
    x[0]'s coupling. The first point: computed densely, torch.func.hessian's values
    exactly, its vmapped columns checked at float16's round-off (before: at float64's,
    taken for wrong and computed again row by row by reverse over reverse, 2e-3 off
    torch.func.hessian's). The second, over the widened pattern: its vmapped
    Hessian-vector products checked at float16's round-off too (before: float64's, vmap
    taken for wrong for this function and shapes, every later request's products one at
    a time: 6 calls of the function where 2 answer it)."""
    engine = Engine(torch.device("cpu"), 1 << 30)
    spec = _spec(f.wrong_half_energy29)
    with caplog.at_level(logging.WARNING, logger="jacobian_service.sparsity"):
        # (points where vmap's batched float16 sums were an ulp off one product's: at 4 in 8)
        for i, x in enumerate(np.random.default_rng(0).uniform(0.5, 1.5, (3, N))[1:]):
            f.CALLS.clear()
            r = engine.hessian(_call(spec, x))
            calls = len(f.CALLS)
            want = torch.func.hessian(f.wrong_half_energy29)(torch.from_numpy(x)).to(torch.float64).numpy()
            if i == 0:
                assert any(n.startswith("the products proved this pattern wrong") for n in r.sparse_meta["notes"])
                np.testing.assert_array_equal(r.value.toarray(), want)
            else:
                # (4 star-coloured products: float16 arithmetic, so no acyclic colouring's
                # substitution, which summed float16 roundings (round 30); entries read at
                # their mirror are torch's H[j, i], an ulp or two from its H[i, j] in float16)
                assert calls == 2 and r.sparse_meta["products"] == 4, (calls, r.sparse_meta)
                tol = 8 * torch.finfo(torch.float16).eps * np.abs(want).max()
                np.testing.assert_allclose(r.value.toarray(), want, rtol=0, atol=tol)
    warned = [m.getMessage() for m in caplog.records]
    assert not [w for w in warned if ROW_BY_ROW in w or "one product at a time" in w], warned


def test_a_symmetric_jacobian_of_a_coarser_output_keeps_its_vjps(caplog):
    """A symmetric Jacobian (a Laplacian's) whose output is float32 of float64 inputs:
    its VJPs are exact to float64 and symmetric, but JVPs read as symmetric would round
    each column to float32, and the VJP that checks JVPs proves them no jacrev's. Before:
    the first request sent the function to that reading, the second paid its JVPs, the
    VJP and the VJPs again (7 calls, not 2), logged as 'not symmetric at this point'. Now
    every request takes its 5 VJPs: 2 calls, exactly jacrev's."""
    engine = Engine(torch.device("cpu"), 1 << 30)
    spec = _spec(f.float32_laplacian29)
    with caplog.at_level(logging.INFO, logger="jacobian_service.sparsity"):
        for i in range(3):
            x = RNG.uniform(0.5, 1.5, 64)
            f.CALLS.clear()
            r = engine.jacobian(_call(spec, x))
            if i:
                assert len(f.CALLS) == 2 and r.mode == "rev" and r.sparse_meta["products"] == 5, (len(f.CALLS), r.mode)
            np.testing.assert_array_equal(r.value.toarray(), _jacrev(f.float32_laplacian29, x))
    assert not [m.getMessage() for m in caplog.records if "symmetric" in m.getMessage()]
