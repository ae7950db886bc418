"""Sparse Jacobians and Hessians, round 10: bicolouring (JVPs and VJPs together) for
arrowhead and bordered Jacobians, exact patterns through the backward ops a gradient
taken inside the function runs, and what a scientist computes (an unstructured mesh,
a kinetics network from a torch.sparse stoichiometry, a neural ODE with a
block-diagonal weight, a partially separable objective) through the service and the
SDK into SciPy. Every answer is compared with torch's reverse mode in this process
(``torch.autograd.functional``, which needs no vmap: vmap cannot run torch.sparse
products; ``torch.func.jacrev`` for the forces, whose gradients inside take seconds one
row at a time), every nonzero stored, and the pattern no wider than the true nonzeros.

One in-process app serves every case (no new server process); the SDK reaches it
through an httpx transport.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from scipy.integrate import solve_ivp
from scipy.optimize import least_squares, minimize
from starlette.testclient import TestClient

from jacobian_client import wire
from jacobian_client.scipy import remote_objective
from jacobian_service import create_app
from jacobian_service.settings import Settings
from tests import sparse10_functions as s10

from .conftest import sdk_over
from .test_sparse_round9 import f64, jac, sparse  # the round-9 helpers: a request, its answer, torch's

RNG = np.random.default_rng(10)


@pytest.fixture(scope="module")
def client():
    with TestClient(create_app(Settings(warmup=False, functions="tests.sparse10_functions"))) as c:
        yield c


@pytest.fixture(scope="module")
def sdk(client):
    with sdk_over(client) as c:
        yield c


def jacrev(f, x):
    return torch.func.jacrev(f)(torch.from_numpy(x)).reshape(-1, x.size).numpy()


def entries(J):
    coo = sp.coo_array(J)
    return set(zip(coo.row.tolist(), coo.col.tolist()))


def assert_exact(J, meta, want):
    """Values equal to torch's, every nonzero stored and nothing more, traced exactly."""
    np.testing.assert_allclose(J.toarray(), want, rtol=1e-12, atol=1e-12)
    nonzero = set(zip(*np.nonzero(want)))
    assert nonzero == entries(J), (len(nonzero), J.nnz)
    assert meta["exact"] is True and meta["source"] == "detected", meta


# ------------------------------------------------------------------ bicolouring


def test_an_arrowhead_jacobian_takes_three_products_by_bicolouring(client):
    """A dense row (a normalisation over every species) beside a dense column (a
    parameter every equation reads) needs one product per column with JVPs alone, and
    one per row with VJPs alone: 40 products at n = 40. The dense row by one VJP and the
    rest by two JVPs (column 0, then every other column: they share no row below the
    first) recover it from 3, whatever n; meta.mode says ``bidirectional``, and the
    pattern's description splits the products by side."""
    x = RNG.uniform(0.5, 1.5, 40)
    J, meta = sparse(client, "arrowhead", x)
    assert_exact(J, meta, jac(s10.arrowhead, x))
    assert (meta["mode"], meta["products"], meta["colors"]) == ("bidirectional", 3, 3), meta
    d = client.get("/v1/functions/arrowhead/sparsity", params={"shapes": "40", "dtypes": "float64"}).json()
    assert d["coloring"]["mode"] == "bidirectional" and d["products"] == 3
    assert (d["coloring"]["fwd_products"], d["coloring"]["rev_products"]) == (2, 1)
    assert d["coloring"]["lower_bound"] <= 3
    # one side forced: one product per column, and the same matrix
    Jf, mf = sparse(client, "arrowhead", x, mode="fwd")
    assert (mf["mode"], mf["products"]) == ("fwd", 40) and np.array_equal(Jf.toarray(), J.toarray())
    # a block of rows: from the products its own rows need
    r = client.post("/v1/functions/arrowhead/jacobian", json={"inputs": [f64(x)], "sparsity": "auto", "rows": [0, 8]})
    assert r.status_code == 200 and r.json()["meta"]["products"] <= 3, r.text
    np.testing.assert_allclose(wire.decode_sparse_json(r.json()["jacobian"]).toarray(), J.toarray()[:8], rtol=0, atol=0)


def test_a_bordered_block_diagonal_jacobian_by_bicolouring(client):
    """2 x 2 cells coupled through two global unknowns and two global constraints: two
    dense rows, two dense columns. Either side alone takes 42 products; the two dense
    rows by VJPs and the cells (2 colours) with the two dense columns by JVPs take 6."""
    x = RNG.uniform(0.5, 1.5, 42)
    J, meta = sparse(client, "bordered", x)
    assert_exact(J, meta, jac(s10.bordered, x))
    assert (meta["mode"], meta["products"]) == ("bidirectional", 6), meta


def test_a_bicolouring_from_the_disk_cache_and_a_declared_pattern_checked_on_both_sides(tmp_path):
    """A bicolouring read back from ``SPARSITY_CACHE_DIR`` (its map rebuilt from the
    colours and checked) gives the same matrix; a declared arrowhead missing one entry,
    in the part its VJP reads or in the part its JVPs read, is proven wrong by the
    products (a 422 through the service), never answered with mixed-up values."""
    from jacobian_service.sparsity import PatternCache, coo, sparse_jacobian
    from jacobian_service.sparsity.compute import PatternMismatch

    x = torch.from_numpy(RNG.uniform(0.5, 1.5, 12))
    want = jac(s10.arrowhead, x.numpy())
    sparse_jacobian(s10.arrowhead, [x], cache=PatternCache(tmp_path))
    again = sparse_jacobian(s10.arrowhead, [x], cache=PatternCache(tmp_path))
    assert again.timings["cached"] == "disk" and again.mode == "bidirectional"
    np.testing.assert_allclose(again.matrix.toarray(), want, rtol=1e-12, atol=1e-12)
    rows, cols = np.nonzero(want)
    assert sparse_jacobian(s10.arrowhead, [x], pattern=coo(rows, cols, want.shape)).mode == "bidirectional"
    for missing in ((0, 7), (5, 0), (5, 5)):  # the dense row's (a VJP), the dense column's, the diagonal's (JVPs)
        keep = ~((rows == missing[0]) & (cols == missing[1]))
        with pytest.raises(PatternMismatch):
            sparse_jacobian(s10.arrowhead, [x], pattern=coo(rows[keep], cols[keep], want.shape))


# ------------------------------------------------------------------ backward ops inside


def test_forces_through_summing_backward_ops_are_traced_exactly(client):
    """A force computed inside the function as ``-torch.func.grad(E)`` runs the backward
    ops of E's convolution, pooling, layer norm, upsampling, padding and max pooling
    (``convolution_backward``, ``avg_pool2d_backward``, ``native_layer_norm_backward``,
    ``upsample_linear1d_backward``, ``reflection_pad1d_backward``,
    ``max_pool2d_with_indices_backward``): each sums the gradient over what its forward
    op reached, and each was an unknown op taken as dense (every force on every
    position: 24 and 32 products, exact false). Each is now the vector-Jacobian product
    of its forward op's traced links: E's Hessian pattern, exactly."""
    u = RNG.uniform(0.5, 1.5, 24)
    J, meta = sparse(client, "rod_force", u)
    assert_exact(J, meta, jacrev(s10.rod_force, u))
    assert meta["products"] == 5, meta  # a pentadiagonal Hessian (the 3-tap curvature squared)
    u = RNG.uniform(0.5, 1.5, 32)
    J, meta = sparse(client, "field_gradient", u)
    want = jacrev(s10.field_gradient, u)
    np.testing.assert_allclose(J.toarray(), want, rtol=1e-12, atol=1e-12)
    assert set(zip(*np.nonzero(want))) <= entries(J) and meta["exact"] is True, meta
    # rows of 8 stay apart (4 blocks of 8 x 8: max pooling's choices keep their window)
    assert J.nnz == 4 * 64 and meta["products"] == 8, meta


# ------------------------------------------------------------------ what a scientist computes


@pytest.mark.parametrize("name, n, products", [("mesh_residual", 42, 9), ("kinetics", 50, 14), ("neural_rhs", 24, 4)])
def test_mesh_kinetics_and_neural_ode_against_dense(client, name, n, products):
    """A diffusion residual on an unstructured triangulation (fluxes ``index_add``-ed over
    its edges: each node on its neighbours), 50 species reacting by mass action through
    a ``torch.sparse`` stoichiometry (``torch.sparse.mm``), and a neural ODE's right-hand
    side with a block-diagonal weight (6 subsystems of 4): exact patterns, the values of
    torch's reverse mode, and few products."""
    x = RNG.uniform(0.5, 1.5, n)
    J, meta = sparse(client, name, x)
    assert_exact(J, meta, jac(getattr(s10, name), x))
    assert meta["products"] <= products, meta


# ------------------------------------------------------------------ the SDK into SciPy


def test_sdk_sparse_jacobians_drive_least_squares_and_bdf(sdk):
    """``least_squares`` with the service's sparse Jacobian (a decay fit with a shared
    rate and a total: a dense column and a dense row, 4 products by bicolouring) reaches
    the solution the in-process Jacobian gives it, and
    ``jac_sparsity`` from ``client.sparsity`` is the true pattern; ``solve_ivp(BDF)``
    with the neural ODE's sparse Jacobian follows the dense-Jacobian trajectory."""
    n = 30
    x0 = np.full(n, 0.5)
    obj = remote_objective(sdk, "decay_fit", sparsity="auto")
    got = least_squares(obj.fun, x0, jac=obj.jac, method="trf", tr_solver="lsmr", xtol=1e-12, ftol=1e-12, gtol=1e-12)
    assert sp.issparse(obj.jac(x0))
    want = least_squares(lambda x: s10.decay_fit(torch.from_numpy(x)).numpy(), x0,
                         jac=lambda x: jac(s10.decay_fit, x), method="trf", xtol=1e-12, ftol=1e-12, gtol=1e-12)
    np.testing.assert_allclose(got.x, want.x, rtol=1e-5, atol=1e-7)
    assert got.cost == pytest.approx(want.cost, rel=1e-9)
    info = sdk.sparsity("decay_fit", (n,))
    assert info["coloring"]["mode"] == "bidirectional" and info["products"] == 4, info["coloring"]
    pattern = info["matrix"]
    assert entries(pattern) == set(zip(*np.nonzero(jac(s10.decay_fit, RNG.uniform(0.5, 1.5, n)))))
    fd = least_squares(lambda x: s10.decay_fit(torch.from_numpy(x)).numpy(), x0, jac_sparsity=pattern,
                       method="trf", xtol=1e-12, ftol=1e-12, gtol=1e-12)
    np.testing.assert_allclose(fd.x, want.x, rtol=1e-5, atol=1e-6)

    rhs = lambda t, y: s10.neural_rhs(torch.from_numpy(y)).numpy()  # noqa: E731
    y0 = np.linspace(-1, 1, 24)
    remote = solve_ivp(rhs, (0, 2), y0, method="BDF", jac=lambda t, y: sdk.jacobian("neural_rhs", y, sparsity="auto"),
                       rtol=1e-8, atol=1e-10)
    local = solve_ivp(rhs, (0, 2), y0, method="BDF", jac=lambda t, y: jac(s10.neural_rhs, y), rtol=1e-8, atol=1e-10)
    assert remote.success and local.success
    np.testing.assert_allclose(remote.y[:, -1], local.y[:, -1], rtol=1e-6, atol=1e-9)


def test_sdk_sparse_hessian_drives_trust_constr(sdk):
    """A partially separable objective, sum of f_i(x[i-1], x[i], x[i+1]): its Hessian
    is pentadiagonal; the service's sparse Hessian
    in ``minimize(method="trust-constr")`` reaches the minimum the dense in-process
    Hessian does."""
    n = 30
    x0 = RNG.uniform(0.5, 1.5, n)
    H = sdk.hessian("separable", x0, sparsity="auto")
    t = torch.from_numpy(x0)
    np.testing.assert_allclose(H.toarray(), torch.autograd.functional.hessian(s10.separable, t).numpy(), rtol=1e-12, atol=1e-12)
    assert H.nnz == 5 * n - 6  # f_i couples x[i-1] with x[i+1] too: pentadiagonal
    obj = remote_objective(sdk, "separable", sparsity="auto")
    got = minimize(obj.fun, x0, jac=obj.jac, hess=obj.hess, method="trust-constr", options={"gtol": 1e-10})
    f = lambda x: float(s10.separable(torch.from_numpy(x)))  # noqa: E731
    g = lambda x: torch.func.grad(s10.separable)(torch.from_numpy(x)).numpy()  # noqa: E731
    h = lambda x: torch.autograd.functional.hessian(s10.separable, torch.from_numpy(x)).numpy()  # noqa: E731
    want = minimize(f, x0, jac=g, hess=h, method="trust-constr", options={"gtol": 1e-10})
    np.testing.assert_allclose(got.x, want.x, rtol=1e-6, atol=1e-8)


def test_bicolouring_is_tried_only_where_a_dense_line_stands_out(monkeypatch):
    """Peeling rows of about the same counts as the rest saves nothing (a greedy
    colouring takes a few times the counts whichever rows go), yet each trial is a full
    colouring: on random patterns trying every drop in the counts made auto's colouring
    5 to 13 times slower and found nothing. A random pattern is coloured on its two sides
    only; an arrowhead still gets its 3 products."""
    from jacobian_service.sparsity import Pattern, choose_coloring, coloring

    calls = []
    colour = coloring.column_coloring

    def counted(*a, **k):
        calls.append(1)
        return colour(*a, **k)

    monkeypatch.setattr(coloring, "column_coloring", counted)
    A = sp.coo_array(sp.random(300, 300, density=0.03, random_state=3) + sp.identity(300))
    assert choose_coloring(Pattern(A.shape, A.row, A.col)).mode in ("fwd", "rev")
    assert len(calls) <= 2, len(calls)
    n = 50
    rows = np.r_[np.zeros(n, int), np.arange(1, n), np.arange(1, n)]
    cols = np.r_[np.arange(n), np.zeros(n - 1, int), np.arange(1, n)]
    got = choose_coloring(Pattern((n, n), rows, cols))
    assert (got.mode, got.n_colors) == ("bidirectional", 3)


def test_hessian_colourings_match_sparsematrixcolorings_counts_on_bands():
    """SparseMatrixColorings.jl's published counts (its test/theory.jl, after Gebremedhin,
    Tarafdar, Pothen, Walther 2009) for a symmetric band with rho off-diagonal bands:
    star colouring 2 floor(rho/2) + 1 colours, acyclic floor(rho/2) + 1. The service's
    star and acyclic colourings reach both (rho = 10: 11 and 6; rho = 20: 21 and 11).
    A guard on colouring quality, not a fix."""
    from jacobian_service.sparsity import banded
    from jacobian_service.sparsity.coloring import acyclic_coloring, star_coloring

    for rho in (10, 20):
        p = banded(rho // 2, rho // 2).build([(300,)], 300)
        assert star_coloring(p).n_colors == 2 * (rho // 2) + 1
        assert acyclic_coloring(p).n_colors == rho // 2 + 1


def test_a_constant_mask_in_masked_fill_is_structure():
    """Dirichlet rows written with ``masked_fill`` on a constant boundary mask
    (``laplacian.masked_fill(boundary, 0) + boundary * (u - g)``) kept each boundary
    row's periodic neighbours (stored zeros, an extra product), and a fill value that is
    traced reached every element, masked or not; ``torch.where`` on a constant condition
    already added nothing from the branch it does not pick. Now the masked places read
    the fill value alone and the others ``self`` alone, as jacrev's nonzeros are."""
    from jacobian_service.sparsity import sparse_jacobian

    n = 12
    boundary = torch.zeros(n, dtype=torch.bool)
    boundary[[0, n - 1]] = True

    def dirichlet(u):
        laplacian = u.roll(1) + u.roll(-1) - 2 * u
        return laplacian.masked_fill(boundary, 0.0) + boundary * (u - 1.0)

    def pinned(u):  # the boundary held at the first interior value
        return torch.sin(u).masked_fill(boundary, 0.0).masked_fill(boundary, u[1])

    for f in (dirichlet, pinned):
        u = torch.from_numpy(RNG.uniform(0.5, 1.5, n))
        got = sparse_jacobian(f, [u])
        want = torch.func.jacrev(f)(u).numpy()
        np.testing.assert_allclose(got.matrix.toarray(), want, rtol=1e-12, atol=1e-12)
        assert entries(got.matrix) == set(zip(*np.nonzero(want))), (f.__name__, got.matrix.nnz, int((want != 0).sum()))


def test_a_segmentation_loss_keeps_its_pixels_apart():
    """``cross_entropy`` over an image (logits ``(N, C, H, W)``, a class per pixel) runs
    ``nll_loss2d_forward`` (and a gradient of it inside the function
    ``nll_loss2d_backward``): unknown ops, every pixel's loss on every logit (108
    entries for 15 on a 2 x 3 image of 3 classes with one ignored pixel, exact false).
    Now each pixel's term reads its target class's logit there, as ``nll_loss`` does for
    a batch of samples; its gradient is traced as nll_loss2d_forward's adjoint."""
    from jacobian_service.sparsity import sparse_jacobian

    target = torch.tensor([[[0, 1, 2], [1, 0, -100]]])
    weight = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)

    def per_pixel(x):
        return F.cross_entropy(x.reshape(1, 3, 2, 3), target, ignore_index=-100, reduction="none")

    def gradient(x):
        return torch.func.grad(lambda y: F.cross_entropy(y.reshape(1, 3, 2, 3), target, weight=weight))(x)

    for f in (per_pixel, gradient):
        x = torch.from_numpy(RNG.uniform(0.5, 1.5, 18))
        got = sparse_jacobian(f, [x])
        want = torch.func.jacrev(f)(x).reshape(-1, 18).numpy()
        np.testing.assert_allclose(got.matrix.toarray(), want, rtol=1e-12, atol=1e-12)
        assert set(zip(*np.nonzero(want))) <= entries(got.matrix) and got.pattern.exact, got.pattern.notes
    assert got.matrix.nnz <= 54  # the ignored pixel's line: log_softmax's backward reads it
    assert sparse_jacobian(per_pixel, [x]).matrix.nnz == 5 * 3  # each pixel on its 3 logits; the ignored one on none
