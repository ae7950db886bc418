"""Sparse Jacobians and Hessians, round 23: round-off, half precision and infinities in the checks.

A scientist's mostly-zero Jacobians, each answer against torch.func in this process:

- the dense Jacobians (and Hessians) a probe reads are checked against one VJP (one
  Hessian-vector product), relative to the answer; float32 terms that cancel inside the
  function put that product past it on a right vmap, and the probe went row by row (4.9 s
  at 1,500 elements where jacrev takes 0.12 s). The function's own round-off is measured
  now, as the products' check measures it;
- an infinite derivative the pattern misses: the free check skipped every value not
  finite, and a colour's VJP can put a missing infinity on another row's entry, so a
  declared pattern that forgot an entry answered a 200 without it at the one point where
  that entry is infinite (a 422 at every other point);
- a batch of points (requests that arrive together) was not measured for round-off:
  float32 cancelling terms sent every point's products again alone;
- the random check's tolerance, 1024 ulps, was 100 % in float16 and 800 % in bfloat16:
  a declared pattern missing an entry as large as the diagonal was a 200, 0.75 off.

One in-process app serves every case (no new server process).
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from tests import sparse23_functions as s23

from .conftest import ready_app
from .test_sparse_round17 import sparse_answer  # (a 200's matrix as scipy CSR, and its meta)


@pytest.fixture(scope="module")
def client():
    with ready_app("tests.sparse23_functions") as c:
        yield c


def _matrix(r, key="jacobian"):
    """A 200's sparse matrix (CSR JSON, its NaN and infinities spelled as JSON cannot) and meta."""
    assert r.status_code == 200, r.text
    j = r.json()[key]
    data = np.array([float(v) for v in j["data"]], dtype=np.float64)
    return sp.csr_array((data, j["indices"], j["indptr"]), shape=j["shape"]), r.json()["meta"]


def _problem(r, status, code):
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json"), r.headers
    body = r.json()
    assert body["status"] == status and body["code"] == code, body
    assert "Traceback" not in r.text
    return body


# ------------------------------------------------------------------ the dense check's round-off


def test_a_probe_through_cancelling_float32_terms_keeps_jacrevs_vmapped_rows(client, caplog):
    """A float32 step through ``(x * 1e4 + x) - x * 1e4``, written into a buffer the
    tracer cannot follow: probed. jacrev's vmapped rows are right, and the random VJP
    that checks them carries 1e4 |v| of round-off: they were taken for a wrong vmap and
    every dense Jacobian of the probe was computed again row by row (the WARNING). Now
    the same matrix from the vmapped rows, and no row-by-row pass."""
    x = np.linspace(0.1, 3, 400, dtype=np.float32)
    with caplog.at_level(logging.WARNING, logger="jacobian_service.sparsity"):
        got, meta = sparse_answer(client, "probed_cancels23", [x])
    want = torch.func.jacrev(s23.probed_cancels23)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got.toarray(), want, rtol=1e-6, atol=1e-6)
    assert meta["source"] == "probed" and meta["products"] == 2 and got.nnz == 2 * x.size, meta
    assert not [r.getMessage() for r in caplog.records if "row by row" in r.getMessage()]


def test_a_probed_hessian_through_cancelling_float32_terms_keeps_the_vmapped_hessian(client, caplog):
    """The same for a Hessian: the dense Hessians of the probe were checked against one
    Hessian-vector product, whose round-off (1e4 |v|) took the right vmapped Hessian for
    a wrong one, and each was computed again row by row, jacrev(jacrev) one row at a
    time. Now torch.func.hessian's matrix, probed, without that pass."""
    x = np.linspace(0.1, 3, 300, dtype=np.float32)
    with caplog.at_level(logging.WARNING, logger="jacobian_service.sparsity"):
        got, meta = sparse_answer(client, "probed_energy23", [x], kind="hessian")
    want = torch.func.hessian(s23.probed_energy23)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got.toarray(), want, rtol=1e-5, atol=1e-5)
    assert meta["source"] == "probed" and got.nnz == 3 * x.size, meta
    assert not [r.getMessage() for r in caplog.records if "row by row" in r.getMessage()]


# ------------------------------------------------------------------ infinities the pattern misses


@pytest.mark.parametrize("last", [0.25, 0.0])
def test_a_declared_band_missing_an_infinite_entry_is_refused(client, last):
    """``y[0]`` also reads ``sqrt(x[-1])``, which the declared tridiagonal band leaves
    out. At x[-1] = 0.25 the check refused it (422); at x[-1] = 0, where that entry is
    infinite, the product's infinity was skipped as 'not finite' and the answer was a
    200 without it (jacrev: inf at (0, 5)). Refused at both points, and sparsity=auto
    has the entry."""
    x = np.array([0.3, 0.5, 0.7, 0.2, 0.9, last])
    r = client.post("/v1/functions/wrap_forgotten23/jacobian", json={"inputs": [x.tolist()], "sparsity": "band"})
    body = _problem(r, 422, "invalid_input")
    assert "'band'" in body["detail"] and "misses nonzeros" in body["detail"], body
    got, _ = _matrix(client.post("/v1/functions/wrap_forgotten23/jacobian",
                                 json={"inputs": [x.tolist()], "sparsity": "auto"}))
    want = torch.func.jacrev(s23.wrap_forgotten23)(torch.from_numpy(x)).numpy()
    assert got[0, 5] == want[0, 5] and (last > 0 or np.isposinf(got[0, 5])), (got[0, 5], want[0, 5])
    finite = np.isfinite(want)
    np.testing.assert_allclose(got.toarray()[finite], want[finite], rtol=1e-12, atol=1e-12)


def test_an_infinite_entry_a_covered_column_hides_is_refused(client):
    """A declared diagonal missing y[0]'s sqrt(x[1]): its one VJP sums every row, so at
    x[1] = 0 the missing inf landed on (1, 1), in a column that holds one either way
    (the checks by columns cannot see it): a 200 with inf at (1, 1) and nothing at
    (0, 1), where jacrev has inf. Now a matrix holding a value that is not finite is
    checked by one JVP too (row 0 infinite, the matrix's row 0 finite): a 422, and
    sparsity=auto has the entry where jacrev has it."""
    x = np.array([0.3, 0.0, 0.7, 0.2, 0.9, 0.5])
    r = client.post("/v1/functions/diag_sqrt23/jacobian", json={"inputs": [x.tolist()], "sparsity": "diag"})
    body = _problem(r, 422, "invalid_input")
    assert "'diag'" in body["detail"] and "infinite" in body["detail"], body
    got, _ = _matrix(client.post("/v1/functions/diag_sqrt23/jacobian", json={"inputs": [x.tolist()], "sparsity": "auto"}))
    want = torch.func.jacrev(s23.diag_sqrt23)(torch.from_numpy(x)).numpy()
    assert np.isposinf(got[0, 1]) and np.isposinf(want[0, 1])
    finite = np.isfinite(want)
    np.testing.assert_allclose(got.toarray()[finite], want[finite], rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ a batch's round-off


def test_a_batch_through_cancelling_float32_terms_keeps_its_pattern():
    """Requests batched together run every point's products in one vmap, checked at each
    point by one random product, but against a fixed tolerance only: the function's
    round-off (measured for one point since round 22) was not measured for a batch, so
    a batch of float32 points through cancelling terms was 'proven wrong'
    (``ProvenWrong``: every point's products computed again alone). Now each point's
    difference is held to its own measured round-off: the batch answers, each point's
    matrix jacrev's; a pattern that misses an entry is still proven wrong."""
    from jacobian_service.sparsity import PatternCache
    from jacobian_service.sparsity.compute import ProvenWrong, resolve, sparse_batch

    points = torch.stack([torch.linspace(0.1, 3, 64), torch.linspace(-2, 1, 64), torch.linspace(0.5, 0.7, 64)])
    fn = s23.ring_cancels23
    p, coloring, _ = resolve(fn, [points[0]], cache=PatternCache())
    got, _ = sparse_batch(fn, [points], (0,), p, coloring, 64)
    for m, x in zip(got, points):
        np.testing.assert_allclose(m.toarray(), torch.func.jacrev(fn)(x).numpy(), rtol=1e-5, atol=1e-5)
        assert m.nnz == 128
    # (the diagonal alone misses the ring's neighbour: each point's products say so)
    diagonal = type(p).from_dense(np.eye(64, dtype=bool), name="diag", source="probed")
    _, diag_coloring, _ = resolve(fn, [points[0]], pattern=diagonal, cache=PatternCache())
    with pytest.raises(ProvenWrong):
        sparse_batch(fn, [points], (0,), diagonal, diag_coloring, 64)


# ------------------------------------------------------------------ half precision's check


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_a_wrong_declared_pattern_is_refused_in_half_precision(client, dtype):
    """The random check's tolerance was 1024 ulps of the dtype: 100 % of a value in
    float16, 800 % in bfloat16, so no missing entry could show. A declared diagonal
    missing the sub-diagonal (as large as the diagonal) was a 200 whose diagonal read
    the two summed, 0.75 off jacrev, in float16 and bfloat16, where float32 is a 422.
    Now the tolerance stops at 1 % (past it the function's measured round-off decides):
    refused in every dtype, and the right band answers jacrev's matrix."""
    x = {"dtype": dtype, "shape": [12], "data": np.linspace(0.5, 1.5, 12).tolist()}
    r = client.post("/v1/functions/bidiag23/jacobian", json={"inputs": [x], "sparsity": "diag"})
    body = _problem(r, 422, "invalid_input")
    assert "'diag'" in body["detail"] and "misses nonzeros" in body["detail"], body
    got, meta = _matrix(client.post("/v1/functions/bidiag23/jacobian", json={"inputs": [x], "sparsity": "tri"}))
    t = torch.tensor(x["data"], dtype=getattr(torch, dtype))
    want = torch.func.jacrev(s23.bidiag23)(t).to(torch.float64).numpy()
    np.testing.assert_allclose(got.toarray(), want, rtol=1e-6, atol=1e-6)
    assert meta["source"] == "declared" and meta["products"] == 3, meta


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_a_wrong_declared_hessian_pattern_is_refused_in_half_precision(client, dtype):
    """The same for a Hessian's products (Hessian-vector products, checked by one with a
    random seed): a declared diagonal Hessian of a chain energy was a 200 in float16 and
    bfloat16; now a 422, and the right tridiagonal declaration is torch.func.hessian's."""
    x = {"dtype": dtype, "shape": [10], "data": np.linspace(0.5, 1.5, 10).tolist()}
    r = client.post("/v1/functions/chain_energy23/hessian", json={"inputs": [x], "sparsity": "hdiag"})
    body = _problem(r, 422, "invalid_input")
    assert "'hdiag'" in body["detail"] and "misses nonzeros" in body["detail"], body
    got, _ = _matrix(client.post("/v1/functions/chain_energy23/hessian", json={"inputs": [x], "sparsity": "htri"}),
                     "hessian")
    want = torch.func.hessian(s23.chain_energy23)(torch.tensor(x["data"], dtype=getattr(torch, dtype)))
    np.testing.assert_allclose(got.toarray(), want.to(torch.float64).numpy(), rtol=1e-6, atol=1e-6)
