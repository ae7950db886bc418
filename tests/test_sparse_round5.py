"""Sparse Jacobians and Hessians as a scientist meets them (round 5): torch's vmap
checked wherever the sparse products run under it (request batches, the library
without a registered name), and PDE, ODE, kinetics and graph functions whose sparse
answers are compared with dense ``torch.func`` in this process.

One in-process app with request batching serves every case (no new server process).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from starlette.testclient import TestClient

from jacobian_client import wire
from jacobian_service import create_app
from jacobian_service.settings import Settings
from tests import sparse_functions as sf

FUNCTIONS = "jacobian_service.examples,tests.sparse_functions"
RNG = np.random.default_rng(5)


@pytest.fixture(scope="module")
def client():
    # Batching on: equal sparse requests that arrive within 250 ms share one computation.
    settings = Settings(warmup=False, functions=FUNCTIONS, max_batch_wait_ms=250, max_batch_size=8)
    with TestClient(create_app(settings)) as c:
        yield c


def sparse_json(response, key="jacobian"):
    assert response.status_code == 200, response.text
    doc = response.json()
    return wire.decode_sparse_json(doc[key]), doc["meta"]


def f64(x):
    return {"dtype": "float64", "shape": list(x.shape), "data": x.reshape(-1).tolist()}


# ------------------------------------------------------------------ torch's vmap, checked


def test_a_batch_of_sparse_requests_is_not_taken_from_a_wrong_vmap(client):
    """Sparse requests batched together run every product under a vmap over their points
    of a vmap over the seeds, and that ran unchecked: three concurrent reverse-mode
    Jacobians of masked_select with a broadcast mask each came back 2.0 off (200, exact:
    true), though each alone was right. Each point's products are now checked against
    one product there, and a batch that disagrees is answered point by point."""
    xs = RNG.uniform(0.5, 1.5, (3, 3))
    want = [torch.func.jacrev(sf.masked_pairs, chunk_size=1)(torch.from_numpy(x)).numpy() for x in xs]

    def one(x):
        body = {"inputs": [f64(x)], "sparsity": "auto", "mode": "rev"}
        return client.post("/v1/functions/masked_pairs/jacobian", json=body)

    for _ in range(2):  # the second round knows the verdict
        with ThreadPoolExecutor(3) as pool:
            responses = list(pool.map(one, xs))
        for w, r in zip(want, responses):
            J, meta = sparse_json(r)
            np.testing.assert_allclose(J.toarray(), w, rtol=1e-12)
            assert meta["exact"] is True and meta["mode"] == "rev"


def test_sparse_batch_checks_vmap_over_points():
    """The library's batch: wrong for every batch size and seed count where vmap runs it."""
    from jacobian_service.sparsity.compute import VmapDisagrees, resolve, sparse_batch

    pts = torch.from_numpy(RNG.uniform(0.5, 1.5, (2, 3)))
    p, coloring, _ = resolve(sf.masked_pairs, [pts[0]], (0,), "auto", mode="rev")
    # (silently wrong with as many seeds as the mask has rows, 2: VmapDisagrees; the
    # checking seed makes a chunk 3, where the batching rule fails outright: either way
    # the scheduler answers each point alone)
    with pytest.raises((VmapDisagrees, RuntimeError)):
        sparse_batch(sf.masked_pairs, [pts], (0,), p, coloring, 4)
    # a function vmap gets right is still batched
    q, c2, _ = resolve(sf.band_1_2, [pts[0]], (0,), "auto", mode="rev")
    mats, _ = sparse_batch(sf.band_1_2, [pts], (0,), q, c2, 3)
    for i in range(2):
        want = torch.func.jacrev(sf.band_1_2)(pts[i]).numpy()
        np.testing.assert_allclose(mats[i].toarray(), want, rtol=1e-12)


def test_the_library_checks_vmap_without_a_registered_name():
    """sparse_jacobian(fn, args) with no ``name`` (the library's own use) took vmap's
    products unchecked: rows 2 and 3 of masked_select's Jacobian came back zero."""
    from jacobian_service.sparsity import sparse_jacobian

    x = torch.from_numpy(RNG.uniform(0.5, 1.5, 3))
    want = torch.func.jacrev(sf.masked_pairs, chunk_size=1)(x).numpy()

    class Unhashable:  # no key to remember a verdict under: checked every time
        __hash__ = None

        def __call__(self, x):
            return sf.masked_pairs(x)

    for fn in (sf.masked_pairs, sf.masked_pairs, Unhashable()):
        res = sparse_jacobian(fn, [x], mode="rev")
        np.testing.assert_allclose(res.matrix.toarray(), want, rtol=1e-12)


@pytest.mark.parametrize("mode", ["rev", "fwd"])
def test_a_probed_pattern_and_its_dense_answer_are_not_taken_from_a_wrong_vmap(client, mode):
    """A function the tracer cannot follow (a module-level buffer written from x) is
    probed with dense jacrev, and a pattern the products prove wrong is answered with
    dense jacrev: both vmapped their rows unchecked. With masked_select over a broadcast
    (2, 3) mask jacrev's second row is zeros, so the probe missed (1, 1) and (1, 2) and
    the dense answer had them as zeros: [[2, 0, 0], [0, 0, 0]] with a 200 where jacrev
    row by row says [[2, 0, 0], [0, 4, 6]]. Both are now checked against one VJP, row by
    row where not. (The same with a sparse COO operator, which the tracer now follows.)"""
    x = RNG.uniform(0.5, 1.5, 3)
    for name, source in (("buffer_masked", "probed"), ("sparse_operator_masked", "detected")):
        want = torch.func.jacrev(getattr(sf, name), chunk_size=1)(torch.from_numpy(x)).numpy()
        assert (want != 0).sum() == 3
        body = {"inputs": [f64(x)], "sparsity": "auto", "mode": mode}
        J, meta = sparse_json(client.post(f"/v1/functions/{name}/jacobian", json=body))
        np.testing.assert_allclose(J.toarray(), want, rtol=1e-12)
        assert meta["source"] == source and meta["nnz"] >= 3


def test_the_dense_hessian_fallback_is_checked_against_a_hessian_vector_product():
    """torch.func.hessian of a layer norm with weight and bias is 1.3 off (torch's vmap in
    its double backward); the dense Hessian a sparse one falls back on is checked."""
    from jacobian_service.sparsity.dense import dense_hessian

    from .user_functions import layer_norm_affine_sum as fn

    gen = torch.Generator().manual_seed(0)
    ps = (torch.randn(2, 3, generator=gen, dtype=torch.float64), torch.randn(3, generator=gen, dtype=torch.float64),
          torch.randn(3, generator=gen, dtype=torch.float64))
    idx = (0, 1, 2)
    want = torch.func.jacrev(torch.func.jacrev(fn, argnums=idx, chunk_size=1), argnums=idx, chunk_size=1)(*ps)

    def flat(h):
        return torch.cat([torch.cat([h[r][c].reshape(ps[r].numel(), -1) for c in idx], 1) for r in idx], 0).numpy()

    assert np.abs(flat(torch.func.hessian(fn, argnums=idx)(*ps)) - flat(want)).max() > 0.1  # torch's is wrong
    np.testing.assert_allclose(flat(dense_hessian(fn, ps)), flat(want), rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------ colourings of stencils


@pytest.mark.parametrize("lower,upper,n", [(8, 4, 8192), (8, 4, 100), (1, 1, 17), (1, 1, 16), (2, 2, 64)])
def test_a_periodic_band_takes_the_fewest_colours_any_colouring_can(lower, upper, n):
    """A band w wide that wraps around needs ceil(n / floor(n / w)) colours, and ``j mod
    k`` reaches that only where k divides n: lorenz96's band at n = 8,192 took 15 (14 do),
    a periodic tridiagonal on 17 points 5 (4 do), a 5-wide one on 64 points 8 (6 do)."""
    from jacobian_service.sparsity import banded
    from jacobian_service.sparsity.coloring import column_coloring, row_coloring

    p = banded(lower, upper, periodic=True).build([(n,)], n)
    w = lower + upper + 1
    optimum = -(-n // (n // w))
    for coloring in (column_coloring(p), row_coloring(p)):
        assert coloring.n_colors == optimum, (coloring.n_colors, coloring.strategy)


@pytest.mark.parametrize("name,shape", [("heat3d_periodic", "7,7,7"), ("heat3d_periodic", "14,14,14"),
                                        ("heat3d_dirichlet", "6,6,6"), ("heat3d_dirichlet", "13,13,13")])
def test_the_7_point_stencil_of_a_3d_grid_takes_7_products(client, name, shape):
    """A 3-D stencil's columns are 1, ny nz apart and nx ny nz: one width's lattice fails
    where the sides are 0 or +-1 mod 7, and greedy orders took 8 (6 x 6 x 6 with
    boundaries) to 16 (14 x 14 x 14, periodic). A lattice of two widths, (x + 2y + 3z)
    mod 7, takes the 7 the lower bound says."""
    doc = client.get(f"/v1/functions/{name}/sparsity?shapes={shape}").json()
    assert doc["coloring"]["lower_bound"] == 7 and doc["products"] == 7, doc["coloring"]


@pytest.mark.parametrize("name,shape", [("heat3d_periodic", (7, 7, 7)), ("heat3d_dirichlet", (6, 6, 6)),
                                        ("burgers_upwind", (17,))])
def test_pde_residuals_match_dense_jacrev(client, name, shape):
    """Values (and every nonzero of jacrev in the pattern), .npz read by scipy alone."""
    import io

    import scipy.sparse as sp

    from tests.conftest import npy_bytes

    fn = getattr(sf, name)
    u = RNG.uniform(-1, 1, shape)
    want = torch.func.jacrev(fn)(torch.from_numpy(u)).reshape(u.size, u.size).numpy()
    r = client.post(f"/v1/functions/{name}/jacobian?sparsity=auto", content=npy_bytes(u.astype(np.float32)),
                    headers={"content-type": wire.NPY, "accept": wire.NPZ})
    assert r.status_code == 200, r.text
    J = sp.load_npz(io.BytesIO(r.content))
    assert not ((want != 0) & (J.toarray() == 0) & ~np.isclose(want, 0, atol=1e-6)).any()
    np.testing.assert_allclose(J.toarray(), want, rtol=1e-5, atol=1e-5)


def test_a_sparse_hessian_under_no_grad_is_torch_func_hessians(client):
    """A function writing into its input under no_grad gets torch.func.hessian's Hessian,
    one vmapped HVP per input element (docs/sparse.md). The vmap check added for the
    products took one HVP alone as the truth, and one alone sees the write twice: the
    sparse Hessian of x.mul_(2); sum(x**3) was diag(48 x) where torch.func.hessian (and
    the library without a name) said diag(24 x)."""
    x = np.array([1.0, 2.0, 3.0])
    want = torch.func.hessian(sf.doubles_in_place_energy)(torch.from_numpy(x.copy())).numpy()
    H, meta = sparse_json(client.post("/v1/functions/doubles_in_place_energy/hessian",
                                      json={"inputs": [f64(x)], "sparsity": "auto"}), "hessian")
    np.testing.assert_allclose(H.toarray(), want, rtol=1e-12)
    assert any("torch.no_grad" in note for note in meta["notes"])


def test_a_constant_torch_sparse_operator_is_traced_exactly(client):
    """A graph Laplacian or a finite-difference operator kept as a torch.sparse matrix
    (A @ x, torch.sparse.mm): the tracer failed on it ('reshape is not implemented for
    sparse tensors'), the pattern was probed (exact: false, three dense jacrevs) and the
    Hessian had no sparse path. Each output now depends on the stored entries of its row."""
    x = RNG.uniform(0.5, 1.5, 40)
    want = torch.func.jacrev(sf.graph_diffusion, chunk_size=1)(torch.from_numpy(x)).numpy()  # vmap cannot run it
    J, meta = sparse_json(client.post("/v1/functions/graph_diffusion/jacobian", json={"inputs": [f64(x)], "sparsity": "auto"}))
    np.testing.assert_allclose(J.toarray(), want, rtol=1e-12)
    assert meta["source"] == "detected" and meta["exact"] is True and not meta["notes"]
    assert meta["nnz"] == 40 * 4 and meta["colors"] <= 6  # the diagonal, two ring neighbours and a chord
    doc = client.get("/v1/functions/graph_diffusion/sparsity?shapes=40&kind=jacobian").json()
    assert doc["pattern"]["exact"] is True and doc["pattern"]["nnz"] == 160


def test_functions_sharing_a_source_do_not_share_a_pattern():
    """The library keyed its pattern cache on a function's qualified name and source:
    the closures of one factory (make(1), make(5)) and two lambdas on one line share
    both, so make(5)'s sparse Jacobian was read through make(1)'s pattern (exact, so
    unchecked): 0.9 off. Their closures and code now enter the key; one function's
    calls still hit the cache."""
    from jacobian_service.sparsity import sparse_jacobian

    def make(k):
        return lambda x: torch.roll(x, k) * x

    x = torch.from_numpy(RNG.uniform(0.5, 1.5, 10))
    shifted = (lambda x: x.roll(1) * x.sin(), lambda x: x.roll(3) * x.sin())
    for fn in (make(1), make(5), shifted[0], shifted[1]):
        res = sparse_jacobian(fn, [x])
        np.testing.assert_allclose(res.matrix.toarray(), torch.func.jacrev(fn)(x).numpy(), rtol=1e-12)
    one = make(2)
    assert [sparse_jacobian(one, [x]).timings["cached"] for _ in range(2)] == ["", "memory"]


def test_pooling_is_traced_exactly(client):
    """avg_pool and max_pool (1-3-D) were ops the tracer did not know: taken as dense
    (every output on every input, exact: false, one product per element). Each output
    now depends on its window of its own channel."""
    u = RNG.uniform(-1, 1, (6, 7))
    want = torch.func.jacrev(sf.pooled_residual)(torch.from_numpy(u)).reshape(42, 42).numpy()
    J, meta = sparse_json(client.post("/v1/functions/pooled_residual/jacobian", json={"inputs": [f64(u)], "sparsity": "auto"}))
    np.testing.assert_allclose(J.toarray(), want, rtol=1e-12, atol=1e-15)
    assert meta["exact"] is True and meta["products"] == 9  # a 3 x 3 window
    # max pooling's window is a union over the choices of its largest element: said so
    assert meta["conservative"] is True and len(meta["notes"]) == 1 and "(max_pool2d_with_indices)" in meta["notes"][0]


def test_a_wrong_vmap_is_logged_when_found_not_at_every_request(client, caplog):
    """The verdict is remembered, and so every later request of a function torch's vmap
    gets wrong took the slow way logging the same WARNING again ('vmap of the products
    disagrees with one product; looping'), one a request. Once, when found."""
    import logging

    x = RNG.uniform(0.5, 1.5, 3)
    body = {"inputs": [f64(x)], "sparsity": "auto", "mode": "rev", "chunk_size": 2}
    with caplog.at_level(logging.WARNING, logger="jacobian_service.sparsity"):
        for _ in range(3):
            J, _ = sparse_json(client.post("/v1/functions/masked_select_pairs_once/jacobian", json=body))
    np.testing.assert_allclose(J.toarray(), torch.func.jacrev(sf.masked_select_pairs_once, chunk_size=1)(
        torch.from_numpy(x)).numpy(), rtol=1e-12)
    assert sum("disagrees" in r.getMessage() for r in caplog.records) == 1
