"""Sparse Hessians, round 18: the colouring's quality on stencils. Greedy acyclic
colouring in every order (ours, and SparseMatrixColorings.jl's) leaves the 5-point
stencil's Hessian 4 products where 3 do, the 3-D 7-point one 6 where 4 do; a lattice
colouring reaches both. Each answer against torch.func.hessian in this process.

One in-process app serves every case (no new server process).
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from jacobian_service.sparsity.coloring import hessian_coloring
from jacobian_service.sparsity.patterns import Pattern
from tests import sparse18_functions as s18

from .conftest import ready_app


@pytest.fixture(scope="module")
def client():
    with ready_app("tests.sparse18_functions") as c:
        yield c


def csr(doc, key):
    j = doc[key]
    return sp.csr_array((j["data"], j["indices"], j["indptr"]), shape=j["shape"])


@pytest.mark.parametrize("name, shape, products", [
    ("grid_energy", (6, 6), 3),
    ("grid_energy", (7, 9), 3),
    ("cube_energy", (4, 5, 6), 4),
])
def test_a_stencils_hessian_takes_the_fewest_products(client, name, shape, products):
    """A membrane's energy on a 6 x 6 grid (its Hessian the 5-point stencil): 4 HVPs
    (acyclic, smallest-last), where ``(column + row) mod 3`` is an acyclic colouring;
    on a 4 x 5 x 6 box (the 7-point stencil): 6 where 4 do. Now 3 and 4 (no acyclic
    colouring of a graph with ``E`` edges on ``V`` vertices uses fewer than
    ``E / V + 1`` colours: these are the fewest), and the Hessian is torch's."""
    u = np.random.default_rng(18).standard_normal(shape)
    r = client.post(f"/v1/functions/{name}/hessian", json={"inputs": [u.tolist()], "sparsity": "auto"})
    assert r.status_code == 200, r.text
    meta = r.json()["meta"]
    assert (meta["mode"], meta["products"]) == ("acyclic", products), meta
    want = torch.func.hessian(getattr(s18, name))(torch.from_numpy(u)).reshape(u.size, u.size).numpy()
    got = csr(r.json(), "hessian").toarray()
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)
    assert set(zip(*np.nonzero(want))) <= set(zip(*csr(r.json(), "hessian").nonzero()))


def _pattern(m: sp.sparray) -> Pattern:
    m = sp.coo_array(m)
    m.sum_duplicates()
    return Pattern(m.shape, m.row.astype(np.int64), m.col.astype(np.int64))


def _band(n: int, w: int) -> sp.sparray:
    return sp.diags_array([np.ones(n - abs(k)) for k in range(-w, w + 1)], offsets=list(range(-w, w + 1)), shape=(n, n))


@pytest.mark.parametrize("case, colours", [
    ("band5", 6), ("band10", 11), ("arrowhead", 2), ("grid9", 5), ("random", None),
])
def test_the_hessian_colouring_keeps_its_bounds(case, colours):
    """SparseMatrixColorings.jl's ``test/theory.jl`` bounds (a band of 2w off-diagonals:
    w + 1 acyclic colours) and the others' best stay as they were; the 9-point stencil's
    6 greedy colours are now 5; and every colouring the lattice finds recovers the
    matrix exactly (a random symmetric one's values, from its products)."""
    rng = np.random.default_rng(5)
    if case.startswith("band"):
        m = _band(200, int(case[4:]))
    elif case == "arrowhead":
        m = sp.lil_array((60, 60))
        m.setdiag(1)
        m[0, :], m[:, 0] = 1, 1
    elif case == "grid9":
        t = sp.diags_array([np.ones(9), np.ones(10), np.ones(9)], offsets=[-1, 0, 1])
        m = sp.kron(t, t)
    else:
        a = sp.random_array((150, 150), density=0.03, rng=rng)
        m = a + a.T + sp.eye_array(150)
    p = _pattern(m)
    c = hessian_coloring(p, most_summed=4096)
    if colours is not None:
        assert c.n_colors == colours, c.describe()
    # recover a random symmetric matrix of this pattern from its products H S
    vals = rng.standard_normal(p.nnz)
    h = sp.coo_array((vals, (p.rows, p.cols)), shape=p.shape).toarray()
    h = h + h.T
    seeds = np.zeros((p.shape[0], c.n_colors))
    seeds[np.flatnonzero(c.colors >= 0), c.colors[c.colors >= 0]] = 1.0
    b = (h @ seeds).reshape(-1)
    if c.solve is None:
        got = b[c.gather]
    else:
        s = c.solve
        q = np.concatenate([[0.0], np.cumsum(s.sign * b[s.need])])
        got = np.where(s.direct, b[c.gather], s.sign_of * (q[s.hi] - q[s.lo]))
    np.testing.assert_allclose(got, h[p.rows, p.cols], rtol=1e-9, atol=1e-9)


# ------------------------------------------------------------------ Householder reflectors


def test_householder_reflectors_are_traced_one_at_a_time(client):
    """``ormqr`` (Q^T C of fixed QR factors, as a least-squares solver applies Q) and
    ``householder_product`` (Q itself) were unknown ops: every output on every input,
    exact false, ``unknown op ormqr: assumed dense``, one product per output or input (30
    for a 3 x 5 x 2 C). Now each reflector is applied as the rank-one update it is:
    ormqr's answer column on its own column of C (5 products: a column's 5 rows),
    householder_product's Q
    on its own batch's reflectors; both exact, the values jacrev's."""
    c = np.random.default_rng(1).standard_normal((3, 5, 2))
    r = client.post("/v1/functions/reflected/jacobian", json={"inputs": [c.tolist()], "sparsity": "auto"})
    assert r.status_code == 200, r.text
    meta = r.json()["meta"]
    assert meta["exact"] is True and meta["products"] == 5, meta
    want = torch.func.jacrev(s18.reflected)(torch.from_numpy(c)).reshape(c.size, c.size).numpy()
    np.testing.assert_allclose(csr(r.json(), "jacobian").toarray(), want, rtol=1e-12, atol=1e-12)

    rng = np.random.default_rng(2)
    a, tau = rng.standard_normal((2, 4, 2)), rng.uniform(0.5, 1.5, (2, 2))
    r = client.post("/v1/functions/orthogonal/jacobian",
                    json={"inputs": [a.tolist(), tau.tolist()], "sparsity": "auto", "argnums": [0, 1]})
    assert r.status_code == 200, r.text
    meta = r.json()["meta"]
    assert meta["exact"] is True and not any("unknown op" in n for n in meta["notes"]), meta
    ta, tt = torch.from_numpy(a), torch.from_numpy(tau)
    ja, jt = torch.func.jacrev(s18.orthogonal, argnums=(0, 1))(ta, tt)
    want = np.concatenate([ja.reshape(16, 16).numpy(), jt.reshape(16, 4).numpy()], 1)
    got = csr(r.json(), "jacobian").toarray()
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    assert not got[:8, 8:16].any() and not got[8:, :8].any()  # (each batch on its own factors)


# ------------------------------------------------------------------ segment reductions


@pytest.mark.parametrize("lengths", [[2, 0, 4, 1], [7, 0, 0, 0]])
def test_a_segment_reduction_reads_its_segment(client, lengths):
    """``torch.segment_reduce`` (per-molecule sums over atoms) was an unknown op: every
    output on every input, exact false (``unknown op segment_reduce: assumed dense``),
    8 VJPs for 8 outputs. Now each output reads its own segment's elements (a max:
    the segment, a conservative choice), exact: one VJP; the lengths come from a
    non-differentiated input, so another request's lengths get their own pattern, and
    the values are jacrev's."""
    x = np.random.default_rng(3).standard_normal((7, 2))
    r = client.post("/v1/functions/segment_energy/jacobian",
                    json={"inputs": [x.tolist(), lengths], "sparsity": "auto", "argnums": [0]})
    assert r.status_code == 200, r.text
    meta = r.json()["meta"]
    assert meta["exact"] is True and meta["products"] == 1, meta
    want = torch.func.jacrev(s18.segment_energy)(torch.from_numpy(x), torch.tensor(lengths)).reshape(8, 14).numpy()
    np.testing.assert_allclose(csr(r.json(), "jacobian").toarray(), want, rtol=1e-12, atol=1e-12)


def test_a_lattice_too_long_for_float32_is_refused_before_its_substitution(monkeypatch):
    """In float32 an entry may be solved from 64 products at most; a 100 x 100 grid's
    lattice colouring has two-coloured paths ~200 long, so it is refused. Each such
    candidate was refused only after the substitution's pure-Python walk of its trees
    (five here; 3.5 s on a 300 x 300 grid, where the colouring took 0.3 s); now by its
    trees' sizes before the walk (a path's longest subtree is half of it at least),
    where they are more than twice the limit, and the star colouring stands."""
    from jacobian_service.sparsity import acyclic

    walks = []
    real = acyclic.substitution
    monkeypatch.setattr(acyclic, "substitution", lambda p, colors: walks.append(1) or real(p, colors))
    t = sp.diags_array([np.ones(99), np.ones(100), np.ones(99)], offsets=[-1, 0, 1])
    grid = sp.kron(sp.eye_array(100), t) + sp.kron(t, sp.eye_array(100))
    p = _pattern(grid)
    active = np.ones(p.shape[0], bool)
    assert acyclic.lattice_colors(p, active, 5, 64) is None and len(walks) <= 1  # (5 walks before)
    walks.clear()
    found = acyclic.lattice_colors(p, active, 5, 4096)  # (float64: the first lattice is taken)
    assert found is not None and int(found[0].max()) + 1 == 3 and walks == [1]
