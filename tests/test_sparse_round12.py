"""Sparse Jacobians and Hessians, round 12: the limits of detection and colouring (a
periodic band past the colouring graph's limit, a pattern past the result limit on
GET as on POST), a float32 force symmetric at one point only, and what a scientist
computes (periodic finite-difference stencils in 2-D and 3-D, a kinetics network, a
bundle-adjustment residual, a graph network's message pass, patterns that follow the
values) through the service and the SDK into SciPy, against torch.func in this
process and finite differences.

One in-process app serves every case (no new server process), under a 1 MiB result
limit and a 4 MiB memory budget (so a colouring graph past 65,536 entries is past its
limit at a few thousand unknowns); the SDK reaches it through an httpx transport.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from jacobian_client import wire
from tests import sparse12_functions as s12

from .conftest import ready_app_with
from .test_sparse_round9 import f64, jac, sparse  # the round-9 helpers: an array's JSON, a request, torch's
from .test_sparse_round10 import sdk  # noqa: F401 (round 10's fixture: the SDK through this module's in-process app)
from .test_sparse_round11 import entries  # a sparse matrix's (row, column) set

RNG = np.random.default_rng(12)

#: The app's result limit and memory budget (the colouring graph's limit is budget / 64).
LIMIT = 1 << 20
BUDGET = 4 << 20


@pytest.fixture(scope="module")
def client():
    with ready_app_with("tests.sparse12_functions", max_result_bytes=LIMIT, memory_budget_bytes=BUDGET) as c:
        yield c


def products_agree(f, x, J, rtol=1e-12):
    """``J`` against torch's own JVP and VJP with random vectors (the dense Jacobian of
    a large input would not fit): ``J v`` and ``u^T J``."""
    t = torch.from_numpy(x)
    v, u = torch.from_numpy(RNG.standard_normal(x.size)), torch.from_numpy(RNG.standard_normal(J.shape[0]))
    _, jv = torch.func.jvp(f, (t,), (v.reshape(t.shape),))
    _, pull = torch.func.vjp(f, t)
    (uj,) = pull(u.reshape(f(t).shape))
    jv, uj = jv.reshape(-1).numpy(), uj.reshape(-1).numpy()
    np.testing.assert_allclose(J @ v.numpy(), jv, rtol=rtol, atol=rtol * np.abs(jv).max())
    np.testing.assert_allclose(J.T @ u.numpy(), uj, rtol=rtol, atol=rtol * np.abs(uj).max())


def problem(r, status, code):
    assert r.status_code == status and r.headers["content-type"].startswith("application/problem+json"), r.text
    doc = r.json()
    assert (doc["code"], doc["status"]) == (code, status), doc
    return doc


# ------------------------------------------------------------------ limits


def test_a_periodic_band_past_the_graph_limit_is_coloured_by_runs(client):
    """A periodic 5-wide band at n = 3,001 (not a multiple of 5): its column graph
    would hold 75,025 entries, past the limit (65,536 here; lorenz96 at n = 300,000
    meets the default's the same way: 50.7 M entries for 4.2 M, after 11 s of
    detection). It was a 413 after detection, though cutting the columns into runs of
    at most 5 colours it with 6, the fewest any colouring can use
    (ceil(n / floor(n / 5))): the graph was only ever needed to look for 5. Now GET
    .../sparsity and the POST colour it by runs, and the Jacobian is torch's."""
    n = 3_001
    d = client.get("/v1/functions/hyperburgers/sparsity", params={"shapes": str(n), "dtypes": "float64"})
    assert d.status_code == 200, d.text
    coloring = d.json()["coloring"]
    assert (coloring["colors"], coloring["lower_bound"], coloring["strategy"]) == (6, 5, "runs"), coloring
    x = RNG.uniform(0.5, 1.5, n)
    J, meta = sparse(client, "hyperburgers", x)
    assert (meta["products"], meta["nnz"], meta["exact"]) == (6, 5 * n, True), meta
    want = {(i, (i + k) % n) for i in range(n) for k in (-2, -1, 0, 1, 2)}
    assert entries(J) == want
    products_agree(s12.hyperburgers, x, J.tocsr())


def test_a_periodic_band_hessian_past_the_graph_limit_is_coloured(client):
    """The energy of a periodic chain with next-nearest springs at n = 3,001: its
    Hessian's column graph would hold 75,025 entries, past the limit (65,536), and the
    star colouring refused it before anything else was tried (a 413), though the
    greedy star passes need no such graph and the distance-2 colouring has its runs.
    Now it is answered from 5 acyclic-coloured products, torch's Hessian-vector
    products exactly."""
    n = 3_001
    x = RNG.uniform(0.5, 1.5, n)
    H, meta = sparse(client, "ring_energy", x, kind="hessian")
    assert meta["mode"] in ("star", "acyclic") and meta["products"] <= 6 and meta["nnz"] == 5 * n, meta
    assert entries(H) == {(i, (i + k) % n) for i in range(n) for k in (-2, -1, 0, 1, 2)}
    products_agree(torch.func.grad(s12.ring_energy), x, H.tocsr())


def test_get_and_post_word_a_pattern_over_the_result_limit_alike(client):
    """A pattern whose matrix is over the result limit (a ring followed by 300,000
    constant outputs: the CSR's row pointers alone take 1.2 MB): GET .../sparsity said
    'the result takes 1201414 bytes with its aux and output' (the engine's last check
    of what a function returns: it has neither) where the POST says what the result
    would take and what to ask for. Now both say it the POST's way, each with its own
    size (the pattern's ones are int8), before the matrix is built; COO has no row
    pointers and fits."""
    n, m = 100, 100 + 300_000
    r = client.get("/v1/functions/padded/sparsity", params={"shapes": str(n), "dtypes": "float64"})
    doc = problem(r, 413, "result_too_large")
    assert doc["detail"] == f"the result would take {2 * n * 5 + (m + 1) * 4} bytes; the limit is {LIMIT}. Ask for a smaller input."
    r = client.post("/v1/functions/padded/jacobian", json={"inputs": [f64(np.ones(n))], "sparsity": "auto"})
    doc = problem(r, 413, "result_too_large")
    assert doc["detail"] == f"the result would take {2 * n * 12 + (m + 1) * 4} bytes; the limit is {LIMIT}. Ask for a smaller input."
    r = client.get("/v1/functions/padded/sparsity", params={"shapes": str(n), "dtypes": "float64", "format": "coo"})
    assert r.status_code == 200 and r.json()["pattern"]["nnz"] == 2 * n, r.text


# ------------------------------------------------------------------ symmetric at one point only


def test_a_float32_force_symmetric_at_one_point_only_is_never_answered_symmetrised(client):
    """A force symmetric at x = 1 whose row 0 gains 1e-3 (x[j] - 1) elsewhere. Seen
    symmetric at x = 1, float32 requests were read from 3 JVPs as a symmetric matrix,
    and at another point the checking VJP, whose round-off tolerance in float32 is
    ~1.2e-4 of a column's scale, let the asymmetry through: row 0 was answered as
    column 0 copied (~5e-4 off, hundreds of ulps of those entries). Now float32 keeps
    its plain colouring (every entry read alone: torch's values) and only float64,
    whose check resolves ~2e-13, is read as symmetric: there the VJP proves the other
    point asymmetric and it is answered by VJPs, as jacrev is."""
    ones, x = np.ones(40), RNG.uniform(0.5, 1.5, 40)
    for dtype, rtol in (("float32", 2e-6), ("float64", 1e-13)):
        modes = []
        for point in (ones, ones, x):
            body = {"inputs": [{"dtype": dtype, "shape": [40], "data": point.tolist()}], "sparsity": "auto"}
            r = client.post("/v1/functions/drifting_force/jacobian", json=body)
            assert r.status_code == 200, r.text
            J, meta = wire.decode_sparse_json(r.json()["jacobian"]), r.json()["meta"]
            want = jac(s12.drifting_force, point.astype(dtype).astype(np.float64))
            np.testing.assert_allclose(J.toarray(), want, rtol=rtol, atol=rtol * np.abs(want).max())
            modes.append((meta["mode"], meta["products"]))
        if dtype == "float32":
            assert modes == [("bidirectional", 5)] * 3, modes
        else:
            assert modes == [("bidirectional", 5), ("symmetric", 3), ("rev", 40)], modes


# ------------------------------------------------------------------ a scientist's functions


def central(f, x, h=1e-6):
    """The Jacobian by central differences, column by column (float64)."""
    t = torch.from_numpy(x)
    cols = []
    for j in range(x.size):
        e = torch.zeros(x.size, dtype=torch.float64)
        e[j] = h
        e = e.reshape(t.shape)
        cols.append(((f(t + e) - f(t - e)) / (2 * h)).reshape(-1).numpy())
    return np.stack(cols, 1)


def group_columns_count(J):
    """What scipy's own column grouping (least_squares' jac_sparsity) takes: the
    fewer of its columns' and its rows' groups."""
    from scipy.optimize._numdiff import group_columns

    A = sp.csr_array(J)
    return min(int(group_columns(A).max()) + 1, int(group_columns(sp.csr_array(A.T)).max()) + 1)


def _npy(x):
    import io

    buf = io.BytesIO()
    np.save(buf, x)
    return buf.getvalue()


def test_periodic_stencils_in_every_format(client, sdk):
    """An explicit advection-diffusion-reaction step on a 15 x 15 torus (upwind
    advection and the 5-point Laplacian: a 5-point pattern that wraps around) and a
    nonlinear Poisson residual on a 7 x 7 x 7 periodic grid (7-point). Each Jacobian is
    torch.func.jacrev's and central differences' (to 1e-8), every nonzero stored and
    nothing more, from the optimum 5 and 7 products (a lattice; scipy's grouping takes
    more on the 3-D grid), in every format: CSR and COO as JSON and .npz, the dense
    matrix as JSON and .npy, and through the SDK as scipy sparse arrays."""
    import io

    cases = (("advect2d", s12.advect2d, (15, 15), 5), ("poisson3d", s12.poisson3d, (7, 7, 7), 7))
    for name, f, shape, optimum in cases:
        x = RNG.uniform(0.2, 0.8, shape)
        want = torch.func.jacrev(f)(torch.from_numpy(x)).reshape(x.size, x.size).numpy()
        np.testing.assert_allclose(central(f, x), want, rtol=1e-8, atol=1e-8)
        nonzero = set(zip(*np.nonzero(want)))
        for fmt in ("csr", "coo"):
            J, meta = sparse(client, name, x, sparse_format=fmt)
            assert J.format == fmt and entries(J) == nonzero, (fmt, J.nnz, len(nonzero))
            np.testing.assert_allclose(J.toarray(), want, rtol=1e-12, atol=1e-12)
            assert (meta["products"], meta["exact"], meta["value_dependent"], meta["conservative"]) == (optimum, True, False, False), meta
            r = client.post(f"/v1/functions/{name}/jacobian?sparsity=auto&sparse_format={fmt}", content=_npy(x),
                            headers={"content-type": "application/x-npy", "accept": "application/x-npz"})
            assert r.status_code == 200, r.text
            J = sp.load_npz(io.BytesIO(r.content))
            assert J.format == fmt and entries(J) == nonzero
            np.testing.assert_allclose(J.toarray(), want, rtol=1e-12, atol=1e-12)
        assert optimum <= group_columns_count(want)
        r = client.post(f"/v1/functions/{name}/jacobian", json={"inputs": [f64(x)], "sparsity": "auto", "sparse_format": "dense"})
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(np.asarray(r.json()["jacobian"]["data"]), want, rtol=1e-12, atol=1e-12)
        r = client.post(f"/v1/functions/{name}/jacobian?sparsity=auto&sparse_format=dense", content=_npy(x),
                        headers={"content-type": "application/x-npy", "accept": "application/x-npy"})
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(np.load(io.BytesIO(r.content)), want, rtol=1e-12, atol=1e-12)
        for fmt in ("csr", "coo"):
            J = sdk.jacobian(name, x, sparsity="auto", sparse_format=fmt)
            assert isinstance(J, sp.sparray) and J.format == fmt and entries(J) == nonzero, type(J)
            np.testing.assert_allclose(J.toarray(), want, rtol=1e-12, atol=1e-12)
    assert group_columns_count(want) > 7  # (scipy's grouping on the 3-D grid)


def test_kinetics_and_bundle_adjustment_against_jacrev(client):
    """Mass-action kinetics of 60 species in 90 random reactions (sparse, not banded:
    gathers and index_add) and bundle adjustment's reprojection residuals of 40 points
    seen by 6 cameras, differentiated by both (one matrix, camera columns then point
    columns: 8 entries a row, its camera's rotation and 2 of its translations, and its
    point). Each is jacrev's exactly, the pattern its nonzeros, in no more products
    than scipy's grouping and, for the bundle, the 8 a row needs (scipy's takes more)."""
    c = RNG.uniform(0.1, 1.0, 60)
    J, meta = sparse(client, "kinetics", c)
    want = jac(s12.kinetics, c)
    np.testing.assert_allclose(J.toarray(), want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(central(s12.kinetics, c), want, rtol=1e-7, atol=1e-8)
    assert entries(J) == set(zip(*np.nonzero(want))) and meta["exact"] is True
    assert meta["products"] <= group_columns_count(want), meta
    cams = np.concatenate([RNG.normal(0, 0.1, (6, 3)), RNG.normal(0, 0.5, (6, 3))], 1)
    pts = RNG.normal(0, 1, (40, 3))
    r = client.post("/v1/functions/bundle/jacobian", json={"inputs": [f64(cams), f64(pts)], "argnums": [0, 1], "sparsity": "auto"})
    assert r.status_code == 200, r.text
    J, meta = wire.decode_sparse_json(r.json()["jacobian"]), r.json()["meta"]
    blocks = torch.func.jacrev(s12.bundle, argnums=(0, 1))(torch.from_numpy(cams), torch.from_numpy(pts))
    want = np.concatenate([blocks[0].reshape(320, 36).numpy(), blocks[1].reshape(320, 120).numpy()], 1)
    np.testing.assert_allclose(J.toarray(), want, rtol=1e-12, atol=1e-12)
    assert entries(J) == set(zip(*np.nonzero(want))) and J.shape == (320, 156)
    assert meta["products"] == int((want != 0).sum(1).max()) == 8 < group_columns_count(want), meta


def test_patterns_that_follow_the_values_say_so(client):
    """A message pass on a fixed edge list holds everywhere (value_dependent false);
    on an edge list sent with the request it holds for that list only (value_dependent
    true, a note says why), and another list gets its own. relu's pattern holds
    everywhere as a union over its choices (conservative, a note names relu: zeros are
    stored where it is off); indexing by the data's own order holds at its point only.
    Every answer is jacrev's at its own point."""
    h = RNG.uniform(-1, 1, (10, 3))
    J, meta = sparse(client, "message_pass", h)
    np.testing.assert_allclose(J.toarray(), jac(s12.message_pass, h), rtol=1e-12, atol=1e-12)
    assert meta["value_dependent"] is False and entries(J) == set(zip(*np.nonzero(jac(s12.message_pass, h))))
    for edges in (s12._EDGES.numpy(), np.array([[0, 2, 4, 6], [9, 7, 5, 3]])):
        body = {"inputs": [f64(h), {"dtype": "int64", "shape": list(edges.shape), "data": edges.tolist()}], "sparsity": "auto"}
        r = client.post("/v1/functions/message_pass_on/jacobian", json=body)
        assert r.status_code == 200, r.text
        J, meta = wire.decode_sparse_json(r.json()["jacobian"]), r.json()["meta"]
        want = torch.func.jacrev(s12.message_pass_on)(torch.from_numpy(h), torch.from_numpy(edges)).reshape(30, 30).numpy()
        np.testing.assert_allclose(J.toarray(), want, rtol=1e-12, atol=1e-12)
        assert entries(J) == set(zip(*np.nonzero(want))) and meta["value_dependent"] is True, meta
        assert meta["notes"], meta
    for x in (RNG.uniform(-1, 1, 30), RNG.uniform(-1, 1, 30)):
        J, meta = sparse(client, "relu_ring", x)
        want = jac(s12.relu_ring, x)
        np.testing.assert_allclose(J.toarray(), want, rtol=1e-12, atol=1e-12)
        assert J.nnz == 60 and (meta["value_dependent"], meta["conservative"]) == (False, True), meta
        assert any("relu" in note for note in meta["notes"]), meta["notes"]
        J, meta = sparse(client, "sorted_chain", x)
        want = jac(s12.sorted_chain, x)
        np.testing.assert_allclose(J.toarray(), want, rtol=1e-12, atol=1e-12)
        assert entries(J) == set(zip(*np.nonzero(want))) and meta["value_dependent"] is True, meta


def test_a_lookup_table_at_indices_computed_from_the_data_holds_everywhere(client):
    """Linear interpolation in a fixed table: ``searchsorted(xp, x)``, then the table at
    those indices. What moves is the table's entries, which depend on no input, so the
    pattern (the interpolant times the next element: 2 entries a row) holds at every
    point; it was marked value_dependent ('index: an output shape that depends on
    values', though an integer index fixes the shape), detected anew at every point and
    said to hold at that point only. Now it is cached for every point (meta.cached on
    the second request, at another point), and requests at several points arriving
    together share it, each answered its own point's Jacobian. x read at the table's
    entries at those indices still depends on the values, and says so."""
    import threading
    metas = []
    for _ in range(2):
        x = RNG.uniform(0.1, 1.9, 30)
        J, meta = sparse(client, "tabulated", x)
        want = jac(s12.tabulated, x)
        np.testing.assert_allclose(J.toarray(), want, rtol=1e-12, atol=1e-12)
        assert entries(J) == set(zip(*np.nonzero(want))) and J.nnz == 60
        metas.append(meta)
    assert [(m["value_dependent"], m["notes"], m["cached"]) for m in metas] == [(False, [], None), (False, [], "memory")], metas
    xs = [RNG.uniform(0.1, 1.9, 30) for _ in range(4)]
    out = [None] * len(xs)

    def post(i):
        out[i] = client.post("/v1/functions/tabulated/jacobian", json={"inputs": [f64(xs[i])], "sparsity": "auto"})

    threads = [threading.Thread(target=post, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for x, r in zip(xs, out):
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(wire.decode_sparse_json(r.json()["jacobian"]).toarray(), jac(s12.tabulated, x), rtol=1e-12, atol=1e-12)
    for _ in range(2):
        x = RNG.uniform(0.1, 1.9, 30)
        J, meta = sparse(client, "table_indexed", x)
        want = jac(s12.table_indexed, x)
        np.testing.assert_allclose(J.toarray(), want, rtol=1e-12, atol=1e-12)
        assert meta["value_dependent"] is True and meta["cached"] is None, meta
        assert meta["notes"] == ["depends on the input values: exact at this point only (index: indices or masks computed from values)"]
