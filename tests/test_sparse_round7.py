"""Sparse Jacobians and Hessians as a scientist with mostly-zero Jacobians meets them
(round 7): PDE stencils (1-, 2-, 3-D, periodic, variable coefficients), reaction
networks, graph Laplacians from an edge list, a fixed ``torch.sparse`` operator, implicit
steps (``torch.linalg.solve`` with a fixed matrix), branches on values, a banded
Jacobian at n = 100,000, every answer format and the SDK's ``scipy.sparse`` result, and
Hessians by star colouring. Every answer is compared with dense ``torch.func`` in this
process: the values, and the pattern (never a nonzero missed; stored entries beyond the
true nonzeros only where the pattern is documented as a union over branches).

One in-process app serves every case (no new server process).
"""

from __future__ import annotations

import io

import httpx
import numpy as np
import pytest
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from starlette.testclient import TestClient

from jacobian_client import Client, wire
from jacobian_service import create_app
from jacobian_service.settings import Settings
from jacobian_service.sparsity.detect import trace_hessian, trace_jacobian
from tests import sparse7_functions as s7

RNG = np.random.default_rng(7)


@pytest.fixture(scope="module")
def client():
    with TestClient(create_app(Settings(warmup=False, functions="tests.sparse7_functions"))) as c:
        yield c


def f64(x):
    return {"dtype": "float64", "shape": list(x.shape), "data": x.reshape(-1).tolist()}


def sparse(client, name, *xs, **options):
    r = client.post(f"/v1/functions/{name}/jacobian", json={"inputs": [f64(x) for x in xs], "sparsity": "auto", **options})
    assert r.status_code == 200, r.text
    doc = r.json()
    return wire.decode_sparse_json(doc["jacobian"]), doc["meta"]


def reference(f, *xs, argnum=0):
    """Dense jacrev in this process, flattened to (outputs) x (input elements)."""
    ts = tuple(torch.from_numpy(x) for x in xs)
    return torch.func.jacrev(f, argnums=argnum)(*ts).reshape(-1, ts[argnum].numel()).numpy()


def _dense_operator(x):  # sparse_operator with its matrix dense: torch's vmap cannot run torch.sparse
    return torch.sin(s7._A.to_dense() @ x)


def entries(J):
    coo = sp.coo_array(J)
    return set(zip(coo.row.tolist(), coo.col.tolist()))


def assert_matches(J, want, union=False):
    """Values equal to dense jacrev's; every nonzero stored; with ``union`` false, nothing
    stored that is not a nonzero (an exact pattern on a function whose nonzeros do not
    vanish by chance at this point)."""
    np.testing.assert_allclose(J.toarray(), want, rtol=1e-12, atol=1e-12)
    nonzero = set(zip(*np.nonzero(want)))
    stored = entries(J)
    assert nonzero <= stored, sorted(nonzero - stored)[:5]
    if not union:
        assert stored == nonzero, sorted(stored - nonzero)[:5]


# ------------------------------------------------------------------ scientist's functions

CASES = [
    ("allen_cahn_torus", s7.allen_cahn_torus, lambda: (RNG.uniform(-1, 1, (10, 12)),), 0),
    ("variable_diffusion", s7.variable_diffusion, lambda: (RNG.uniform(-1, 1, 16), RNG.uniform(0.5, 1, 17)), 0),
    ("laplace3d_periodic", s7.laplace3d_periodic, lambda: (RNG.uniform(-1, 1, (7, 7, 7)),), 0),
    ("kinetics", s7.kinetics, lambda: (RNG.uniform(0.1, 1, 30),), 0),
    ("graph_laplacian", s7.graph_laplacian, lambda: (RNG.uniform(0, 1, 40),), 0),
    ("sparse_operator", _dense_operator, lambda: (RNG.uniform(0, 1, (50, 3)),), 0),
]


@pytest.mark.parametrize("name,f,point,argnum", CASES, ids=[c[0] for c in CASES])
def test_scientific_jacobians_match_jacrev_exactly(client, name, f, point, argnum):
    xs = point()
    J, meta = sparse(client, name, *xs)
    assert meta["source"] == "detected" and meta["exact"] is True and meta["value_dependent"] is False
    assert_matches(J, reference(f, *xs, argnum=argnum))
    assert meta["products"] < J.shape[0] / 2  # a few products, not one per output


def test_implicit_steps_keep_their_structure_and_their_cache(client):
    """torch.linalg.solve with a fixed matrix (an implicit Euler step) was traced as dense
    and value-dependent (its error check reads the factorisation's ``info``): three
    separate rods' step took 24 products instead of 8 (exact: false), and every new point
    detected its pattern again. Now ``X = A^-1 B`` is traced through A's graph (A^-1 is
    a polynomial in A): the blocks stay apart, a triangular system's inverse stays
    triangular, and a second point takes the cached pattern."""
    for name, shape, products in (("implicit_rods", (24,), 8), ("implicit_batched", (4, 6), 6)):
        f = getattr(s7, name)
        for shift, cached in ((0.0, None), (1.0, "memory")):
            x = RNG.uniform(0, 1, shape) + shift
            J, meta = sparse(client, name, x)
            assert meta["exact"] is True and meta["value_dependent"] is False and meta["notes"] == []
            assert meta["products"] == products and meta["cached"] == cached
            assert_matches(J, reference(f, x))


def test_solve_pattern_through_batches_sides_and_hessians():
    """The traced pattern of linalg.solve against jacrev's nonzeros: broadcast batches of
    A or of B, a matrix right-hand side, ``left=False``, the Hessian of a quadratic; an A
    that depends on the inputs through the rows each answer reaches (round 8: it was
    taken as dense)."""
    d = torch.float64
    blk = torch.block_diag(torch.tensor([[2.0, 1, 0], [1, 2, 1], [0, 0, 2]]), torch.tensor([[3.0, 1, 0], [0, 3, 1], [0, 0, 3]])).to(d)
    tri = torch.eye(6, dtype=d) * 3 + torch.diag(torch.ones(5, dtype=d), 1)
    funcs = {
        "vector": (lambda x: torch.linalg.solve(blk, x) ** 2, 6),
        "matrix": (lambda x: torch.linalg.solve(blk, x.reshape(6, 2)), 12),
        "right": (lambda x: torch.linalg.solve(blk, x.reshape(2, 6), left=False), 12),
        "batched_a": (lambda x: torch.linalg.solve(torch.stack([tri, blk]), x.reshape(2, 6)), 12),
        "broadcast_a": (lambda x: torch.linalg.solve(blk, x.reshape(3, 6, 1)), 18),
        "broadcast_b": (lambda x: torch.linalg.solve(torch.stack([tri, blk]), x.reshape(6, 1)), 6),
    }
    for name, (f, n) in funcs.items():
        x = torch.rand(n, dtype=d) + 0.5
        p = trace_jacobian(f, (x,))
        want = torch.autograd.functional.jacobian(f, x).reshape(-1, n).numpy()
        assert p.exact and not p.value_dependent, name
        assert set(zip(p.rows.tolist(), p.cols.tolist())) == set(zip(*np.nonzero(want))), name
    x = torch.rand(6, dtype=d)
    p = trace_hessian(lambda v: (torch.linalg.solve(blk, torch.sin(v)) * v).sum(), (x,))
    H = torch.func.hessian(lambda v: (torch.linalg.solve(blk, torch.sin(v)) * v).sum())(x).numpy()
    assert set(zip(*np.nonzero(H))) <= set(zip(p.rows.tolist(), p.cols.tolist()))
    assert p.nnz == 18  # two 3 x 3 blocks
    f = lambda v: torch.linalg.solve(tri + torch.diag(v), v)  # noqa: E731
    p = trace_jacobian(f, (x,))
    want = torch.autograd.functional.jacobian(f, x).numpy()
    assert p.exact and not p.value_dependent and np.array_equal(p.to_dense(), np.triu(np.ones((6, 6), bool)))
    assert set(zip(*np.nonzero(want))) == set(zip(p.rows.tolist(), p.cols.tolist()))


def test_branches_on_values_are_a_union_or_this_point_only(client):
    """torch.where on the values keeps both branches (a pattern valid at every point:
    stored entries that are zero here are allowed); a Python branch on the values is
    exact at this point only and says so."""
    x = RNG.uniform(-1, 1, 12)
    J, meta = sparse(client, "upwind", x)
    assert meta["value_dependent"] is False
    assert_matches(J, reference(s7.upwind, x), union=True)
    for x in (RNG.uniform(0.5, 1, 9), RNG.uniform(-1, -0.5, 9)):
        J, meta = sparse(client, "branching", x)
        assert meta["value_dependent"] is True and "converted to Python" in meta["notes"][-1]
        assert_matches(J, reference(s7.branching, x))


def test_hessians_by_star_colouring_match_torch_hessian(client):
    for name, x in (("rosen_periodic", RNG.uniform(-1, 1, 20)), ("torus_energy", RNG.uniform(-1, 1, (6, 7)))):
        r = client.post(f"/v1/functions/{name}/hessian", json={"inputs": [f64(x)], "sparsity": "auto"})
        assert r.status_code == 200, r.text
        H, meta = wire.decode_sparse_json(r.json()["hessian"]), r.json()["meta"]
        want = torch.func.hessian(getattr(s7, name))(torch.from_numpy(x)).reshape(x.size, x.size).numpy()
        assert meta["mode"] == "acyclic" and meta["exact"] is True  # fewer products than star colouring
        assert_matches(H, want)
        assert meta["products"] < x.size / 2


# ------------------------------------------------------------------ formats, SDK, size

def test_every_format_carries_the_same_matrix(client):
    """CSR and COO as JSON, scipy's .npz (load_npz, no SDK), dense JSON and .npy: one
    matrix, the one jacrev computes."""
    x = RNG.uniform(0.1, 1, 30)
    want = reference(s7.kinetics, x)
    for fmt in ("csr", "coo"):
        J, meta = sparse(client, "kinetics", x, sparse_format=fmt)
        assert J.format == fmt and meta["format"] == fmt
        assert_matches(J, want)
        buf = io.BytesIO()
        np.save(buf, x)
        r = client.post(f"/v1/functions/kinetics/jacobian?sparsity=auto&sparse_format={fmt}", content=buf.getvalue(),
                        headers={"content-type": "application/x-npy", "accept": "application/x-npz"})
        assert r.status_code == 200, r.text
        M = sp.load_npz(io.BytesIO(r.content))
        assert M.format == fmt
        assert_matches(M, want)
    r = client.post("/v1/functions/kinetics/jacobian", json={"inputs": [f64(x)], "sparsity": "auto", "sparse_format": "dense"})
    np.testing.assert_allclose(wire.decode_json_array(r.json()["jacobian"])[0], want, rtol=1e-12, atol=1e-12)
    r = client.post("/v1/functions/kinetics/jacobian?sparsity=auto&sparse_format=dense", content=buf.getvalue(),
                    headers={"content-type": "application/x-npy", "accept": "application/x-npy"})
    np.testing.assert_allclose(np.load(io.BytesIO(r.content)), want, rtol=1e-12, atol=1e-12)


def test_the_sdk_returns_scipy_sparse(client):
    def forward(request: httpx.Request) -> httpx.Response:
        r = client.request(request.method, str(request.url.copy_with(scheme="http", host="testserver", port=None)),
                           content=request.content, headers=dict(request.headers))
        headers = {k: v for k, v in r.headers.items() if k.lower() not in ("content-encoding", "transfer-encoding")}
        return httpx.Response(r.status_code, headers=headers, content=r.content)

    x = RNG.uniform(0, 1, 40)
    want = reference(s7.graph_laplacian, x)
    with Client("http://sdk.test", http_transport=httpx.MockTransport(forward), max_retries=0) as sdk:
        for transport in ("binary", "json"):
            J = sdk.jacobian("graph_laplacian", x, sparsity="auto", transport=transport)
            assert sp.issparse(J)
            assert_matches(J, want)
        described = sdk.sparsity("graph_laplacian", (40,))
        assert entries(described["matrix"]) == set(zip(*np.nonzero(want)))


def test_a_banded_jacobian_at_a_hundred_thousand_unknowns(client):
    """A 1-D heat step at n = 100,000 as .npy in and scipy's .npz out: 3 products, the
    tridiagonal matrix exactly (the dense one would be 80 GB)."""
    n = 100_000
    x = RNG.uniform(-1, 1, n)
    buf = io.BytesIO()
    np.save(buf, x)
    r = client.post("/v1/functions/heat1d/jacobian?sparsity=auto", content=buf.getvalue(),
                    headers={"content-type": "application/x-npy", "accept": "application/x-npz"})
    assert r.status_code == 200, r.text
    J = sp.load_npz(io.BytesIO(r.content)).tocsr()
    want = sp.diags([np.ones(n - 1), -2 + 0.02 * x, np.ones(n - 1)], [-1, 0, 1], format="csr")
    assert J.shape == (n, n) and J.nnz == 3 * n - 2
    assert abs(J - want).max() < 1e-12


# ------------------------------------------------------------------ ops no longer dense

def test_grid_sample_and_antialiased_interpolation_are_traced_not_dense(client):
    """grid_sample (semi-Lagrangian advection's departure points) and antialiased
    interpolate were taken as dense ('unknown op grid_sampler_2d: assumed dense', exact:
    false): a 16 x 16 advection step took 256 products. Each output now reads its
    sample's taps (found by torch's own kernel, dim by dim), and an antialiased
    resampling its window."""
    for name, shape in (("semi_lagrangian", (16, 16)), ("coarsen", (2, 24, 24))):
        x = RNG.uniform(-1, 1, shape)
        J, meta = sparse(client, name, x)
        assert meta["exact"] is True and meta["notes"] == [], meta
        assert_matches(J, reference(getattr(s7, name), x), union=True)
        assert meta["products"] <= 25, meta["products"]


GRID = torch.rand(2, 3, 4, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 2.6 - 1.3
GRID[0, 0, 0] = 0.0  # a grid point on a pixel: zero weights at the corners past it
GRID3 = torch.rand(1, 2, 3, 2, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 2.4 - 1.2


@pytest.mark.parametrize("mode", ["bilinear", "nearest", "bicubic"])
@pytest.mark.parametrize("padding", ["zeros", "border", "reflection"])
def test_grid_sample_pattern_never_misses_a_nonzero(mode, padding):
    for align in (False, True):
        cases = [(lambda x: F.grid_sample(x.reshape(2, 2, 5, 6), GRID, mode=mode, padding_mode=padding, align_corners=align), 120)]
        if mode != "bicubic":  # (3-D: no bicubic in torch)
            cases.append((lambda x: F.grid_sample(x.reshape(1, 2, 3, 4, 5), GRID3, mode=mode, padding_mode=padding, align_corners=align), 120))
        for f, n in cases:
            x = torch.rand(n, dtype=torch.float64)
            p = trace_jacobian(f, (x,))
            want = set(zip(*np.nonzero(torch.func.jacrev(f)(x).reshape(-1, n).numpy())))
            got = set(zip(p.rows.tolist(), p.cols.tolist()))
            assert p.exact and want <= got and len(got) <= 1.6 * len(want) + 4, (mode, padding, align)


def test_a_grid_that_moves_with_the_inputs_and_hessians():
    """A grid computed from the inputs: each output on its whole channel and its grid
    point (which pixels are read follows the values); Hessian pairs through both."""
    grid = torch.rand(1, 3, 3, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 2 - 1

    def warp(x):
        return F.grid_sample(x[:25].reshape(1, 1, 5, 5), x[25:].reshape(1, 3, 3, 2) * 0.9, align_corners=False)

    x = torch.cat([torch.rand(25, dtype=torch.float64), grid.reshape(-1)])
    p = trace_jacobian(warp, (x,))
    want = set(zip(*np.nonzero(torch.func.jacrev(warp)(x).reshape(-1, x.numel()).numpy())))
    assert want <= set(zip(p.rows.tolist(), p.cols.tolist())) and p.nnz == 9 * 27
    for f, y in ((lambda v: (warp(v) ** 2).sum(), x),
                 (lambda v: (F.grid_sample(v.reshape(1, 1, 5, 5), grid, mode="bicubic", align_corners=False) ** 2).sum(), x[:25])):
        p = trace_hessian(f, (y,))
        H = torch.func.jacrev(torch.func.jacrev(f))(y).numpy()
        assert p.exact and set(zip(*np.nonzero(H))) <= set(zip(p.rows.tolist(), p.cols.tolist()))


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_antialiased_interpolation_pattern_never_misses_a_nonzero(mode):
    for size, shape in (((3, 3), (1, 2, 8, 8)), ((5, 7), (1, 2, 8, 8)), ((16, 4), (1, 1, 8, 8)), (None, (1, 1, 10, 12))):
        kw = {"size": size} if size else {"scale_factor": 0.3}
        for align in (False, True):
            def f(x):
                return F.interpolate(x.reshape(shape), mode=mode, antialias=True, align_corners=align, **kw)

            x = torch.rand(int(np.prod(shape)), dtype=torch.float64)
            p = trace_jacobian(f, (x,))
            want = set(zip(*np.nonzero(torch.func.jacrev(f)(x).reshape(-1, x.numel()).numpy())))
            got = set(zip(p.rows.tolist(), p.cols.tolist()))
            assert p.exact and want <= got and len(got) <= 1.2 * len(want), (size, align)


# ------------------------------------------------------------------ colouring

def test_periodic_stencils_take_fewer_colours_than_any_greedy_order():
    """A 2-D torus's 5-point stencil took 8 products (every greedy order, networkx's,
    DSATUR and the lattice alike, gives 8 where 6 or 7 do) and a 6 x 6 x 6 periodic
    7-point stencil 13 (the modulus). A bounded tabu search after them saves what it
    can find; every colouring still recovers each entry directly (checked when built)."""
    from jacobian_service.sparsity.coloring import choose_coloring

    def torus(u):
        return s7._torus_laplacian(u) + u**3

    for f, shape, most in ((torus, (10, 12), 7), (torus, (11, 13), 7), (s7.laplace3d_periodic, (6, 6, 6), 11)):
        p = trace_jacobian(f, (torch.rand(*shape, dtype=torch.float64),))
        c = choose_coloring(p)
        assert c.lower_bound <= c.n_colors <= most, (shape, c.n_colors, c.strategy)
        if shape == (10, 12):  # deterministic: the pattern cache may recompute it elsewhere
            assert np.array_equal(choose_coloring(p).colors, c.colors)


def test_a_torus_answer_with_fewer_products_is_still_jacrevs(client):
    x = RNG.uniform(-1, 1, (8, 8))
    J, meta = sparse(client, "allen_cahn_torus", x)
    assert meta["products"] == 7 and "tabu" in (client.get("/v1/functions/allen_cahn_torus/sparsity?shapes=8,8").json()["coloring"]["strategy"])
    assert_matches(J, reference(s7.allen_cahn_torus, x))
