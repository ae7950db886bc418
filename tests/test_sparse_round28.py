"""Sparse derivatives, round 28: the pattern check of outputs whose leaves have other dtypes.

The check runs one product with a random seed beside the colours' (0/1 seeds, exact in
every dtype) and compares it with the decompressed matrix, at the inputs' dtype's
tolerance. A float16, bfloat16 or float32 output leaf beside float64 ones (or of a
float64 input) rounds its share of that product in its own dtype: the seed where it
enters the leaf's backward, the terms there. With ``sparsity=auto`` a right pattern was
"proven wrong" and computed densely (160 products for 2 at n = 40, and a note in meta
saying the pattern missed entries); a right declared pattern was refused (a 422). Now
each output row is held to the coarser of its leaf's dtype and the inputs'
(sparsity.verify.leaf_tolerance), and the checks still refuse a declared pattern that
misses entries in any one leaf, for every input dtype.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from tests import sparse28_functions as s28

from .conftest import ready_app
from .test_sparse_round17 import csr

DTYPES = ["float16", "bfloat16", "float32", "float64"]
N = 40
X = np.random.default_rng(2).standard_normal(N)  # (a point where float32 inputs were proven wrong too)


@pytest.fixture(scope="module")
def client():
    with ready_app("tests.sparse28_functions") as c:
        yield c


def _post(client, name, dtype, sparsity, kind="jacobian"):
    return client.post(f"/v1/functions/{name}/{kind}",
                       json={"inputs": [{"dtype": dtype, "shape": [N], "data": X.tolist()}], "sparsity": sparsity})


def _jacrev(fn, dtype):
    x = torch.from_numpy(X).to(getattr(torch, dtype))
    return np.concatenate([b.to(torch.float64).reshape(-1, N).numpy() for b in torch.func.jacrev(fn)(x)])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["leaves28", "complex_leaves28"])
@pytest.mark.parametrize("sparsity", ["auto", "ring"])
def test_a_right_pattern_of_mixed_dtype_leaves_holds(client, name, dtype, sparsity):
    """float64, float32, float16 and bfloat16 leaves of one ring (and complex128 and
    complex64 arithmetic's real and imaginary parts): the detected or declared pattern
    holds for every input dtype, jacrev's values, no note: 2 JVPs where they are
    jacrev's, else (a leaf coarser than the input rounds a JVP's column) 8 VJPs. (Before:
    float64 inputs answered densely, 160 products, or a 422 for the declared pattern;
    float32 inputs at this point too.)"""
    r = _post(client, name, dtype, sparsity)
    assert r.status_code == 200, r.text
    meta = r.json()["meta"]
    assert meta["products"] <= 8 and not meta["notes"], meta
    assert meta["source"] == ("detected" if sparsity == "auto" else "declared"), meta
    want = _jacrev(getattr(s28, name), dtype)
    # (forward products, jacrev's reverse ones: complex64's round-off where terms cancel,
    # an ulp of the answer's float16 or bfloat16)
    tol = max(1e-6, 4 * torch.finfo(getattr(torch, dtype)).eps)
    np.testing.assert_allclose(csr(r.json()).toarray(), want, rtol=tol, atol=tol * np.abs(want).max())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["leaves28", "complex_leaves28"])
@pytest.mark.parametrize("missing", ["diagonal", "misses0", "misses1", "misses2", "misses3"])
def test_a_declared_pattern_missing_entries_of_any_leaf_is_refused(client, name, dtype, missing):
    """The looser tolerance of a coarse leaf's rows is theirs alone: a declared pattern
    missing the sub-diagonal of any one leaf (the float64 one beside float16 rows
    included) or of all is refused, for every input dtype, as a wrong pattern is."""
    r = _post(client, name, dtype, missing)
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["code"] == "invalid_input" and f"'{missing}'" in body["detail"], body
    assert "misses nonzeros" in body["detail"], body


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_half_precision_energys_hessian_keeps_its_pattern(client, dtype):
    """A float16 energy of any input: its Hessian's pattern holds (the check's round-off
    is the coarser dtype's), torch.func.hessian's values. (A guard: it held before.)"""
    r = _post(client, "half_energy28", dtype, "auto", kind="hessian")
    assert r.status_code == 200, r.text
    meta = r.json()["meta"]
    assert not meta["notes"] and meta["products"] <= 4, meta
    x = torch.from_numpy(X).to(getattr(torch, dtype))
    want = torch.func.hessian(s28.half_energy28)(x).to(torch.float64).numpy()
    np.testing.assert_allclose(csr(r.json(), "hessian").toarray(), want, rtol=1e-6, atol=0)


def test_a_probe_of_mixed_dtype_leaves_keeps_jacrevs_vmapped_rows(client, caplog):
    """Tracing fails (a write into a module buffer): the pattern is probed from dense
    Jacobians of the flat output, each checked against one VJP. The float16 leaf's
    rounding took jacrev's right rows for a wrong vmap, and the first point's Jacobian
    was computed again row by row (the WARNING). Now held to each leaf's round-off; the
    answer is jacrev's (4 VJPs: the float16 leaf's JVPs are rounded)."""
    with caplog.at_level(logging.WARNING, logger="jacobian_service.sparsity"):
        r = _post(client, "probed_leaves28", "float64", "auto")
    assert r.status_code == 200, r.text
    meta = r.json()["meta"]
    assert meta["source"] == "probed" and meta["products"] == 4 and meta["mode"] == "rev", meta
    np.testing.assert_allclose(csr(r.json()).toarray(), _jacrev(s28.probed_leaves28, "float64"), rtol=1e-6, atol=0)
    assert not [m.getMessage() for m in caplog.records if "row by row" in m.getMessage()]
