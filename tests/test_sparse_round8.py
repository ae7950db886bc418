"""Sparse Jacobians and Hessians, round 8: Hessians by acyclic colouring (fewer products
than star colouring, entries recovered by substitution over the two-coloured trees),
triangular / LU / Cholesky solves with a fixed matrix and batched solves with a
state-dependent one traced exactly, ``meta.conservative`` for patterns that are a union
over the choices the values make, and what a scientist computes: finite-element
assembly, an upwinded shallow-water step, a neural ODE step with a sparse MLP,
functions of several inputs, patterns that follow the input's shape, concurrent first
requests. Every answer is compared with dense ``torch.func`` in this process (never a
nonzero missed).

One in-process app serves every case (no new server process).
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from starlette.testclient import TestClient

from jacobian_client import wire
from jacobian_service import create_app
from jacobian_service.settings import Settings
from jacobian_service.sparsity import Pattern, star_coloring, trace_hessian, trace_jacobian
from tests import sparse8_functions as s8

RNG = np.random.default_rng(8)


@pytest.fixture(scope="module")
def client():
    with TestClient(create_app(Settings(warmup=False, functions="tests.sparse8_functions"))) as c:
        yield c


def f64(x):
    return {"dtype": "float64", "shape": list(x.shape), "data": x.reshape(-1).tolist()}


def f32(x):
    return {"dtype": "float32", "shape": list(x.shape), "data": x.reshape(-1).tolist()}


def sparse(client, name, *xs, kind="jacobian", enc=f64, **options):
    r = client.post(f"/v1/functions/{name}/{kind}", json={"inputs": [enc(x) for x in xs], "sparsity": "auto", **options})
    assert r.status_code == 200, r.text
    doc = r.json()
    return wire.decode_sparse_json(doc[kind]), doc["meta"]


def jac(f, *xs, argnums=(0,)):
    """Dense jacrev in this process: (output elements) x (the argnums' elements, concatenated)."""
    ts = tuple(torch.from_numpy(x) for x in xs)
    blocks = torch.func.jacrev(lambda *a: f(*a).reshape(-1), argnums=argnums)(*ts)
    return torch.cat([b.reshape(b.shape[0], -1) for b in blocks], 1).numpy()


def hess(f, x):
    t = torch.from_numpy(x)
    return torch.func.hessian(f)(t).reshape(t.numel(), t.numel()).numpy()


def entries(J):
    coo = sp.coo_array(J)
    return set(zip(coo.row.tolist(), coo.col.tolist()))


def assert_matches(J, want, union=False, rtol=1e-12):
    """Values equal to dense torch's; every nonzero stored; with ``union`` false, nothing
    stored that is not a nonzero."""
    np.testing.assert_allclose(J.toarray(), want, rtol=rtol, atol=rtol)
    nonzero = set(zip(*np.nonzero(want)))
    stored = entries(J)
    assert nonzero <= stored, sorted(nonzero - stored)[:5]
    if not union:
        assert stored == nonzero, sorted(stored - nonzero)[:5]


# ------------------------------------------------------------------ acyclic colouring


def test_a_13_point_hessian_takes_fewer_products_by_acyclic_colouring(client):
    """A torus Laplacian's energy has a 13-point Hessian: star colouring took 15 to 19
    Hessian-vector products (19 at 6 x 7, 15 at 10 x 12). An acyclic colouring takes 10
    to 12, its off-diagonal entries solved by substitution over the two-coloured trees,
    and the Hessian is still torch.func.hessian's."""
    for shape, most in (((6, 7), 12), ((10, 12), 11)):
        u = RNG.uniform(-1, 1, shape)
        H, meta = sparse(client, "torus_energy13", u, kind="hessian")
        assert_matches(H, hess(s8.torus_energy13, u))
        star = star_coloring(trace_hessian(s8.torus_energy13, [torch.from_numpy(u)]))
        assert meta["mode"] == "acyclic" and meta["products"] <= most < star.n_colors, (meta["products"], star.n_colors)
        doc = client.get(f"/v1/functions/torus_energy13/sparsity?shapes={shape[0]},{shape[1]}&kind=hessian&dtypes=float64").json()
        assert doc["coloring"]["mode"] == "acyclic" and doc["coloring"]["strategy"].startswith("acyclic_")
        assert doc["products"] == meta["products"]


def _random_symmetric(n, density, rng):
    a = rng.random((n, n)) < density
    a = a | a.T | np.eye(n, dtype=bool)
    return Pattern.from_dense(a)


def _is_acyclic(p, colors):
    """Independently of the substitution's check: distance-1, and each pair of colours
    spans a forest (union-find over the edges' endpoints, per pair)."""
    parent = {}

    def find(x):
        while parent.setdefault(x, x) != x:
            x = parent[x]
        return x

    for i, j in zip(p.rows.tolist(), p.cols.tolist()):
        if i >= j:
            continue
        if colors[i] == colors[j]:
            return False
        pair = (min(colors[i], colors[j]), max(colors[i], colors[j]))
        a, b = find((pair, i)), find((pair, j))
        if a == b:
            return False
        parent[a] = b
    return True


def test_acyclic_colourings_recover_every_symmetric_matrix_exactly():
    """On random symmetric patterns (sparse to dense-ish), the greedy acyclic colouring is
    acyclic and distance-1, and the substitution gives back every entry of a random
    matrix with that pattern from its products H S alone; a colouring that is not
    acyclic is refused rather than decompressed."""
    from jacobian_service.sparsity.acyclic import substitution
    from jacobian_service.sparsity.coloring import acyclic_coloring
    from jacobian_service.sparsity.compute import _products

    for n, density in ((40, 0.03), (60, 0.06), (50, 0.15), (30, 0.5)):
        p = _random_symmetric(n, density, RNG)
        c = acyclic_coloring(p)
        assert c is not None and c.mode == "acyclic" and _is_acyclic(p, c.colors)
        values = RNG.standard_normal(p.nnz)
        h = sp.csr_array((values, (p.rows, p.cols)), shape=p.shape).toarray()
        h = h + h.T  # symmetric, on the pattern
        seeds = (c.colors[None, :] == np.arange(c.n_colors)[:, None]).astype(np.float64)  # (k, n)
        block = torch.from_numpy(seeds @ h)  # the k products, as the engine stacks them
        got = _products(p, c, [torch.zeros(n, dtype=torch.float64)], 1).values(p, block).numpy()
        np.testing.assert_allclose(got, h[p.rows, p.cols], rtol=1e-12, atol=1e-12)
    path = Pattern.from_dense(np.abs(np.subtract.outer(np.arange(12), np.arange(12))) <= 1)
    with pytest.raises(AssertionError, match="not acyclic|cycle|share a colour"):
        substitution(path, np.arange(12) % 2 * 0)  # every vertex one colour
    ring = Pattern.from_dense(np.isin(np.subtract.outer(np.arange(12), np.arange(12)) % 12, (0, 1, 11)))  # a 12-cycle, 2-coloured
    with pytest.raises(AssertionError, match="cycle"):
        substitution(ring, np.arange(12) % 2)


def test_long_float32_chains_keep_star_colouring_float64_ones_take_acyclic(client):
    """Substitution sums its tree's products: an entry of a 200-long path would carry 199
    products' round-off. In float32 that passes the bound (64): star colouring's 3
    products read each entry directly; in float64 (bound 4,096) the path takes 2."""
    from jacobian_service.sparsity.coloring import hessian_coloring

    x = RNG.uniform(-1, 1, 200)
    H32, meta32 = sparse(client, "chain", x.astype(np.float32), kind="hessian", enc=f32)
    assert meta32["mode"] == "star" and meta32["products"] == 3
    np.testing.assert_allclose(H32.toarray(), hess(s8.chain, x.astype(np.float32)), rtol=2e-5, atol=2e-3)
    H64, meta64 = sparse(client, "chain", x, kind="hessian")
    assert meta64["mode"] == "acyclic" and meta64["products"] == 2
    assert_matches(H64, hess(s8.chain, x), rtol=1e-11)
    p = trace_hessian(s8.chain, [torch.from_numpy(x)])
    assert hessian_coloring(p, most_summed=64).mode == "star" and hessian_coloring(p, most_summed=0).mode == "star"


def test_a_nan_product_does_not_spread_over_its_tree(client):
    """A NaN in one product (sqrt of a negative x[2] x[3]) would reach every entry solved
    through it by substitution; such products are recomputed by star colouring, so the
    NaN stays at the entries whose own value it is (torch.func.hessian spreads it over
    whole rows), and every other entry is torch's."""
    x = RNG.uniform(0.5, 1.5, 24)
    x[3] = -x[3]
    H, meta = sparse(client, "chain_sqrt", x, kind="hessian")
    want = hess(s8.chain_sqrt, x)
    got = H.toarray()
    assert meta["mode"] == "star" and meta["products"] == 3
    nan = set(zip(*np.nonzero(np.isnan(got))))
    assert nan and nan <= {(i, j) for i in (2, 3, 4) for j in (2, 3, 4)}, sorted(nan)
    finite = ~np.isnan(got) & ~np.isnan(want)
    np.testing.assert_allclose(got[finite], want[finite], rtol=1e-12, atol=1e-12)
    y = RNG.uniform(0.5, 1.5, 24)  # the same pattern, no NaN: acyclic again
    H, meta = sparse(client, "chain_sqrt", y, kind="hessian")
    assert meta["mode"] == "acyclic" and meta["products"] == 2
    assert_matches(H, hess(s8.chain_sqrt, y))


def test_large_hessians_skip_the_acyclic_passes(monkeypatch):
    """The acyclic passes tripled the first colouring of a 100,000-variable chain's
    Hessian (13 s more on a loaded machine) for a colouring substitution would not use:
    past 20,000 variables they are not run, and star colouring stands."""
    from jacobian_service.sparsity import acyclic, banded
    from jacobian_service.sparsity.coloring import hessian_coloring

    def never(*args, **kwargs):
        raise AssertionError("the acyclic passes ran")

    monkeypatch.setattr(acyclic, "acyclic_colors", never)
    p = banded(1, 1, hessian=True).build([(20_001,)], 1)
    c = hessian_coloring(p, most_summed=4096)
    assert c.mode == "star" and c.n_colors == 3


def test_an_acyclic_colouring_read_back_from_disk_and_over_two_inputs(tmp_path):
    """A restarted engine reads the colouring's colours from SPARSITY_CACHE_DIR and
    rebuilds (and re-checks) its substitution; the Hessian over two inputs (their
    elements concatenated) is coloured acyclically too."""
    from jacobian_service.sparsity import PatternCache, sparse_hessian

    u = torch.from_numpy(RNG.uniform(-1, 1, (6, 7)))
    first = sparse_hessian(s8.torus_energy13, [u], cache=PatternCache(tmp_path))
    again = sparse_hessian(s8.torus_energy13, [u + 0.1], cache=PatternCache(tmp_path))  # a fresh memory: the disk
    assert first.timings["cached"] == "" and again.timings["cached"] == "disk"
    assert again.mode == "acyclic" and again.n_products == first.n_products
    np.testing.assert_allclose(again.matrix.toarray(), hess(s8.torus_energy13, (u + 0.1).numpy()), rtol=1e-12, atol=1e-12)

    def two(a, b):
        return ((a[1:] * b[:-1]) ** 2).sum() + (a**4).sum() + (b**3 * a).sum()

    a, b = torch.from_numpy(RNG.uniform(-1, 1, 30)), torch.from_numpy(RNG.uniform(-1, 1, 30))
    r = sparse_hessian(two, [a, b], (0, 1), cache=PatternCache())
    want = torch.func.hessian(lambda w: two(w[:30], w[30:]))(torch.cat([a, b])).numpy()
    assert r.mode == "acyclic" and r.n_products == 2
    np.testing.assert_allclose(r.matrix.toarray(), want, rtol=1e-12, atol=1e-12)


def test_a_colouring_its_check_refuses_leaves_star_colouring(monkeypatch, client):
    """Were the acyclic passes ever to give a colouring that is not acyclic, its check
    raised out of the colouring: every Hessian of that pattern a 500. Star colouring
    now stands, and the Hessian is torch's."""
    from jacobian_service.sparsity import acyclic

    monkeypatch.setattr(acyclic, "acyclic_colors", lambda n, *args, **kwargs: np.zeros(n, np.int64))
    x = RNG.uniform(-1, 1, 11)
    H, meta = sparse(client, "chain", x, kind="hessian")
    assert meta["mode"] == "star" and meta["products"] == 3
    assert_matches(H, hess(s8.chain, x))


# ------------------------------------------------------------------ solves


def test_fixed_matrix_triangular_lu_and_cholesky_solves_are_exact(client):
    """solve_triangular, lu_solve and cholesky_solve with a fixed matrix were unknown ops
    ('assumed dense', exact: false: 12 products for three independent 4 x 4 blocks). They
    are now traced through the inverse's structure, as linalg.solve is: the blocks stay
    apart (4 products), a bidiagonal system's inverse lower triangular."""
    x = RNG.uniform(-1, 1, 12)
    for name, products in (("triangular_step", 12), ("lu_step", 4), ("cholesky_step", 4)):
        J, meta = sparse(client, name, x)
        assert meta["exact"] is True and meta["notes"] == [] and meta["products"] == products, (name, meta)
        assert_matches(J, jac(getattr(s8, name), x))
    J, _ = sparse(client, "triangular_step", x)
    assert entries(J) == {(i, j) for i in range(12) for j in range(i + 1)}
    # factors that follow the inputs: dense (a superset), and the note says why, not "unknown op"
    p = trace_jacobian(lambda v: torch.cholesky_solve(v[:, None], s8._CHOL + torch.diag(v))[:, 0], [torch.from_numpy(x)])
    assert not p.exact and p.nnz == 144 and p.notes == ("cholesky_solve with factors that depend on the inputs: assumed dense",)


def test_batched_systems_with_a_state_dependent_matrix_stay_block_diagonal(client):
    """One Newton step per cell, ``linalg.solve`` over a batch of 3 x 3 matrices that
    depend on the state: the solve was taken as dense (every cell on every other: 24
    products for 8 cells) and, its error check reading ``info``, value-dependent (every
    new point detected again). Now each cell's answer depends on its own cell (the rows
    of its matrix its row reaches, and its right-hand side): 3 products, one pattern for
    every point."""
    for shift, cached in ((0.0, None), (0.5, "memory")):
        u = RNG.uniform(-1, 1, (8, 3)) + shift
        J, meta = sparse(client, "cell_newton", u)
        assert meta["exact"] is True and meta["value_dependent"] is False and meta["notes"] == []
        assert meta["products"] == 3 and meta["cached"] == cached
        assert_matches(J, jac(s8.cell_newton, u))
    assert entries(J) == {(3 * c + i, 3 * c + j) for c in range(8) for i in range(3) for j in range(3)}


# ------------------------------------------------------------------ meta.conservative


def test_meta_says_when_the_pattern_is_a_union_over_choices(client):
    """A pattern kept over the choices the values make (a clamp's sides, both branches of
    a where on the velocity's sign) stores zeros where this point chose the other way:
    the docs said so, the answer did not. ``meta.conservative`` now says it, and a note
    names the ops; a plain stencil's pattern is not conservative."""
    u = RNG.uniform(-1, 1, 12)
    J, meta = sparse(client, "limited", u)
    want = jac(s8.limited, u)
    assert_matches(J, want, union=True)
    assert entries(J) != set(zip(*np.nonzero(want)))  # some clamp is saturated here: zeros stored
    assert meta["conservative"] is True and meta["exact"] is True and meta["value_dependent"] is False
    assert len(meta["notes"]) == 1 and "union over choices" in meta["notes"][0] and meta["notes"][0].endswith("(clamp)")
    J, meta = sparse(client, "stencil", u)
    assert meta["conservative"] is False and meta["notes"] == []
    assert_matches(J, jac(s8.stencil, u))
    doc = client.get("/v1/functions/limited/sparsity?shapes=12").json()
    assert doc["pattern"]["conservative"] is True


def test_the_openapi_document_names_the_new_meta(client):
    meta = client.get("/openapi.json").json()["components"]["schemas"]["Meta"]["properties"]
    assert meta["conservative"]["type"] == "boolean" and "acyclic" in meta["mode"]["description"]


# ------------------------------------------------------------------ a scientist's functions


def test_finite_element_assembly_matches_jacrev(client):
    """A P1 nonlinear-diffusion residual assembled with index_add over 60 triangles: the
    mesh's node graph (7 neighbours at most), a few products."""
    u = RNG.uniform(-1, 1, s8._NX * s8._NY)
    J, meta = sparse(client, "fem_residual", u)
    assert_matches(J, jac(s8.fem_residual, u))
    assert meta["exact"] is True and meta["conservative"] is False and meta["products"] <= 9


def test_finite_element_energy_hessian_by_acyclic_colouring(client):
    """The Hessian of an energy assembled over the mesh (index_add, then a dot product):
    torch.func.hessian's, from acyclic colouring's products."""
    u = RNG.uniform(-1, 1, s8._NX * s8._NY)
    H, meta = sparse(client, "fem_energy", u, kind="hessian")
    assert_matches(H, hess(s8.fem_energy, u))
    star = star_coloring(trace_hessian(s8.fem_energy, [torch.from_numpy(u)]))
    assert meta["mode"] == "acyclic" and meta["products"] < star.n_colors, (meta["products"], star.n_colors)


def test_upwinded_shallow_water_over_both_inputs(client):
    """An upwinded shallow-water step of (h, velocity): both inputs' columns, the where's
    branches both kept (conservative), nothing missed whatever the velocity's signs."""
    h, vel = RNG.uniform(1, 2, (8, 9)), RNG.uniform(-1, 1, (2, 8, 9))
    J, meta = sparse(client, "shallow_water", h, vel, argnums=[0, 1])
    want = jac(s8.shallow_water, h, vel, argnums=(0, 1))
    assert J.shape == (3 * 72, 3 * 72)
    assert_matches(J, want, union=True)
    assert meta["conservative"] is True and "(where)" in meta["notes"][-1] and meta["products"] <= 12
    Jv, _ = sparse(client, "shallow_water", h, vel, argnums=1)  # the velocity's columns alone
    assert_matches(Jv, jac(s8.shallow_water, h, vel, argnums=(1,)), union=True)


def test_neural_ode_step_with_a_sparse_mlp(client):
    """RK2 of a locally connected (masked) MLP: the masks' zeros are structure."""
    x = RNG.uniform(-1, 1, 16)
    J, meta = sparse(client, "neural_ode_step", x)
    assert_matches(J, jac(s8.neural_ode_step, x), rtol=1e-11)
    assert meta["exact"] is True and meta["products"] < 16


def test_several_inputs_each_argnum_sparse(client):
    x, k = RNG.uniform(-1, 1, 15), RNG.uniform(-1, 1, 15)
    for argnums, products in (([0, 1], 3), (1, 3), (0, 3)):
        J, meta = sparse(client, "two_inputs", x, k, argnums=argnums)
        nums = tuple(argnums) if isinstance(argnums, list) else (argnums,)
        assert_matches(J, jac(s8.two_inputs, x, k, argnums=nums))
        assert meta["products"] == products


def test_a_pattern_that_follows_the_shape_is_detected_per_shape(client):
    """The cache keys on the shapes: a stencil that widens from 10 elements is detected
    at each shape (3 then 5 products), and a shape seen before is served from the cache."""
    for n, products, cached in ((9, 3, None), (15, 5, None), (9, 3, "memory")):
        u = RNG.uniform(-1, 1, n)
        J, meta = sparse(client, "shape_stencil", u)
        assert_matches(J, jac(s8.shape_stencil, u))
        assert meta["products"] == products and meta["cached"] == cached


def test_concurrent_first_requests_detect_the_pattern_once(client, monkeypatch):
    """Four clients asking at once for a pattern nobody asked for yet: one detection
    (the engine runs them in one batch, or the later ones find it cached), four right
    answers."""
    from jacobian_service.sparsity import compute

    calls = []
    build = compute._build_pattern
    monkeypatch.setattr(compute, "_build_pattern", lambda *a, **k: calls.append(1) or build(*a, **k))
    points = [RNG.uniform(-1, 1, 37) for _ in range(4)]
    out = [None] * 4

    def ask(i):
        out[i] = sparse(client, "stencil", points[i])

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    for (J, _), x in zip(out, points):
        assert_matches(J, jac(s8.stencil, x))
