"""Sparse Jacobians and Hessians, round 9: ops the tracer did not know, which it took as
dense (every output on every input, ``meta.exact: false``, one product per output or
input) though each has a plain structure. Every answer is compared with torch's
reverse mode in this process (``torch.autograd.functional``: no vmap, which is itself
wrong for some ops), every nonzero stored, and the pattern no wider than the ops allow.

One in-process app serves every case (no new server process).
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from starlette.testclient import TestClient

from jacobian_client import wire
from jacobian_service import create_app
from jacobian_service.settings import Settings
from tests import sparse9_functions as s9

RNG = np.random.default_rng(9)


@pytest.fixture(scope="module")
def client():
    with TestClient(create_app(Settings(warmup=False, functions="tests.sparse9_functions"))) as c:
        yield c


def f64(x):
    return {"dtype": "float64", "shape": list(x.shape), "data": x.reshape(-1).tolist()}


def sparse(client, name, x, kind="jacobian", **options):
    r = client.post(f"/v1/functions/{name}/{kind}", json={"inputs": [f64(x)], "sparsity": "auto", **options})
    assert r.status_code == 200, r.text
    doc = r.json()
    return wire.decode_sparse_json(doc[kind]), doc["meta"]


def jac(f, x):
    t = torch.from_numpy(x)
    return torch.autograd.functional.jacobian(lambda a: f(a).reshape(-1), t).reshape(-1, t.numel()).numpy()


def hess(f, x):
    t = torch.from_numpy(x)
    return torch.autograd.functional.hessian(f, t).reshape(t.numel(), t.numel()).numpy()


def entries(J):
    coo = sp.coo_array(J)
    return set(zip(coo.row.tolist(), coo.col.tolist()))


def assert_exact(J, meta, want, stored=None):
    """Values equal to torch's, every nonzero stored, the pattern traced exactly
    (``exact``), and stored entries no more than ``stored`` (default: the nonzeros)."""
    np.testing.assert_allclose(J.toarray(), want, rtol=1e-12, atol=1e-12)
    nonzero = set(zip(*np.nonzero(want)))
    assert nonzero <= entries(J)
    assert meta["exact"] is True and meta["source"] == "detected", meta
    assert J.nnz == (len(nonzero) if stored is None else stored), (J.nnz, len(nonzero))


# ------------------------------------------------------------------ ops no longer dense


def test_a_matrix_diagonal_and_traces_read_the_diagonal_only(client):
    """``torch.diag`` of a matrix (aten's ``diagonal_copy``) and ``torch.trace`` were
    unknown ops: the diagonal of a 6 x 6 matrix and two traces took all 36 entries each
    (8 products, exact false). Now each reads the diagonal: 3 products (rev)."""
    Q = RNG.uniform(-1, 1, (6, 6))
    J, meta = sparse(client, "diagonal_invariants", Q)
    assert_exact(J, meta, jac(s9.diagonal_invariants, Q))
    assert meta["products"] == 3


def test_rot90_and_block_diag_move_elements(client):
    """``rot90`` and ``block_diag`` move elements as views and ``cat`` do, but were
    taken as dense: a 5 x 5 field times its rotation took 25 products, a block-diagonal
    operator of 8 cells 8. Now 2 (two entries per row) and 1 (rows apart)."""
    u = RNG.uniform(-1, 1, (5, 5))
    J, meta = sparse(client, "rotated_product", u)
    assert_exact(J, meta, jac(s9.rotated_product, u))
    assert meta["products"] == 2
    x = RNG.uniform(-1, 1, 16)
    J, meta = sparse(client, "block_operator", x)
    assert_exact(J, meta, jac(s9.block_operator, x))
    assert meta["products"] == 1


def test_an_lstm_cell_keeps_its_samples_apart(client):
    """``torch.lstm_cell`` splits its gates with ``unsafe_chunk``, an unknown op: every
    output of a batch of 6 samples depended on every sample (18 products). Now each
    sample's 4 outputs read its own 3 inputs: 3 products (fwd)."""
    x = RNG.uniform(-1, 1, (6, 3))
    J, meta = sparse(client, "lstm_step", x)
    assert_exact(J, meta, jac(s9.lstm_step, x))
    assert meta["products"] == 3


def test_kthvalue_and_aminmax_read_their_row(client):
    """``kthvalue`` (reducing its dim) and ``aminmax`` were taken as dense: each row's
    statistics on every row. Now each on its own row, as ``max(dim)`` is: a union over
    the choices the values make (``conservative``), so every entry of the row is stored:
    3 products where 15 were."""
    x = RNG.uniform(-1, 1, (5, 4))
    J, meta = sparse(client, "row_order_stats", x)
    assert_exact(J, meta, jac(s9.row_order_stats, x), stored=5 * 3 * 4)
    assert meta["conservative"] is True
    assert meta["products"] == 3


def test_their_hessian_is_sparse_too(client):
    """The Hessian of an energy built from a diagonal, a trace, a rotation and blocks:
    was 36 Hessian-vector products (dense); now 6, and torch's Hessian exactly."""
    Q = RNG.uniform(-1, 1, (6, 6))
    H, meta = sparse(client, "structured_energy", Q, kind="hessian")
    want = hess(s9.structured_energy, Q)
    np.testing.assert_allclose(H.toarray(), want, rtol=1e-12, atol=1e-12)
    assert set(zip(*np.nonzero(want))) <= entries(H)
    assert meta["exact"] is True and meta["products"] <= 8, meta
