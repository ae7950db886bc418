"""Sparse and structured Jacobians, round 25: Hessians whose gradient is infinite or NaN.

Each answer against torch.func.hessian in this process:

- an infinite Hessian entry a declared pattern misses: a tridiagonal band declared for a
  chain whose energy also holds x[0] sqrt(x[-1]) answered a 200 at x[-1] = 0 with the
  coupling's inf at (0, 0) (n = 5) or (0, 1) (n = 8), where torch has it at (0, n-1); at
  x[-1] = 0.5 it is a 422. A Hessian-vector product sums columns, so the missing infinity
  lands on a covered entry of its own row, where no check looked. Each infinite entry is
  now read again from products seeded with part of its colour (its column alone, or by
  the bits of the column index where fewer: 100 infinite entries of 200 variables);
- the right patterns (the periodic band, sparsity=auto) answered NaN at (n-2, n-1) and
  (1, 0) where torch has -1: star colouring read them at their mirror, in a row the
  infinite gradient entry makes NaN. An entry is read at its other place where that is
  finite (a distance-2 colouring where it has one place only).

One in-process app serves every case (no new server process).
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from tests import sparse25_functions as s25

from .conftest import ready_app


@pytest.fixture(scope="module")
def client():
    with ready_app("tests.sparse25_functions") as c:
        yield c


def _problem(r, status, code):
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json"), r.headers
    body = r.json()
    assert body["status"] == status and body["code"] == code, body
    assert "Traceback" not in r.text
    return body


def _csr(r, key="hessian"):
    """A 200's CSR matrix (NaN and inf spelled as JSON cannot) and meta."""
    assert r.status_code == 200, r.text
    j = r.json()[key]
    data = np.array([float(v) for v in j["data"]], dtype=np.float64)
    return sp.csr_array((data, j["indices"], j["indptr"]), shape=j["shape"]), r.json()["meta"]


# ------------------------------------------------------------------ infinite Hessian entries a declared pattern misses

_AT_ZERO = [0.3, 0.5, 0.7, 0.2, 0.9, 0.0]


@pytest.mark.parametrize("n", [5, 6, 8])
def test_a_declared_hessian_band_missing_an_infinite_entry_is_refused(client, n):
    """x[0] sqrt(x[-1]) at x[-1] = 0: H[0, n-1] is inf, and the declared tridiagonal band
    lacks it. The answer was a 200 with that inf at (0, 0) (n = 5) or (0, 1) (n = 8),
    the entry of its colour in row 0 (n = 6 was refused: its colour has no entry there);
    now a 422 at every n, as at x[-1] = 0.5, in JSON and .npz alike."""
    x = np.linspace(0.2, 0.9, n)
    for last in (0.0, 0.5):
        x[-1] = last
        body = _problem(client.post("/v1/functions/chain_sqrt25/hessian",
                                    json={"inputs": [x.tolist()], "sparsity": "band"}), 422, "invalid_input")
        assert "'band'" in body["detail"] and "misses nonzeros" in body["detail"], body
    x[-1] = 0.0
    r = client.post("/v1/functions/chain_sqrt25/hessian", json={"inputs": [x.tolist()], "sparsity": "band"},
                    headers={"accept": "application/x-npz"})
    _problem(r, 422, "invalid_input")


@pytest.mark.parametrize("last", [0.0, -0.25])
@pytest.mark.parametrize("choice", ["ring", "auto"])
def test_a_right_hessian_pattern_answers_torchs_finite_entries(client, choice, last):
    """The periodic band declared ('ring') and sparsity=auto have the entry: a 200 at
    x[-1] = 0 with inf at (0, n-1), and torch.func.hessian's values at every entry it has
    finite. Its rows 0 and n-1 are NaN (the gradient there is inf or NaN, and so every
    tangent of it), its other rows finite; star colouring read (n-2, n-1) and (1, 0) at
    their mirrors, in those rows, and answered NaN where torch has -1. At x[-1] < 0 the
    same (the coupling NaN)."""
    x = _AT_ZERO[:-1] + [last]
    got, meta = _csr(client.post("/v1/functions/chain_sqrt25/hessian", json={"inputs": [x], "sparsity": choice}))
    want = torch.func.hessian(s25.chain_sqrt25)(torch.tensor(x, dtype=torch.float64)).numpy()
    dense = got.toarray()
    if last == 0:
        assert np.isposinf(dense[0, 5]) and np.isposinf(want[0, 5]), dense
    finite = np.isfinite(want)
    np.testing.assert_allclose(dense[finite], want[finite], rtol=1e-12, atol=1e-12)
    assert meta["source"] == ("declared" if choice == "ring" else "detected"), meta


@pytest.mark.parametrize("choice,status", [("band", 422), ("ring", 200)])
def test_a_hessian_infinite_at_many_entries_is_checked_within_a_few_products(client, choice, status):
    """x^1.5 terms at 100 zeros of 200 variables: 100 infinite diagonal entries, and
    x[-1] = 0 makes the coupling infinite too. Each infinite entry is read again from
    products seeded with part of its colour (by the bits of its column: 2 x colours x 8
    products here, not one per column), so the band missing the coupling is refused and
    the right ring answers torch.func.hessian's values wherever torch's are finite, its
    infinities where torch has them."""
    x = np.where(np.arange(200) % 2 == 0, 0.0, np.linspace(0.2, 0.9, 200))
    x[0], x[-1] = 0.3, 0.0
    r = client.post("/v1/functions/chain_pow25/hessian", json={"inputs": [x.tolist()], "sparsity": choice})
    if status == 422:
        body = _problem(r, 422, "invalid_input")
        assert "misses nonzeros" in body["detail"], body
        return
    got, meta = _csr(r)
    want = torch.func.hessian(s25.chain_pow25)(torch.tensor(x)).numpy()
    dense = got.toarray()
    finite = np.isfinite(want)
    np.testing.assert_allclose(dense[finite], want[finite], rtol=1e-12, atol=1e-12)
    assert np.isposinf(dense[0, 199]) and meta["products"] <= 4, meta
