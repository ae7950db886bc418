"""Gaps, round 1: plain Hessians of vector outputs measured by output rows too; a tuple
of one array as .npy; non-integral JSON numbers for integer inputs.

(1) Plain (not per-example) Hessians of a vector output measured only torch's
``jacfwd(jacrev)`` and ``jacrev(jacrev)`` (the latter skipped past 16 outputs), never
``jacrev_rows``, which per-example Hessians run: lorenz96 on 40 inputs took 35 ms as
torch's, 14 ms by rows; polar on 20 inputs 15 ms and 1.3 ms (float64, one thread,
in-process). Now the measurement includes it; answers equal torch.func.hessian's to
float64 round-off, and ``meta.mode`` says which ran.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from torch.utils import _pytree as pytree

from jacobian_service import examples as ex
from jacobian_service.engine import hessian as hessian_mod
from jacobian_service.engine.core import Engine
from jacobian_service.registry import FunctionSpec, Input
from jacobian_service.types import Call

RNG = np.random.default_rng(20261207)


def polar_of_one(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return ex.polar(x, x.flip(0))


ROWS_WIN = {
    # name: (function, inputs): vector outputs where rows win by 2.5x or more on the CPU
    "lorenz96": (ex.lorenz96, 40),
    "polar_of_one": (polar_of_one, 20),
}


@pytest.mark.parametrize("name", sorted(ROWS_WIN))
def test_plain_hessians_of_a_vector_output_measure_rows(name, monkeypatch):
    """The first Hessian of a signature measures jacrev_rows with torch's, every
    strategy's answer equal to torch.func.hessian's; rows, 2.5x faster or more here,
    is the one kept (meta.mode). Before: only jacfwd_jacrev ran (40 outputs) or
    jacfwd_jacrev and jacrev_jacrev (polar, 40 outputs: skipped too)."""
    fn, n = ROWS_WIN[name]
    spec = FunctionSpec(name, fn, (Input("x", shape=("n",), dtype="float64"),))
    x = RNG.uniform(-2, 2, n)
    want = pytree.tree_leaves(torch.func.hessian(fn)(torch.from_numpy(x)))
    ran: list[str] = []
    strategies = dict(hessian_mod.STRATEGIES)

    def watched(name_: str):
        def make(g, a):
            inner = strategies[name_](g, a)

            def run(*p):
                ran.append(name_)
                return inner(*p)
            return run
        return make

    monkeypatch.setattr(hessian_mod, "STRATEGIES", {k: watched(k) for k in strategies})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # (timings as measured above, whatever else the machine runs)
    try:
        engine = Engine(torch.device("cpu"), 256 << 20)
        results = [engine.hessian(Call(spec, [x], ["float64"], deadline=time.monotonic() + 60)) for _ in range(2)]
    finally:
        torch.set_num_threads(threads)
    assert "jacrev_rows" in ran and "jacfwd_jacrev" in ran, ran
    for r in results:
        assert r.mode == "jacrev_rows", r.mode
        got = pytree.tree_leaves(r.value)
        assert len(got) == len(want)
        for g_, w in zip(got, want):
            np.testing.assert_allclose(np.asarray(g_), w.numpy(), rtol=1e-12, atol=1e-14)
    # the second ran the strategy kept, alone (no measuring)
    assert ran[-1] == "jacrev_rows" and ran.count("jacrev_rows") == 3, ran
