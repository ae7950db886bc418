"""Sparse and structured Jacobians, round 24: round-off in the per-example checks, and more.

A scientist's structured Jacobians, each answer against torch.func in this process:

- per-example Jacobians (``batched=true``, request batching) are checked against one VJP
  per example, relative to the answer; float32 terms that cancel inside the function put
  that VJP 1e4 |v| ulps past right vmapped rows, and every such request was computed
  again example by example (8 x 400: 0.4-0.8 s where the vmapped rows take 0.05 s). The
  function's own round-off is measured now, as the sparse checks measure it (batched
  Hessians too: they left their vmapped strategy for torch's own, example by example);
- a NaN entry the pattern misses (``sqrt`` of a negative): a declared band that forgot
  ``y[0]``'s ``sqrt(x[-1])`` answered a 200 without it at ``x[-1] < 0`` (refused at
  every other point). Forward mode spreads no NaN over rows as a VJP's zero seeds do, so
  the JVP that checks a matrix holding NaN counts a NaN row as it counts an infinite one;
  a batch of such points (requests that arrive together) was not checked at all;
- a force computed with ``torch.autograd.grad(create_graph=True)`` inside the function
  could not be traced (autograd recorded no graph over the tracer's tensors: "element 0
  of tensors does not require grad"), so its pattern was probed numerically (dense
  derivatives at random points; entries that vanish there are missed). The tracer now
  records a graph for such a function, and follows its backward as aten ops;
- a declared pattern given as a scipy.sparse matrix (a mesh's adjacency, as a mesh
  library gives it): ``@register(sparsity={"mesh": A})`` refused to register, and a
  ``from_callable`` returning one was a 422 "setting an array element with a sequence"
  at every request. Both take its stored entries now (and ``from_matrix(A,
  hessian=True)`` a Hessian's);
- a few rows (``rows: [a, b]``) of a float32 function through cancelling terms: the
  round-off was measured over those rows' products only, a few places whose largest
  residual fell below the check's, so some rows of a right declared pattern were a 422
  (and of a detected one answered densely). Measured over every row now.

One in-process app serves every case (no new server process).
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from tests import sparse24_functions as s24

from .conftest import ready_app


@pytest.fixture(scope="module")
def client():
    with ready_app("tests.sparse24_functions") as c:
        yield c


def _problem(r, status, code):
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json"), r.headers
    body = r.json()
    assert body["status"] == status and body["code"] == code, body
    assert "Traceback" not in r.text
    return body


def _dense(r, key="jacobian"):
    assert r.status_code == 200, r.text
    j = r.json()[key]
    return np.array(j["data"], dtype=j["dtype"]).reshape(j["shape"]), r.json()["meta"]


# ------------------------------------------------------------------ per-example round-off


def test_per_example_jacobians_through_cancelling_float32_terms_keep_the_vmapped_rows(client, caplog):
    """batched=true over 8 examples of a float32 ring through ``(x * 1e4 + x) - x *
    1e4``: the vmapped rows are right, but the per-example check's VJP carries 1e4 |v|
    of round-off, so each request was taken for a wrong vmap and computed again example
    by example (the engine's WARNING). Now the function's round-off is measured first:
    the vmapped rows are answered, vmap(jacrev)'s, with no example-by-example pass, for
    every request (none is remembered: each batch is checked at its own points)."""
    rng = np.random.default_rng(24)
    fn = torch.func.vmap(torch.func.jacrev(s24.ring_cancels24))
    for _ in range(2):
        x = rng.uniform(0.1, 3, (8, 400)).astype(np.float32)
        with caplog.at_level(logging.INFO, logger="jacobian_service.engine"):
            got, meta = _dense(client.post("/v1/functions/ring_cancels24/jacobian",
                                           json={"inputs": [x.tolist()], "batched": True}))
        want = fn(torch.from_numpy(x)).numpy()
        assert got.shape == (8, 400, 400) and meta["mode"] == "rev", meta
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
        assert not [r.getMessage() for r in caplog.records if "example by example" in r.getMessage()]


def test_per_example_hessians_through_cancelling_float32_terms_stay_vmapped(client):
    """The same for batched Hessians: the first example's Hessian was checked against
    one Hessian-vector product whose round-off (1e4 |v|) took the vmapped reverse over
    reverse strategy for one torch's vmap gets wrong, and from then on every batch of
    the function ran torch's own strategy example by example (meta.mode
    ``jacfwd_jacrev``). Now the vmapped strategy stays (meta.mode ``jacrev_grad``), at a
    second batch too, and its answer is vmap(hessian)'s."""
    rng = np.random.default_rng(240)
    fn = torch.func.vmap(torch.func.hessian(s24.energy_cancels24))
    for _ in range(2):
        x = rng.uniform(0.1, 3, (8, 200)).astype(np.float32)
        got, meta = _dense(client.post("/v1/functions/energy_cancels24/hessian",
                                       json={"inputs": [x.tolist()], "batched": True}), "hessian")
        assert meta["mode"] == "jacrev_grad", meta
        np.testing.assert_allclose(got, fn(torch.from_numpy(x)).numpy(), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ NaN entries the pattern misses


def _csr(r):
    """A 200's CSR matrix (NaN spelled as JSON cannot) and meta."""
    assert r.status_code == 200, r.text
    j = r.json()["jacobian"]
    data = np.array([float(v) for v in j["data"]], dtype=np.float64)
    return sp.csr_array((data, j["indices"], j["indptr"]), shape=j["shape"]), r.json()["meta"]


@pytest.mark.parametrize("name,declared,x", [
    ("wrap_sqrt24", "band", [0.3, 0.5, 0.7, 0.2, 0.9, -0.25]),
    ("diag_sqrt24", "diag", [0.3, -0.5, 0.7, 0.2]),  # (its NaN column is covered by (1, 1))
])
@pytest.mark.parametrize("mode", ["rev", "fwd"])
def test_a_declared_pattern_missing_a_nan_entry_is_refused(client, name, declared, x, mode):
    """``y[0]`` also reads ``sqrt`` of an input the declared pattern leaves out, negative
    here: that entry is NaN (jacrev: NaN in its whole column, spread by zero seeds). The
    answer was a 200 without it; now a 422, as at any positive value. sparsity=auto has
    the entry, NaN, and jacrev's values at every other entry of the pattern."""
    r = client.post(f"/v1/functions/{name}/jacobian", json={"inputs": [x], "sparsity": declared, "mode": mode})
    body = _problem(r, 422, "invalid_input")
    assert f"'{declared}'" in body["detail"] and "misses nonzeros" in body["detail"], body
    got, meta = _csr(client.post(f"/v1/functions/{name}/jacobian", json={"inputs": [x], "sparsity": "auto"}))
    want = torch.func.jacrev(getattr(s24, name))(torch.tensor(x, dtype=torch.float64)).numpy()
    j = len(x) - 1 if name == "wrap_sqrt24" else 1
    assert meta["source"] == "detected" and np.isnan(got[0, j]), (meta, got.toarray())
    dense = got.toarray()
    finite = np.isfinite(want)
    np.testing.assert_allclose(dense[finite], want[finite], rtol=1e-12, atol=1e-12)


def test_a_nan_spread_by_where_keeps_the_declared_band(client):
    """``where(x[-1] > 0, sqrt(x[-1]), 0)``, the band forgetting it: at x[-1] < 0 its
    derivative is 0 (the untaken branch), and jacrev's NaN column is only 0 * NaN spread
    by its backward pass. Forward mode says 0, so the band is not refused there (a 200,
    jacrev's finite values, its NaN at the band's own entries of that column); at
    x[-1] > 0, where the entry is real, it is (422)."""
    x = [0.3, 0.5, 0.7, 0.2, 0.9, -0.25]
    got, meta = _csr(client.post("/v1/functions/wrap_where24/jacobian", json={"inputs": [x], "sparsity": "band"}))
    want = torch.func.jacrev(s24.wrap_where24)(torch.tensor(x, dtype=torch.float64)).numpy()
    assert meta["source"] == "declared" and got.nnz == 16 and got[0, 5] == 0, got.toarray()
    dense = got.toarray()
    assert np.isnan(dense[4:, 5]).all()
    finite = np.isfinite(want)
    np.testing.assert_allclose(dense[finite], want[finite], rtol=1e-12, atol=1e-12)
    r = client.post("/v1/functions/wrap_where24/jacobian", json={"inputs": [[*x[:-1], 0.25]], "sparsity": "band"})
    _problem(r, 422, "invalid_input")


def test_a_batch_of_points_missing_a_nan_entry_is_checked_point_by_point():
    """Requests that arrive together run as one batch of points (sparsity.compute's
    sparse_batch), which skipped the check from the other side: two points at x[-1] < 0
    answered the declared band without its NaN entry. Now a batch whose matrices are not
    finite is computed point by point (ProvenWrong: the engine's answer to it), where
    each point is checked and refused (the test above); a finite batch still answers at
    once (test_sparse_round23's batch)."""
    from jacobian_service.sparsity import PatternCache, banded
    from jacobian_service.sparsity.compute import ProvenWrong, resolve, sparse_batch

    fn = s24.wrap_sqrt24
    points = torch.tensor([[0.3, 0.5, 0.7, 0.2, 0.9, -0.25], [0.4, 0.5, 0.1, 0.2, 0.9, -0.5]], dtype=torch.float64)
    p, coloring, _ = resolve(fn, [points[0]], pattern=banded(1, 1), cache=PatternCache())
    with pytest.raises(ProvenWrong, match="not finite"):
        sparse_batch(fn, [points], (0,), p, coloring, 6)


# ------------------------------------------------------------------ a force from autograd inside the function


@pytest.mark.parametrize("n", [8, 300])
def test_a_force_from_autograd_grad_inside_the_function_is_traced(client, n):
    """A chain's force, ``-dE/dx`` by ``torch.autograd.grad(create_graph=True)`` inside
    the function: tracing failed ("element 0 of tensors does not require grad") and the
    pattern was probed (meta.source ``probed``, not exact, the failure in its notes).
    Now it is traced: ``detected``, exact, tridiagonal (3 products), with no note, and
    the matrix is jacrev's (the negative Hessian of E) to round-off."""
    x = np.linspace(0.1, 2, n)
    got, meta = _csr(client.post("/v1/functions/chain_force24/jacobian", json={"inputs": [x.tolist()], "sparsity": "auto"}))
    want = torch.func.jacrev(s24.chain_force24)(torch.from_numpy(x)).numpy()
    assert meta["source"] == "detected" and meta["exact"] and meta["notes"] == [], meta
    assert meta["products"] == 3 and got.nnz == 3 * n - 2, meta
    np.testing.assert_allclose(got.toarray(), want, rtol=1e-12, atol=1e-12)
    hess = torch.func.hessian(s24._chain_energy)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got.toarray(), -hess, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ declared patterns as scipy matrices


@pytest.mark.parametrize("declared", ["mesh", "mesh_fn", "mesh_coo"])
def test_a_pattern_declared_as_a_scipy_matrix_is_used(client, declared):
    """A ring's mesh as scipy gives it (a CSR array, a callable returning one, a COO
    array): the Jacobian over it, 3 products, jacrev's values, and GET /sparsity shows
    the declared pattern (36 entries). The callable's was a 422 'setting an array
    element with a sequence'; the matrices themselves could not be registered."""
    x = np.linspace(-1, 1, 12)
    got, meta = _csr(client.post("/v1/functions/ring_diffusion24/jacobian",
                                 json={"inputs": [x.tolist()], "sparsity": declared}))
    assert meta["source"] == "declared" and meta["pattern"] == declared and meta["products"] == 3, meta
    assert got.nnz == 36
    want = torch.func.jacrev(s24.ring_diffusion24)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got.toarray(), want, rtol=1e-12, atol=1e-12)
    r = client.get(f"/v1/functions/ring_diffusion24/sparsity?shapes=12&sparsity={declared}")
    assert r.status_code == 200, r.text
    assert r.json()["pattern"]["source"] == "declared" and r.json()["pattern"]["nnz"] == 36, r.json()


def test_a_hessian_pattern_from_a_scipy_matrix(client):
    """from_matrix(A, hessian=True): the ring energy's Hessian over the mesh's pattern,
    torch.func.hessian's values."""
    x = np.linspace(-1, 1, 12)
    r = client.post("/v1/functions/ring_energy24/hessian", json={"inputs": [x.tolist()], "sparsity": "mesh_h"})
    assert r.status_code == 200, r.text
    j = r.json()["hessian"]
    got = sp.csr_array((np.array(j["data"], dtype=np.float64), j["indices"], j["indptr"]), shape=j["shape"])
    assert r.json()["meta"]["source"] == "declared" and got.nnz == 36, r.json()["meta"]
    want = torch.func.hessian(s24.ring_energy24)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got.toarray(), want, rtol=1e-12, atol=1e-12)


def test_from_matrix_refuses_what_is_no_scipy_matrix_and_a_wrong_shape():
    """from_matrix takes a scipy.sparse matrix only (a dense list is a clear ValueError at
    registration), and its shape is checked against the call's, as coo's is."""
    from jacobian_service.sparsity import from_matrix

    with pytest.raises(ValueError, match="scipy.sparse"):
        from_matrix([[1, 0], [0, 1]])
    with pytest.raises(ValueError, match=r"for shape \(12, 12\)"):
        from_matrix(s24._mesh24(12)).build([(10,)], 10)


# ------------------------------------------------------------------ a few rows' round-off


def test_every_few_rows_of_a_declared_pattern_through_cancelling_terms_answer(client, caplog):
    """Rows [a, a + w) of the declared periodic ring through ``(x * 1e4 + x) - x * 1e4``
    (float32, n = 50): the random check's difference is the function's round-off, but
    that round-off was measured over the few rows asked for, and for some rows (49:50
    among them) it came out below the check's: a 422 'misses nonzeros' for a right
    pattern. Now every such request answers jacrev's rows, over the declared pattern; the
    diagonal, which misses x[i-1], is still refused at those rows."""
    x = np.linspace(0.1, 3, 50).astype(np.float32)
    want = torch.func.jacrev(s24.ring_declared24)(torch.from_numpy(x)).numpy()
    for a in range(50):
        for w in (1, 2, 5):
            b = min(50, a + w)
            got, meta = _csr(client.post("/v1/functions/ring_declared24/jacobian",
                                         json={"inputs": [x.tolist()], "sparsity": "ring", "rows": [a, b]}))
            assert meta["source"] == "declared" and got.shape == (b - a, 50), meta
            np.testing.assert_allclose(got.toarray(), want[a:b], rtol=1e-5, atol=1e-5)
    for a, b in ((49, 50), (0, 1), (10, 15)):
        r = client.post("/v1/functions/ring_declared24/jacobian",
                        json={"inputs": [x.tolist()], "sparsity": "diag", "rows": [a, b]})
        assert "misses nonzeros" in _problem(r, 422, "invalid_input")["detail"]
