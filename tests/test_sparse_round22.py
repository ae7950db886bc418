"""Sparse Jacobians and Hessians, round 22: the random check takes no round-off for a wrong pattern.

Since round 21 every pattern is checked by one product with a random seed, against a fixed
tolerance (1024 ulps). Round-off from large terms that cancel inside the function is far
above it: ``(x * 1e5 + x) - x * 1e5`` in float32 (a Jacobian exactly the identity) was
"proven wrong" (0.00173 relative) and answered densely, a 504 at 10^5 elements. Now the
check's difference is compared with the function's own round-off measured at the point
(how far its products are from additive); a pattern that truly misses an entry is still
caught there. Each answer against torch.func in this process.

One in-process app serves every case (no new server process).
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from tests import sparse22_functions as s22

from .conftest import ready_app
from .test_sparse_round17 import sparse_answer  # (a 200's matrix as scipy CSR, and its meta)
from .test_sparse_round21 import DENSE  # (compute.DENSE_NOTE's start)


@pytest.fixture(scope="module")
def client():
    with ready_app("tests.sparse22_functions") as c:
        yield c


def _dense_noted(meta):
    return any(n.startswith(DENSE) for n in meta.get("notes", []))


def test_cancelling_terms_keep_their_pattern(client):
    """The diagonal pattern holds: its one product (an all-ones seed: exact) answers, not
    a dense Jacobian with a note that the pattern is wrong."""
    x = np.linspace(0.1, 3, 5, dtype=np.float32)
    got, meta = sparse_answer(client, "cancels22", [x])
    want = torch.func.jacrev(s22.cancels22)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got.toarray(), want, rtol=1e-6, atol=1e-6)
    assert not _dense_noted(meta) and meta["products"] == 1 and meta["nnz"] == 5, meta


def test_cancelling_terms_at_a_size_dense_cannot_answer(client):
    """10^5 elements: the dense fall-back (10^5 VJPs) ran past the deadline, a 504.
    Now one product: the diagonal, = a forward product with an all-ones tangent."""
    n = 100_000
    x = np.linspace(0.1, 3, n, dtype=np.float32)
    start = time.monotonic()
    got, meta = sparse_answer(client, "cancels22", [x])
    assert time.monotonic() - start < 30
    assert not _dense_noted(meta) and meta["products"] == 1, meta
    assert got.shape == (n, n) and got.nnz == n and (got.indices == np.arange(n)).all()
    t = torch.from_numpy(x)
    want = torch.func.jvp(s22.cancels22, (t,), (torch.ones_like(t),))[1].numpy()
    np.testing.assert_allclose(got.diagonal(), want, rtol=1e-6, atol=1e-6)


def test_a_hessian_through_cancelling_terms_keeps_its_pattern(client):
    """The Hessian-vector products carry the same round-off: 2 I, from star-coloured
    products, = torch.func.hessian, no dense note."""
    x = np.linspace(0.1, 3, 5, dtype=np.float32)
    got, meta = sparse_answer(client, "cancels22_energy", [x], kind="hessian")
    want = torch.func.hessian(s22.cancels22_energy)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got.toarray(), want, rtol=1e-5, atol=1e-5)
    assert not _dense_noted(meta) and meta["products"] == 1, meta


def test_a_missing_entry_is_caught_beside_cancelling_terms(client):
    """The same round-off and a coupling to x[0] the trace's arm left out (a type read
    built at run time): the function's measured noise does not hide the missing column;
    jacrev's answer, densely, with the note."""
    x = np.linspace(0.1, 3, 5, dtype=np.float32)
    got, meta = sparse_answer(client, "cancels22_coupled", [x])
    want = torch.func.jacrev(s22.cancels22_coupled)(torch.from_numpy(x)).numpy()
    assert want[1:, 0].all()
    np.testing.assert_allclose(got.toarray(), want, rtol=1e-6, atol=1e-6)
    assert _dense_noted(meta), meta
