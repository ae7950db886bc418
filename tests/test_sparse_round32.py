"""Sparse derivatives, round 32: a grid's first colouring, a symmetric Jacobian's first reads.

- An acyclic colouring (a Hessian's, or a symmetric Jacobian's read by JVPs) ran three
  pure-Python greedy passes before the stencil's lattice colouring, which then beat them
  at the bound no acyclic colouring goes below: a 20 x 20 x 20 grid's 7-point stencil,
  0.27 CPU-s of passes for 7, 6, 6 colours where the lattice's 4 are the optimum. The
  lattice at that bound is now tried first, and then no pass runs.
- A symmetric Jacobian's first request coloured its graph twice: its rows (the plain
  colouring), then the same graph again as star colouring's distance-2 colouring (a
  periodic grid's tabu search each time: 0.5 of its 1.45 CPU-s).
- The first forward product in an engine imported torch's forward-AD decompositions
  (TorchScript: 0.27 CPU-s, seconds under load) inside a request: now at warm-up.

The real engine in-process (no server); answers are compared with torch.func.
"""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from jacobian_service.engine.core import Engine
from jacobian_service.registry import FunctionSpec, Input
from jacobian_service.sparsity import acyclic, coloring
from jacobian_service.sparsity.patterns import Pattern
from jacobian_service.types import Call


def _grid(shape: tuple[int, ...], periodic: bool) -> Pattern:
    """The 2d+1-point stencil's symmetric pattern on a grid (Dirichlet or periodic)."""
    idx = np.arange(int(np.prod(shape))).reshape(shape)
    rows, cols = [idx.ravel()], [idx.ravel()]
    for axis in range(len(shape)):
        for step in (1, -1):
            if periodic:
                rows.append(idx.ravel())
                cols.append(np.roll(idx, -step, axis).ravel())
            else:
                a = [slice(None)] * len(shape)
                b = [slice(None)] * len(shape)
                a[axis] = slice(max(0, -step), shape[axis] - max(0, step))
                b[axis] = slice(max(0, step), shape[axis] - max(0, -step))
                rows.append(idx[tuple(a)].ravel())
                cols.append(idx[tuple(b)].ravel())
    key = np.unique(np.concatenate(rows) * idx.size + np.concatenate(cols))
    return Pattern((idx.size, idx.size), key // idx.size, key % idx.size)


@pytest.fixture
def greedy_passes(monkeypatch):
    """The greedy acyclic passes run, counted."""
    runs = []
    real = acyclic.acyclic_colors

    def counted(*args, **kwargs):
        runs.append(0)
        return real(*args, **kwargs)

    monkeypatch.setattr(acyclic, "acyclic_colors", counted)
    return runs


@pytest.mark.parametrize("shape, colors", [((12, 12, 12), 4), ((30, 30), 3), ((5, 6, 7), 4)])
def test_a_grid_coloured_at_the_acyclic_bound_runs_no_greedy_pass(greedy_passes, shape, colors):
    p = _grid(shape, periodic=False)
    c = coloring.hessian_coloring(p, most_summed=acyclic.most_summed(2.0**-52))
    assert (c.mode, c.n_colors, c.strategy) == ("acyclic", colors, "acyclic_lattice")
    assert greedy_passes == []  # (3 passes before, then the same lattice)
    # its substitution recovers a random symmetric matrix of the pattern from H S exactly
    rng = np.random.default_rng(32)
    n = p.shape[0]
    upper = p.rows <= p.cols
    vals = rng.standard_normal(int(upper.sum()))
    H = np.zeros((n, n))
    H[p.rows[upper], p.cols[upper]] = vals
    H[p.cols[upper], p.rows[upper]] = vals
    B = H @ np.eye(colors)[c.colors]
    s = c.solve
    q = np.concatenate([[0.0], np.cumsum(s.sign * B.reshape(-1)[s.need])])
    got = np.where(s.direct, B.reshape(-1)[c.gather], s.sign_of * (q[s.hi] - q[s.lo]))
    np.testing.assert_allclose(got, H[p.rows, p.cols], rtol=1e-12, atol=1e-12)


def test_the_acyclic_bound_counts_the_pairs_forests():
    """A periodic 3-D 7-point stencil has 3 edges a vertex: edges / vertices + 1 = 4, but
    4 colours' six forests hold at most 3 n - 6 edges: 5 (no lattice tried at 4)."""
    p = _grid((8, 8, 8), periodic=True)
    active = np.ones(p.shape[0], bool)
    assert acyclic.acyclic_bound(p, active) == 5
    assert acyclic.acyclic_bound(_grid((8, 8, 8), periodic=False), active) == 4
    assert acyclic.acyclic_bound(_grid((50,), periodic=False), np.ones(50, bool)) == 2


def test_an_energys_hessian_on_a_grid_takes_the_lattice_without_greedy_passes(greedy_passes):
    def energy(u):
        p = torch.nn.functional.pad(u, (1, 1, 1, 1, 1, 1))
        lap = sum(p[tuple(slice(1 + (a == d) * s, p.shape[a] - 1 + (a == d) * s) for a in range(3))]
                  for d in range(3) for s in (1, -1)) - 6 * u
        return -(u * lap).sum() / 2 + (u**4).sum()

    n = 6
    spec = FunctionSpec("energy32", energy, (Input("u", shape=(n, n, n), dtype="float64"),))
    x = np.random.default_rng(1).standard_normal((n, n, n))
    res = Engine(torch.device("cpu"), 64 << 20).hessian(
        Call(spec, [x], ["float64"], sparsity="auto", deadline=time.monotonic() + 60))
    assert (res.mode, res.sparse_meta["products"]) == ("acyclic", 4)
    assert greedy_passes == []
    want = torch.func.hessian(energy)(torch.tensor(x)).reshape(n**3, n**3).numpy()
    np.testing.assert_allclose(res.value.toarray(), want, rtol=1e-10, atol=1e-10)


def _laplacian_roll(u):
    lap = sum(torch.roll(u, s, d) for d in range(3) for s in (1, -1)) - 6 * u
    return lap + u**3


def test_a_symmetric_jacobians_graph_is_coloured_once(monkeypatch):
    """A periodic 9 x 9 x 9 Laplacian (9 is no multiple of 7: greedy and the tabu search):
    its rows coloured once, that colouring reused for the star colouring's distance-2 one;
    the next request read by JVPs as symmetric, as jacrev computes it."""
    runs = []
    real = coloring.column_coloring

    def counted(*args, **kwargs):
        runs.append(0)
        return real(*args, **kwargs)

    monkeypatch.setattr(coloring, "column_coloring", counted)
    n = 9
    spec = FunctionSpec("laplacian32", _laplacian_roll, (Input("u", shape=(n, n, n), dtype="float64"),))
    engine = Engine(torch.device("cpu"), 64 << 20)
    rng = np.random.default_rng(2)
    modes = []
    for _ in range(2):
        x = rng.standard_normal((n, n, n))
        res = engine.jacobian(Call(spec, [x], ["float64"], sparsity="auto", mode="auto",
                                   deadline=time.monotonic() + 60))
        want = torch.func.jacrev(_laplacian_roll)(torch.tensor(x)).reshape(n**3, n**3).numpy()
        np.testing.assert_allclose(res.value.toarray(), want, rtol=1e-12, atol=1e-12)
        modes.append(res.mode)
    assert modes == ["rev", "symmetric"]
    assert len(runs) == 1, runs  # (2 before: the rows, then the star colouring's distance-2 again)


def test_the_preload_imports_torchs_forward_ad_decompositions():
    code = ("import sys; from jacobian_service.engine.sparse import preload; preload(); "
            "print('torch._decomp.decompositions_for_jvp' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "True", out.stderr[-2000:]


def test_a_trace_makes_few_passes_over_its_entries(monkeypatch):
    """A unary op's deps were added to an empty matrix (a copy) and every op's result made
    canonical and stripped of zeros again, a pass over its entries each: lorenz96 of 200
    elements, 83 passes removing zeros where none were; 13 now. Its pattern is jacrev's."""
    import scipy.sparse._compressed as compressed
    from jacobian_service.examples import lorenz96
    from jacobian_service.sparsity.detect import trace_jacobian

    passes = []
    real = compressed.csr_eliminate_zeros

    def counted(*args):
        passes.append(0)
        return real(*args)

    monkeypatch.setattr(compressed, "csr_eliminate_zeros", counted)
    x = torch.rand(200, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    p = trace_jacobian(lorenz96, [x])
    rows, cols = np.nonzero(torch.func.jacrev(lorenz96)(x).numpy())
    assert np.array_equal(p.rows, rows) and np.array_equal(p.cols, cols)
    assert len(passes) <= 20, len(passes)
