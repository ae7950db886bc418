"""Sparse derivatives, round 31: refusals at every point, float32 arithmetic inside.

- A detection refused at its work limit (413) was remembered for its point only: the same
  function and shapes at another point (an integrator's next step) traced again to the
  limit, 8-10 s of the engine for each 413 (lorenz96 of 10^6 elements). A trace refused
  before it read any input value ran the same ops at every point: now refused at once at
  any point (compute._ANY_POINT); a function that branched on a value first is still
  detected at each point.
- A float64 function computing in float32 inside (``x.float()`` ... ``.double()``) ran
  its JVPs in ``mode=auto``, had them proven no jacrev's (float32 rounding, checked at
  float64's) and answered by VJPs after: 9 calls of the function where reverse mode takes
  3 or 4. The tracer now records the arithmetic's dtype (``Pattern.arithmetic``) and auto
  takes VJPs up front.

The real engine in-process (no server); answers are compared with torch.func.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from jacobian_service.engine.core import Engine
from jacobian_service.errors import ResultTooLarge
from jacobian_service.registry import FunctionSpec, Input
from jacobian_service.types import Call

from . import sparse31_functions as f

# A memory budget whose detection work limit (8 x budget / 16 entries: 2,097,152) a
# 1,000-element wide_chain31 passes (1,461 entries handled per element) and a 2,000-element
# one does not.
BUDGET = 4 << 20
N_REFUSED = 2000


def _spec(fn, dtype: str = "float64", tag: str = "") -> FunctionSpec:
    # (refusals are remembered per engine process, by function name: each test its own)
    return FunctionSpec(f"{fn.__name__}_{dtype}{tag}", fn, (Input("x", shape=("n",), dtype=dtype),))


def _call(spec: FunctionSpec, x: np.ndarray, dtype: str = "float64", mode: str = "auto") -> Call:
    return Call(spec, [x], [dtype], mode=mode, sparsity="auto", deadline=time.monotonic() + 60)


def _jacrev(fn, x: torch.Tensor) -> np.ndarray:
    return torch.func.jacrev(fn)(x).to(torch.float64).numpy()


def test_a_refusal_before_any_value_read_holds_at_every_point():
    """The first point is traced to the limit (2 calls: the forward pass and the trace);
    two other points are refused at once: their forward pass only, the same 413."""
    engine = Engine(torch.device("cpu"), BUDGET)
    spec = _spec(f.wide_chain31, tag="_points")
    rng = np.random.default_rng(31)
    words = []
    for want_calls in (2, 1, 1):
        f.CALLS.clear()
        with pytest.raises(ResultTooLarge) as refused:
            engine.jacobian(_call(spec, rng.standard_normal(N_REFUSED)))
        assert refused.value.status == 413 and len(f.CALLS) == want_calls, (len(f.CALLS), refused.value)
        words.append(str(refused.value))
    assert "costs too much" in words[0] and words[0] == words[1] == words[2]


def test_a_refusal_for_its_work_holds_under_another_result_limit():
    """A request whose result limit differs (a batch's, a streamed .npy's, GET
    .../sparsity's) has another entry limit but the same work limit: refused at once too."""
    engine = Engine(torch.device("cpu"), BUDGET)
    spec = _spec(f.wide_chain31, tag="_limits")
    rng = np.random.default_rng(17)
    for want_calls, limit in ((2, None), (1, 1 << 20), (1, 600_000)):  # (entry limits 262,144, 131,072, 75,000)
        call = _call(spec, rng.standard_normal(N_REFUSED))
        call.max_result_bytes = limit
        f.CALLS.clear()
        with pytest.raises(ResultTooLarge) as refused:
            engine.jacobian(call)
        assert "costs too much" in str(refused.value) and len(f.CALLS) == want_calls, (len(f.CALLS), limit)


def test_a_refusal_after_a_value_read_is_its_points_own():
    """A function that branches on x[0] first: refused where it takes the chain, answered
    where it takes the square (jacrev's diagonal), and refused again, traced (2 calls), at
    a new point of the chain."""
    engine = Engine(torch.device("cpu"), BUDGET)
    spec = _spec(f.branching_chain31)
    rng = np.random.default_rng(7)
    chain = np.abs(rng.standard_normal(N_REFUSED)) + 0.1
    with pytest.raises(ResultTooLarge):
        engine.jacobian(_call(spec, chain))
    square = -chain
    r = engine.jacobian(_call(spec, square))
    np.testing.assert_array_equal(r.value.toarray(), _jacrev(f.branching_chain31, torch.from_numpy(square)))
    f.CALLS.clear()
    with pytest.raises(ResultTooLarge):
        engine.jacobian(_call(spec, chain + 0.5))
    assert len(f.CALLS) == 2, len(f.CALLS)


_W = [torch.randn(500, 500, dtype=torch.float64, generator=torch.Generator().manual_seed(i)) / 25 for i in range(2)]


def dense_layers31(x):
    """Two dense layers: at 500 wide the second's pattern product reads, for each of its
    250,000 weights, a row of 500 entries (every input): 125 M steps for 250,000 entries."""
    for w in _W:
        x = torch.tanh(w[: x.numel(), : x.numel()] @ x)
    return x


def test_under_the_limit_the_chain_is_answered():
    """A guard: the same chain at 1,000 elements is detected and is jacrev's.

    And a sparse product's steps count as detection work, not only its entries: a dense
    layer over an intermediate that depends on every input costs n^3 steps for n^2
    entries, inside scipy (no deadline check). At 500 wide the second layer's product ran
    (125 M steps, passed as ~1.5 M entries under this budget's 2.1 M); 2,000 wide, 6
    layers, the default budget: 95 CPU-s of the engine, then a 4 M-entry dense pattern;
    3,000 wide, 20 layers: minutes. Counted before it runs (32 steps an entry), it is
    refused there; at 200 wide (8 M steps) the same layers are answered, as jacrev."""
    engine = Engine(torch.device("cpu"), BUDGET)
    x = np.random.default_rng(3).standard_normal(1000) * 0.5
    r = engine.jacobian(_call(_spec(f.wide_chain31), x))
    want = _jacrev(f.wide_chain31, torch.from_numpy(x))
    np.testing.assert_allclose(r.value.toarray(), want, rtol=1e-12, atol=1e-13)
    assert r.sparse_meta["products"] < 40, r.sparse_meta
    with pytest.raises(ResultTooLarge) as refused:
        engine.jacobian(_call(_spec(dense_layers31), np.random.default_rng(5).standard_normal(500)))
    assert refused.value.status == 413 and "a sparse product's 32 steps" in str(refused.value), str(refused.value)
    x = np.random.default_rng(6).standard_normal(200)
    r = engine.jacobian(_call(_spec(dense_layers31, tag="_small"), x))
    np.testing.assert_allclose(r.value.toarray(), _jacrev(dense_layers31, torch.from_numpy(x)), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("fn", [f.arrow_f32_inside31, f.arrow_cast_only31])
def test_float32_arithmetic_of_float64_inputs_takes_vjps_up_front(fn):
    """The forward pass, the trace and the VJPs (one a row, vmapped): 3 calls, where JVPs
    first made 8 (arithmetic) or 5 (a cast); the next request 2, not 3. jacrev's values
    exactly."""
    engine = Engine(torch.device("cpu"), 1 << 30)
    spec = _spec(fn)
    rng = np.random.default_rng(11)
    for want_calls in (3, 2):
        x = rng.uniform(0.5, 1.5, 200)
        f.CALLS.clear()
        r = engine.jacobian(_call(spec, x))
        assert len(f.CALLS) == want_calls and r.mode == "rev", (len(f.CALLS), r.mode, r.sparse_meta)
        assert r.sparse_meta["products"] == 200 and not r.sparse_meta["notes"], r.sparse_meta
        np.testing.assert_array_equal(r.value.toarray(), _jacrev(fn, torch.from_numpy(x)))


def test_a_float32_constant_keeps_its_jvps():
    """A guard: a float32 constant (no input in it) is no coarse arithmetic: 3 JVPs,
    jacrev's to round-off."""
    engine = Engine(torch.device("cpu"), 1 << 30)
    x = np.random.default_rng(5).uniform(0.5, 1.5, 200)
    r = engine.jacobian(_call(_spec(f.arrow_f32_constant31), x))
    assert r.mode == "fwd" and r.sparse_meta["products"] == 3, r.sparse_meta
    want = _jacrev(f.arrow_f32_constant31, torch.from_numpy(x))
    np.testing.assert_allclose(r.value.toarray(), want, rtol=1e-12, atol=1e-12 * np.abs(want).max())


def test_float32_inputs_in_float32_arithmetic_keep_their_jvps():
    """A guard: float32 arithmetic of float32 inputs is not coarser: 3 JVPs."""
    engine = Engine(torch.device("cpu"), 1 << 30)
    x = np.random.default_rng(6).uniform(0.5, 1.5, 200).astype(np.float32)
    r = engine.jacobian(_call(_spec(f.arrow_f32_inside31, "float32"), x, "float32"))
    assert r.mode == "fwd" and r.sparse_meta["products"] == 3, r.sparse_meta
