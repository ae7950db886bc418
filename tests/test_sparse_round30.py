"""Sparse derivatives, round 30: outputs coarser than the inputs, half-precision Hessians,
and the first sparse request's imports.

- A lone ``mode=auto`` sparse Jacobian whose output leaf is coarser than the inputs
  (float16 or bfloat16 of float32, float32 of float64) ran its JVPs (3 colours), had them
  proven no jacrev's (a JVP rounds that leaf's column) and answered by VJPs after: 8 calls
  of the function where reverse mode's answer takes 3, and 3 for 2 at every later request.
  Now reverse mode is chosen up front (sparsity.compute.jacobian_side).
- Reverse products' check took one measured round-off for every column: a bfloat16 leaf's
  arithmetic let a declared pattern missing a float64 leaf's sub-diagonal pass (a 200 of
  wrong values, mode=rev; mode=auto once it chose VJPs). Now each leaf's own.
- Sparse Hessians of float16 arithmetic: an acyclic colouring allowed by float64 inputs
  summed float16 roundings (54 to 138 entries of 120 to 280 off torch.func.hessian's), and
  star colouring's mirrored reads are torch's H[j, i], an ulp from its H[i, j] in 16 bits.
  Now torch.func.hessian's values bit for bit, as the dense /hessian's.
- The sparse modules (tracer, colourings, scipy.sparse) are imported at the engine's
  warm-up, not on the first sparse request (0.6-1.9 s on it, measured).

The real engine in-process (no server); answers are compared with torch.func.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from jacobian_service.engine.core import Engine
from jacobian_service.errors import InvalidInput
from jacobian_service.registry import FunctionSpec, Input
from jacobian_service.types import Call

from . import sparse28_functions as s28
from . import sparse30_functions as f

N = 40
RNG = np.random.default_rng(30)


def _spec(fn, dtype: str, name: str = "", sparsity=None) -> FunctionSpec:
    return FunctionSpec(
        name or f"{fn.__name__}_{dtype}",
        fn,
        (Input("x", shape=("n",), dtype=dtype),),
        sparsity=sparsity or {},
    )


def _call(
    spec: FunctionSpec,
    x: np.ndarray,
    dtype: str,
    mode: str = "auto",
    sparsity: str = "auto",
) -> Call:
    return Call(
        spec, [x], [dtype], mode=mode, sparsity=sparsity, deadline=time.monotonic() + 60
    )


def _jacrev(fn, x: torch.Tensor) -> np.ndarray:
    jac = torch.func.jacrev(fn)(x)
    return np.concatenate(
        [
            b.to(torch.float64).numpy()
            for b in ([jac] if isinstance(jac, torch.Tensor) else jac)
        ]
    )


@pytest.mark.parametrize(
    ("fn", "dtype"),
    [
        (f.arrow_half30, "float32"),
        (f.arrow_bf16_30, "float32"),
        (f.arrow_float30, "float64"),
        (f.arrow_half30, "float64"),
        (f.arrow_leaves30, "float64"),
    ],
)
def test_a_coarser_output_takes_vjps_up_front(fn, dtype):
    """A lone request: the forward pass, the trace and one VJP pass (a VJP a row and the
    check, vmapped): 3 calls, where the JVPs first made 8; the next request 2, not 3.
    Exactly jacrev's values."""
    n = 200
    engine = Engine(torch.device("cpu"), 1 << 30)
    spec = _spec(fn, dtype)
    for want_calls in (3, 2):
        x = RNG.uniform(0.5, 1.5, n).astype(dtype)
        f.CALLS.clear()
        r = engine.jacobian(_call(spec, x, dtype))
        calls = len(f.CALLS)
        m = r.value.shape[0]  # (one VJP a row: every row reads x[0])
        assert (
            calls == want_calls and r.mode == "rev" and r.sparse_meta["products"] == m
        ), (calls, r.mode)
        np.testing.assert_array_equal(
            r.value.toarray(), _jacrev(fn, torch.from_numpy(x))
        )


def test_an_output_in_the_inputs_dtype_keeps_its_jvps():
    """The same arrow in the inputs' dtype: 3 JVPs still (a guard)."""
    engine = Engine(torch.device("cpu"), 1 << 30)
    x = RNG.uniform(0.5, 1.5, 200)
    r = engine.jacobian(_call(_spec(f.arrow_same30, "float64"), x, "float64"))
    assert r.mode == "fwd" and r.sparse_meta["products"] == 3, r.sparse_meta
    want = _jacrev(f.arrow_same30, torch.from_numpy(x))
    np.testing.assert_allclose(
        r.value.toarray(), want, rtol=1e-12, atol=1e-12 * np.abs(want).max()
    )


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64"])
@pytest.mark.parametrize("missing", ["misses0", "misses1"])
@pytest.mark.parametrize("mode", ["rev", "auto"])
def test_a_declared_pattern_missing_a_fine_leafs_entries_is_refused_beside_coarse_leaves(
    mode, missing, dtype
):
    """A ring in float64, float32, float16 and bfloat16 arithmetic (round 28's leaves):
    the declared pattern missing the float64 or the float32 leaf's sub-diagonal is a 422
    (before, mode=rev: a 200 without those entries, the check's 6-7 % taken for the
    bfloat16 arithmetic's round-off); the right one holds, jacrev's values to the
    leaves' round-off."""
    engine = Engine(torch.device("cpu"), 1 << 30)
    spec = _spec(s28.leaves28, dtype, f"leaves28_{dtype}_{mode}", s28._declared(4))
    x = np.random.default_rng(2).standard_normal(N)  # (round 28's point)
    with pytest.raises(InvalidInput) as refused:
        engine.jacobian(_call(spec, x, dtype, mode, missing))
    assert refused.value.status == 422 and "misses nonzeros" in str(refused.value), (
        refused.value
    )
    r = engine.jacobian(_call(spec, x, dtype, mode, "ring"))
    want = _jacrev(s28.leaves28, torch.from_numpy(x).to(getattr(torch, dtype)))
    if (
        mode == "auto" and dtype == "bfloat16"
    ):  # (no leaf coarser than bfloat16 inputs: 2 JVPs, jacrev's to round-off)
        assert r.mode == "fwd" and r.sparse_meta["products"] == 2, r.sparse_meta
        tol = 4 * float(torch.finfo(torch.bfloat16).eps)
        np.testing.assert_allclose(
            r.value.toarray(), want, rtol=tol, atol=tol * np.abs(want).max()
        )
    else:
        assert r.mode == "rev" and r.sparse_meta["products"] == 8, r.sparse_meta
        np.testing.assert_array_equal(r.value.toarray(), want)


@pytest.mark.parametrize(
    ("fn", "dtype", "products"),
    [
        (f.half_band_energy30, "float64", 8),
        (f.half_band_energy30, "float32", 8),
        (f.half_grid_energy30, "float64", 5),
        (f.band_energy30, "float16", 8),
        (f.band_energy30, "bfloat16", 8),
        (f.half_grid_energy30, "float16", 5),
    ],
)
def test_a_half_precision_hessian_is_torch_hessians_bit_for_bit(fn, dtype, products):
    """torch.func.hessian's values exactly, as the dense /hessian's (before: float16
    arithmetic of wider inputs took an acyclic colouring, 3 to 6 products, whose
    substitution summed float16 roundings; float16 inputs had 3 to 6 entries read at
    their mirror, an ulp off). Each entry at its own column: the direct colouring, as
    many products as star colouring's."""
    engine = Engine(torch.device("cpu"), 1 << 30)
    spec = _spec(fn, dtype)
    for x in np.random.default_rng(3).uniform(0.5, 1.5, (2, N)):
        xt = torch.from_numpy(x).to(getattr(torch, dtype))
        r = engine.hessian(_call(spec, xt.double().numpy(), dtype))
        want = torch.func.hessian(fn)(xt).to(torch.float64).numpy()
        assert r.sparse_meta["products"] == products and not r.sparse_meta["notes"], (
            r.sparse_meta
        )
        np.testing.assert_array_equal(r.value.toarray().astype(np.float64), want)
        dense = engine.hessian(
            _call(spec, xt.double().numpy(), dtype, sparsity="dense")
        )
        np.testing.assert_array_equal(
            np.asarray(dense.value, dtype=np.float64).reshape(N, N), want
        )


def test_the_engines_warm_up_preloads_the_sparse_modules(monkeypatch, tmp_path):
    """An engine process's warm-up imports the tracer, colourings and scipy.sparse before
    it says ready (engine.sparse.preload): the first sparse request after it took 1.1-1.9
    s, the next 10-30 ms (in-process app, lorenz96 of 100 elements); with it 60-160 ms."""
    from jacobian_service.engine import sparse
    from jacobian_service.engine.process import EngineServer

    loaded: list[int] = []
    monkeypatch.setattr(sparse, "preload", lambda: loaded.append(1))
    server = SimpleNamespace(
        engine=SimpleNamespace(jacobian=lambda call: None), registry=[]
    )
    EngineServer.warm_up(server, tmp_path / "note", set())  # type: ignore[arg-type]
    assert loaded == [1]
    sparse.__dict__["preload"] = (
        sparse.preload
    )  # (the real one, below: monkeypatch restores it)
    monkeypatch.undo()
    sparse.preload()  # imports, and raises nothing
    import sys

    assert {
        "scipy.sparse",
        "scipy.sparse.csgraph",
        "jacobian_service.sparsity.compute",
    } <= set(sys.modules)


def test_the_in_process_apps_warm_up_preloads_them(monkeypatch):
    """The in-process engines' warm-up (engine_client) preloads them too, off its event loop."""
    from jacobian_service.engine import sparse

    from .conftest import ready_app

    loaded: list[int] = []
    monkeypatch.setattr(sparse, "preload", lambda: loaded.append(1))
    with ready_app("tests.sparse28_functions", warmup=True) as c:
        assert c.get("/readyz").status_code == 200
    assert loaded == [1]
