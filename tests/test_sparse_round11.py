"""Sparse Jacobians and Hessians, round 11: symmetric Jacobians read from JVPs as
Hessians are (the force of an energy), and what a scientist computes (direct
collocation, a finite-element assembly, a pair force field, a graph network layer,
patterns that follow the input's values, several inputs, batches, limits) through the
service and the SDK into SciPy. Every answer is compared with torch's reverse mode in
this process, every nonzero stored, and the pattern no wider than the true nonzeros.

One in-process app serves every case (no new server process); the SDK reaches it
through an httpx transport.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from tests import sparse11_functions as s11

from .conftest import ready_app
from .test_sparse_round9 import f64, jac, sparse  # the round-9 helpers: a request, its answer, torch's

RNG = np.random.default_rng(11)


@pytest.fixture(scope="module")
def client():
    with ready_app("tests.sparse11_functions") as c:
        yield c


def entries(J):
    coo = sp.coo_array(J)
    return set(zip(coo.row.tolist(), coo.col.tolist()))


def assert_exact(J, meta, want, rtol=1e-12):
    """Values equal to torch's, every nonzero stored and nothing more, traced exactly."""
    np.testing.assert_allclose(J.toarray(), want, rtol=rtol, atol=rtol)
    assert set(zip(*np.nonzero(want))) == entries(J), (int((want != 0).sum()), J.nnz)
    assert meta["exact"] is True and meta["source"] == "detected", meta


# ------------------------------------------------------------------ symmetric Jacobians


def test_a_symmetric_jacobian_is_read_from_three_jvps_once_seen_symmetric(client):
    """The force -dE/dx of a chain in a global field: its Jacobian is E's Hessian, an
    arrowhead with a tridiagonal body. Colouring that does not know the values are
    symmetric needs 5 products (bicolouring: 1 VJP and 4 JVPs; no bicolouring, direct
    or by substitution, has fewer), as the first request takes; its answer is
    symmetric entry by entry, so the next ones read 3 JVPs over an acyclic colouring
    as a Hessian is read (meta.mode ``symmetric``, meta.products 3), each checked by
    the one VJP forward products get. float64 and float32 alike."""
    for name, dtype, rtol in (("chain_force", np.float64, 1e-12), ("chain_force32", np.float32, 2e-5)):
        first = None
        for _ in range(3):
            x = RNG.uniform(0.5, 1.5, 40).astype(dtype)
            body = {"inputs": [{"dtype": np.dtype(dtype).name, "shape": [40], "data": x.tolist()}], "sparsity": "auto"}
            r = client.post(f"/v1/functions/{name}/jacobian", json=body)
            assert r.status_code == 200, r.text
            from jacobian_client import wire

            J, meta = wire.decode_sparse_json(r.json()["jacobian"]), r.json()["meta"]
            want = jac(s11.chain_force, x.astype(np.float64))
            np.testing.assert_allclose(J.toarray(), want, rtol=rtol, atol=rtol * np.abs(want).max())
            assert entries(J) == set(zip(*np.nonzero(want)))
            first = first or meta
        assert (first["mode"], first["products"]) == ("bidirectional", 5), first
        assert (meta["mode"], meta["products"]) == ("symmetric", 3), meta
        d = client.get(f"/v1/functions/{name}/sparsity", params={"shapes": "40"}).json()
        assert (d["coloring"]["mode"], d["products"]) == ("symmetric", 3), d["coloring"]


def test_a_jacobian_symmetric_at_one_point_only_is_never_answered_symmetrised(client):
    """The same pattern with J[0, j] = x[0] and J[j, 0] = x[j]: symmetric at x = 1
    only. Seen symmetric there, the next request (another point) is read from 3 JVPs,
    the VJP proves it asymmetric, and it is answered by VJPs as jacrev is, never with
    one triangle copied onto the other; the function then goes back to bicolouring."""
    ones = np.ones(40)
    J, meta = sparse(client, "nearly_symmetric", ones)
    assert_exact(J, meta, jac(s11.nearly_symmetric, ones))
    J, meta = sparse(client, "nearly_symmetric", ones)
    assert (meta["mode"], meta["products"]) == ("symmetric", 3), meta
    x = RNG.uniform(0.5, 1.5, 40)
    J, meta = sparse(client, "nearly_symmetric", x)
    assert_exact(J, meta, jac(s11.nearly_symmetric, x))
    assert meta["mode"] == "rev", meta
    J, meta = sparse(client, "nearly_symmetric", x)
    assert_exact(J, meta, jac(s11.nearly_symmetric, x))
    assert (meta["mode"], meta["products"]) == ("bidirectional", 5), meta
