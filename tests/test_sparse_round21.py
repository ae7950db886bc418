"""Sparse Jacobians and Hessians, round 21: every pattern the products use is checked.

Round 20 left type reads no watch could see (an attribute name built at run time,
``operator.attrgetter("__class__.__name__")``, code compiled under torch's own file name):
each an exact, unchecked 200 with jacrev's column 0 missing. Reading the function's code
cannot rule such reads out, so a traced pattern is no longer trusted: the products carry
one more, with a random seed, in their own vmap, and a pattern it proves wrong is answered
densely (then widened in the cache). Then the structure under relu and where (the
pattern is never a point's zeros, and the check never takes those zeros for a wrong
pattern), every sparse format read by scipy, and the Hessian's symmetric colourings
against a plain column colouring. Each answer against torch.func in this process.

One in-process app serves every case (no new server process).
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from tests import sparse21_functions as s21

from .conftest import ready_app
from .test_sparse_round17 import sparse_answer  # (a 200's matrix as scipy CSR, and its meta)


@pytest.fixture(scope="module")
def client():
    with ready_app("tests.sparse21_functions") as c:
        yield c


# ------------------------------------------------------------------ type reads no watch sees

DENSE = "the products proved this pattern wrong at this point"  # (compute.DENSE_NOTE's start)
WIDENED = "widened by the nonzeros of a point where the products proved it wrong"  # (compute.WIDENED_NOTE)


@pytest.mark.parametrize("check", sorted(s21.CHECKS))
def test_a_type_read_no_watch_sees_is_caught_by_the_products(client, check):
    """``u[0] if <u's type is torch.Tensor> else u[0].detach()`` (same values, not the same
    derivative), the check out of the type watch's sight: ``getattr(u, "__cl" + "ass__")``
    (a name built at run time), ``operator.attrgetter("__class__.__name__")`` (a dotted
    name inside a C helper's string) and code compiled under torch's file name (taken as
    torch's own). The watch saw nothing, so the trace's pattern (the detached arm: the
    tracer's tensors are a subclass) was exact and unchecked: a 200 with column 0 missing.
    Now its products carry one with a random seed, which proves the pattern wrong: the
    first point is answered densely, the cached pattern widened by its nonzeros, and the
    second point's products over the widened pattern are jacrev's."""
    fn = s21.COUPLED[check]
    for i, u in enumerate((np.array([0.5, 1.5, -0.7, 2.0, 1.1]), np.array([1.5, -0.5, 0.3, 0.9, -1.2]))):
        got, meta = sparse_answer(client, f"coupled21_{check}", [u])
        want = torch.func.jacrev(fn)(torch.from_numpy(u)).numpy()
        assert want[1:, 0].all()  # (the coupling the trace's arm left out)
        np.testing.assert_allclose(got.toarray(), want, rtol=1e-12, atol=1e-12)
        if i == 0:
            assert any(n.startswith(DENSE) for n in meta["notes"]), meta
        else:
            assert WIDENED in meta["notes"] and not any(n.startswith(DENSE) for n in meta["notes"]), meta
            assert meta["cached"] == "memory" and meta["products"] < 5, meta


def test_a_gradient_hook_the_trace_cannot_see_is_caught_by_the_products(client):
    """``y.register_hook(lambda g: g / g.norm())``: backward hooks run in the products,
    never in the trace, and a colour's VJP normalises the sum of its rows' cotangents
    where jacrev normalises each row's. The traced (bidiagonal) pattern was exact and
    unchecked: a 200 1.15 off jacrev. Now the checking product proves it wrong (the
    function's products are not linear in their seeds): jacrev's answer, densely, the
    note saying why, at every point."""
    for u in (np.linspace(0.5, 1.5, 8), np.linspace(-1.0, 2.0, 8)):
        got, meta = sparse_answer(client, "hooked21", [u])
        want = torch.func.jacrev(s21.hooked21)(torch.from_numpy(u)).numpy()
        np.testing.assert_allclose(got.toarray(), want, rtol=1e-12, atol=1e-12)
        assert any(n.startswith(DENSE) and "not linear" in n for n in meta["notes"]), meta


def test_a_hessian_through_a_type_read_no_watch_sees_is_torchs(client):
    """A chain energy coupled to ``u[0]`` where ``getattr(u, "__cl" + "ass__")`` says plain
    torch.Tensor: its traced Hessian pattern missed the coupling (an exact, unchecked 200
    with H[0, 2:] zero). Now the Hessian-vector products carry the checking one: =
    torch.func.hessian."""
    u = np.array([0.5, 1.5, -0.7, 2.0, 1.1])
    got, meta = sparse_answer(client, "energy21_built_name", [u], kind="hessian")
    want = torch.func.hessian(s21.energy21_built_name)(torch.from_numpy(u)).numpy()
    assert want[0, 2:].all()
    np.testing.assert_allclose(got.toarray(), want, rtol=1e-12, atol=1e-12)


def test_a_batch_of_points_proves_a_wrong_traced_pattern_wrong():
    """Requests batched together share one pattern, every point's products in one vmap;
    a traced pattern was trusted there too (an exact, unchecked, wrong matrix at each
    point). Now each point's checking product proves it wrong (``ProvenWrong``: the
    caller answers each point alone, densely)."""
    from jacobian_service.sparsity import PatternCache
    from jacobian_service.sparsity.compute import ProvenWrong, resolve, sparse_batch

    fn = s21.COUPLED["attrgetter"]
    points = torch.tensor([[0.5, 1.5, -0.7, 2.0, 1.1], [1.5, -0.5, 0.3, 0.9, -1.2]], dtype=torch.float64)
    p, coloring, _ = resolve(fn, [points[0]], cache=PatternCache())
    with pytest.raises(ProvenWrong, match="random seed"):
        sparse_batch(fn, [points], (0,), p, coloring, 5)
    # (a right pattern passes the same check: each point's matrix is jacrev's)
    chain = s21.gated21
    p, coloring, _ = resolve(chain, [points[0]], cache=PatternCache())
    got, _ = sparse_batch(chain, [points], (0,), p, coloring, 5)
    for m, x in zip(got, points):
        np.testing.assert_allclose(m.toarray(), torch.func.jacrev(chain)(x).numpy(), rtol=1e-12, atol=1e-12)


def test_a_batchs_checking_seed_does_not_fail_its_vmap_check():
    """A batch's vmapped products are checked once against one product of a random mix
    of their seeds (``vmap_agrees``, its tolerance relative to the result). The checking
    seed, random in every entry, makes that mix round where its product's terms cancel: a
    right vmap was taken for a wrong one (``VmapDisagrees``, 5 batches in 30 of random
    points here), and the verdict, kept per function and shapes, sent every later batch
    to one point at a time. Now such a chunk is compared with its products one at a time
    (as a single point's chunks are) before vmap is called wrong."""
    from jacobian_service.sparsity import PatternCache
    from jacobian_service.sparsity.compute import resolve, sparse_batch

    from .test_sparsity_compute import _mixed

    g = torch.Generator().manual_seed(34)  # (a point where the mix's round-off passed the tolerance)
    xs, ys = torch.randn(2, 12, generator=g, dtype=torch.float64), torch.randn(2, 12, generator=g, dtype=torch.float64)
    p, coloring, _ = resolve(_mixed, [xs[0], ys[0]], (0, 1), mode="fwd", cache=PatternCache())
    mats, _ = sparse_batch(_mixed, [xs, ys], (0, 1), p, coloring, 12, chunk_size=2, name="batch21_mixed")
    for m, x, y in zip(mats, xs, ys):
        want = torch.cat([t.reshape(12, -1) for t in torch.func.jacrev(_mixed, argnums=(0, 1))(x, y)], 1)
        np.testing.assert_allclose(m.toarray(), want.numpy(), rtol=1e-12, atol=1e-12)


def test_the_check_runs_in_the_products_own_vmap(monkeypatch):
    """The checking product is one more seed in the colours' vmap, not a call of its
    own (a second call's fixed cost made the check +90 % on lorenz96 at n = 8,192, +300 %
    on small bands): a cached request's VJPs are one call of the vmapped pullback, seeds
    [colours..., random]. (Forward products are checked by the VJP that proves them
    jacrev's, as before.)"""
    from jacobian_service.sparsity import PatternCache, compute, sparse_jacobian

    seeds_per_call = []
    single = compute._single

    def counted(*args, **kwargs):
        run = single(*args, **kwargs)

        def counting(seeds):
            seeds_per_call.append(int(seeds[0].shape[0]))
            return run(seeds)
        return counting

    def cells(x):  # 4 cells of 3: one VJP colours them all
        return (x.reshape(4, 3) ** 2).sum(1) * x.reshape(4, 3)[:, 0]

    cache = PatternCache()
    x = torch.linspace(0.3, 0.9, 12, dtype=torch.float64)
    sparse_jacobian(cells, [x], cache=cache)
    monkeypatch.setattr(compute, "_single", counted)
    r = sparse_jacobian(cells, [x], cache=cache)
    assert r.mode == "rev" and r.n_products == 1
    np.testing.assert_allclose(r.matrix.toarray(), torch.func.jacrev(cells)(x).numpy(), rtol=1e-12, atol=1e-12)
    assert seeds_per_call == [2]


def test_a_custom_function_whose_backward_is_not_linear_keeps_its_products():
    """A custom ``autograd.Function`` whose backward is not linear in its cotangent
    (torch's autograd_function_db's CubeGenVmap: ``g slope + 6 slope``): a random
    seed's product is no mix of the colours', so the check took every such pattern for a
    wrong one, and every request went dense (a warning, a note that it "misses entries").
    Its pattern is dense over the Function's inputs already (one VJP a row, as jacrev's
    rows): it keeps the free check only, = jacrev."""
    from jacobian_service.sparsity import PatternCache, sparse_jacobian

    from .parity22_functions import CubeGenVmap

    def cube(x):
        return CubeGenVmap.apply(x)[0] * 2.0

    x = torch.linspace(0.5, 1.5, 5, dtype=torch.float64)
    r = sparse_jacobian(cube, [x], cache=PatternCache())
    np.testing.assert_allclose(r.matrix.toarray(), torch.func.jacrev(cube)(x).numpy(), rtol=1e-12, atol=1e-12)
    assert r.mode == "rev" and r.n_products == 5 and not any(n.startswith(DENSE) for n in r.pattern.notes)


# ------------------------------------------------------------------ structure, not values


@pytest.mark.parametrize("fmt", ["csr", "csc", "coo", "dense"])
def test_relu_and_where_keep_their_structure_in_every_format(client, fmt):
    """``relu(u.roll(1) - u) + where(u > 0, u * u.roll(-1), u**2 / 2)`` at a point where
    every relu is dead and every ``where`` takes the square: the Jacobian there is
    diagonal, but the pattern is the structure (each output on three inputs), stored
    zeros where this point's values make them. The next point (other relus alive, other
    ``where`` arms) reuses the cached pattern, and the checking product, which
    now runs at every request, takes neither point's zeros for a wrong pattern (no dense
    answer). Each format comes back as ``.npz`` that ``scipy.sparse.load_npz`` reads (a
    dense one: ``numpy.load``), = jacrev."""
    from .conftest import npz_bytes

    for i, u in enumerate((np.full(5, -1.0), np.array([2.5, -2.0, 1.5, 1.0, 0.5]))):
        r = client.post(f"/v1/functions/gated21/jacobian?sparsity=auto&sparse_format={fmt}",
                        content=npz_bytes(u=u), headers={"content-type": "application/x-npz", "accept": "application/x-npz"})
        assert r.status_code == 200, r.text
        want = torch.func.jacrev(s21.gated21)(torch.from_numpy(u)).numpy()
        if fmt == "dense":
            with np.load(io.BytesIO(r.content)) as z:
                got = z[z.files[0]]
        else:
            m = sp.load_npz(io.BytesIO(r.content))
            assert m.format == fmt and m.nnz == 15  # (three a row, the zeros of this point stored)
            got = m.toarray()
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
        assert (want != 0).sum() == (5 if i == 0 else 12)
    doc = client.post("/v1/functions/gated21/jacobian", json={"inputs": [u.tolist()], "sparsity": "auto"}).json()
    assert doc["meta"]["cached"] == "memory" and not any(n.startswith(DENSE) for n in doc["meta"]["notes"])


def test_a_hessians_symmetric_colouring_takes_fewer_products_than_its_columns():
    """The Hessians SparseMatrixColorings.jl's tests colour: an arrowhead (``x0 *
    sum(x**2)``: a plain column colouring needs one colour a column, a star colouring
    2: the hub, then every leaf), a chain (tridiagonal: 3 columns, acyclic 2) and a
    5-point membrane (5 columns, acyclic 3 by lattice, the fewest possible). Each
    answer, with its checking product, = torch.func.hessian."""
    from jacobian_service.sparsity import PatternCache, sparse_hessian
    from jacobian_service.sparsity.coloring import choose_coloring

    def arrow(x):
        return x[0] * (x**2).sum() + (x**4).sum()

    def chain(x):
        return ((x[1:] - x[:-1]) ** 4).sum() + (x**4).sum()

    def membrane(u):
        return ((u[1:, :] - u[:-1, :]) ** 4).sum() + ((u[:, 1:] - u[:, :-1]) ** 4).sum() + (u**4).sum()

    g = torch.Generator().manual_seed(21)
    for fn, x, columns, fewest in ((arrow, torch.randn(40, generator=g, dtype=torch.float64), 40, 2),
                                   (chain, torch.randn(40, generator=g, dtype=torch.float64), 3, 2),
                                   (membrane, torch.randn(12, 12, generator=g, dtype=torch.float64), 5, 3)):
        r = sparse_hessian(fn, [x], cache=PatternCache())
        want = torch.func.hessian(fn)(x).reshape(x.numel(), -1).numpy()
        np.testing.assert_allclose(r.matrix.toarray(), want, rtol=1e-10, atol=1e-10)
        assert choose_coloring(r.pattern, "rev").n_colors == columns
        assert r.n_products == fewest, (fn.__name__, r.coloring.mode)
        assert not any(n.startswith(DENSE) for n in r.pattern.notes)
