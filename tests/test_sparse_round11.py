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

import io

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from tests import sparse11_functions as s11

from .conftest import ready_app_with
from .test_sparse_round9 import f64, jac, sparse  # the round-9 helpers: a request, its answer, torch's
from .test_sparse_round10 import sdk  # noqa: F401 (round 10's fixture: the SDK through this module's in-process app)

RNG = np.random.default_rng(11)


#: The app's result limit: small, so that the limits' answers come from small inputs.
LIMIT = 65536


@pytest.fixture(scope="module")
def client():
    with ready_app_with("tests.sparse11_functions", max_result_bytes=LIMIT) as c:
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
    the one VJP forward products get. float64 only: in float32 that VJP cannot tell an
    asymmetry of hundreds of ulps from round-off (round 12), so chain_force32 keeps its
    5 products, every entry read alone."""
    for name, dtype, rtol, then in (("chain_force", np.float64, 1e-12, ("symmetric", 3)),
                                    ("chain_force32", np.float32, 2e-5, ("bidirectional", 5))):
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
        assert (meta["mode"], meta["products"]) == then, meta
        d = client.get(f"/v1/functions/{name}/sparsity", params={"shapes": "40"}).json()
        assert (d["coloring"]["mode"], d["products"]) == then, d["coloring"]


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


# ------------------------------------------------------------------ a scientist's functions


def test_collocation_assembly_pair_forces_against_jacrev(client):
    """Direct collocation of a damped pendulum (block-banded defects, a dense column for
    the final time: 7 JVPs, the densest row's count), a finite-element residual
    assembled by ``index_add`` over 32 triangles, and pair forces over a fixed neighbour
    list (gather, then ``index_add`` into both atoms): each the Jacobian torch's
    reverse mode gives, every nonzero stored and nothing more. The forces are the
    gradient of a pair energy: symmetric, so their next request reads fewer JVPs."""
    z = RNG.uniform(0.5, 1.5, 64)
    J, meta = sparse(client, "collocation", z)
    assert_exact(J, meta, jac(s11.collocation, z))
    assert J[:, 63].nnz == 40 and meta["products"] == 7, meta  # every defect reads T (the 3 boundary rows not)
    u = RNG.uniform(0.5, 1.5, 25)
    J, meta = sparse(client, "fe_residual", u)
    assert_exact(J, meta, jac(s11.fe_residual, u))
    assert meta["products"] <= 7, meta  # 7 nodes in the densest patch
    r = np.arange(12)[:, None] * np.array([1.1, 0.0, 0.0]) + RNG.uniform(-0.1, 0.1, (12, 3))
    J, meta = sparse(client, "pair_forces", r)
    want = jac(s11.pair_forces, r)
    assert_exact(J, meta, want, rtol=1e-10)
    J2, meta2 = sparse(client, "pair_forces", r)
    np.testing.assert_allclose(J2.toarray(), want, rtol=1e-10, atol=1e-10 * np.abs(want).max())
    assert meta2["mode"] == "symmetric" and meta2["products"] + 1 < meta["products"], (meta, meta2)


def test_a_finite_element_hessian_against_torch(client):
    """The membrane's energy: its Hessian is the FE stiffness pattern (node pairs sharing
    a triangle), 137 entries, recovered from 4 acyclic-coloured products."""
    u = RNG.uniform(0.5, 1.5, 25)
    H, meta = sparse(client, "fe_energy", u, kind="hessian")
    want = torch.autograd.functional.hessian(s11.fe_energy, torch.from_numpy(u)).numpy()
    assert_exact(H, meta, want, rtol=1e-10)
    assert H.nnz == 137 and meta["products"] <= 5, meta


def test_the_membrane_by_trust_constr_with_the_services_sparse_hessian(sdk):
    """The membrane's minimum by ``minimize(method="trust-constr")`` with the service's
    sparse Hessian (and gradient) through the SDK is the one the in-process Hessian
    reaches; each Hessian is a scipy sparse matrix with the stiffness pattern."""
    from scipy.optimize import minimize

    from jacobian_client.scipy import remote_objective

    u0 = RNG.uniform(-0.5, 0.5, 25)
    obj = remote_objective(sdk, "fe_energy", sparsity="auto")
    assert sp.issparse(obj.hess(u0)) and obj.hess(u0).nnz == 137
    got = minimize(obj.fun, u0, jac=obj.jac, hess=obj.hess, method="trust-constr", options={"gtol": 1e-10})
    f = lambda u: float(s11.fe_energy(torch.from_numpy(u)))  # noqa: E731
    g = lambda u: torch.func.grad(s11.fe_energy)(torch.from_numpy(u)).numpy()  # noqa: E731
    h = lambda u: torch.autograd.functional.hessian(s11.fe_energy, torch.from_numpy(u)).numpy()  # noqa: E731
    want = minimize(f, u0, jac=g, hess=h, method="trust-constr", options={"gtol": 1e-10})
    assert got.success and want.success
    np.testing.assert_allclose(got.x, want.x, rtol=1e-7, atol=1e-9)


def test_several_inputs_and_a_dict_output_in_one_sparse_matrix(client):
    """A message-passing layer over an edge list, d{h', energy}/d(h, W): one CSR matrix,
    the outputs' elements in order (h' then energy) by the inputs' (h then W), as
    torch's jacrev blocks concatenated; exact, and fewer products than rows."""
    from jacobian_client import wire

    h, w = RNG.uniform(-1, 1, (8, 4)), RNG.uniform(-1, 1, (4, 4))
    r = client.post("/v1/functions/gnn_layer/jacobian", json={"inputs": [f64(h), f64(w)], "argnums": ["h", "w"], "sparsity": "auto"})
    assert r.status_code == 200, r.text
    J, meta = wire.decode_sparse_json(r.json()["jacobian"]), r.json()["meta"]
    th, tw = torch.from_numpy(h), torch.from_numpy(w)
    blocks = torch.func.jacrev(s11.gnn_layer, argnums=(0, 1))(th, tw)
    want = np.concatenate([np.concatenate([blocks[k][i].reshape(s11.gnn_layer(th, tw)[k].numel(), -1).numpy() for i in (0, 1)], 1)
                           for k in ("h", "energy")], 0)
    assert J.shape == (40, 48) == want.shape
    assert_exact(J, meta, want)
    assert meta["products"] < 40, meta


def test_a_pattern_that_follows_the_values(client):
    """``if x[0] > 0`` in Python: the pattern holds at its point only (meta
    value_dependent), so each point is detected on its own and a later point on the
    other branch is never read through the first one's pattern; ``torch.where`` on the
    data keeps both branches' entries (a union, not value dependent), zeros stored
    where this point's choice makes them zero. Sparse and batched do not combine (422)."""
    for x0 in (0.7, -0.7, 0.9):
        x = RNG.uniform(0.5, 1.5, 12)
        x[0] = x0
        J, meta = sparse(client, "branch_on_data", x)
        assert_exact(J, meta, jac(s11.branch_on_data, x))
        assert meta["value_dependent"] is True, meta
    for _ in range(2):
        x = RNG.uniform(-1, 1, 12)
        J, meta = sparse(client, "where_on_data", x)
        want = jac(s11.where_on_data, x)
        np.testing.assert_allclose(J.toarray(), want, rtol=1e-12, atol=1e-12)
        assert set(zip(*np.nonzero(want))) <= entries(J) and J.nnz == 3 * 12 and meta["value_dependent"] is False
    r = client.post("/v1/functions/where_on_data/jacobian", json={"inputs": [f64(np.ones((3, 6)))], "batched": True, "sparsity": "auto"})
    assert r.status_code == 422 and r.json()["code"] == "invalid_input", r.text
    assert r.json()["detail"] == "sparsity other than dense does not combine with batched"


def test_a_power_of_one_or_zero_is_traced_as_what_it_is():
    """``S ** p`` at p = 1 (a generic energy's exponent): torch's gradient multiplies by
    ``S ** 0``, ones, which the tracer took to read every element of S: the force
    -grad(sin(x[0]) * x.sum() ** 1) was dense (36 entries stored for 11 nonzeros), its
    Hessian too. Now x ** 0 reads nothing and x ** 1 adds no second derivative."""
    from jacobian_service.sparsity import PatternCache, sparse_hessian, sparse_jacobian

    def energy(x):
        return torch.sin(x[0]) * x.sum() ** 1 + (x * x.roll(1)).pow(1).sum() + x.sum() ** 0 * x[1] ** 2

    def force(x):
        return -torch.func.grad(energy)(x)

    x = torch.from_numpy(RNG.uniform(0.5, 1.5, 6))
    for got, want in ((sparse_jacobian(force, [x], cache=PatternCache()), torch.func.jacrev(force)(x)),
                      (sparse_hessian(energy, [x], cache=PatternCache()), torch.func.hessian(energy)(x))):
        np.testing.assert_allclose(got.matrix.toarray(), want.numpy(), rtol=1e-12, atol=1e-12)
        assert entries(got.matrix) == set(zip(*np.nonzero(want.numpy()))), (got.matrix.nnz, int((want != 0).sum()))


# ------------------------------------------------------------------ limits


def _npy(x):
    buf = io.BytesIO()
    np.save(buf, x)
    return buf.getvalue()


def _refused(r, detail):
    """A 413 problem whose detail starts with ``detail`` (the size and the limit; what to
    ask for instead follows)."""
    assert r.status_code == 413 and r.headers["content-type"].startswith("application/problem+json"), r.text
    doc = r.json()
    assert (doc["code"], doc["status"], doc["type"]) == ("result_too_large", 413, "urn:jacobian-service:problem:result_too_large")
    assert doc["detail"].startswith(detail) and "Ask for" in doc["detail"], doc["detail"]


def test_the_result_limit_on_every_format(client):
    """Under a 64 KiB result limit, a 3-diagonal ring: at n = 600 CSR and COO pass, the
    dense JSON (2.9 MB) is a 413 saying its size, and the dense matrix as ``.npy``
    streams (it was a 413 where every larger one streamed: under the stream threshold it
    was gathered and held to the limit). At n = 2000 the CSR (80,004 bytes) and COO
    (96,000) are 413s, JSON and ``.npz`` alike, each saying its own size; at n = 4200
    the pattern itself is past the limit (8,192 entries), a 413 before any product.
    (The sparse matrix as JSON or ``.npz`` says it needs a smaller input.)"""
    x = RNG.uniform(0.5, 1.5, 600)
    want = jac(s11.ring, x)
    for fmt in ("csr", "coo"):
        J, meta = sparse(client, "ring", x, sparse_format=fmt)
        assert_exact(J, meta, want)
    r = client.post("/v1/functions/ring/jacobian", json={"inputs": [f64(x)], "sparsity": "auto", "sparse_format": "dense"})
    _refused(r, f"the result would take {600 * 600 * 8} bytes; the limit is {LIMIT}.")
    r = client.post("/v1/functions/ring/jacobian?sparsity=auto&sparse_format=dense", content=_npy(x),
                    headers={"content-type": "application/x-npy", "accept": "application/x-npy"})
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(np.load(io.BytesIO(r.content)), want, rtol=1e-12, atol=1e-12)
    x = RNG.uniform(0.5, 1.5, 2000)
    for fmt, size in (("csr", 6000 * 12 + 2001 * 4), ("coo", 6000 * 16)):
        r = client.post("/v1/functions/ring/jacobian", json={"inputs": [f64(x)], "sparsity": "auto", "sparse_format": fmt})
        _refused(r, f"the result would take {size} bytes; the limit is {LIMIT}. Ask for a smaller input.")
    r = client.post("/v1/functions/ring/jacobian?sparsity=auto", content=_npy(x),
                    headers={"content-type": "application/x-npy", "accept": "application/x-npz"})
    _refused(r, f"the result would take {6000 * 12 + 2001 * 4} bytes; the limit is {LIMIT}. Ask for a smaller input.")
    x = RNG.uniform(0.5, 1.5, 4200)
    too_dense = ("the sparsity pattern is too dense for the limits: a traced tensor would hold 8,400 entries; the limit "
                 "is 8,192. Ask for sparsity=dense (streamed as .npy), or a smaller input")
    for fmt in ("csr", "coo"):
        r = client.post("/v1/functions/ring/jacobian", json={"inputs": [f64(x)], "sparsity": "auto", "sparse_format": fmt})
        _refused(r, too_dense)
    r = client.post("/v1/functions/ring/jacobian?sparsity=auto", content=_npy(x),
                    headers={"content-type": "application/x-npy", "accept": "application/x-npz"})
    _refused(r, too_dense)


def test_concurrent_sparse_requests_batched_or_alone_are_each_their_own_point(client):
    """Equal sparse requests arriving together are computed as one batch (the products
    vmapped over their points) where the colouring is reverse mode, each alone
    otherwise; whichever, every answer is its own point's Jacobian. ``pair_forces``,
    read as symmetric by now, and ``nearly_symmetric``, whose points are asymmetric."""
    import threading

    for name, shape in (("ring", (300,)), ("pair_forces", (12, 3)), ("nearly_symmetric", (40,))):
        xs = [RNG.uniform(0.5, 1.5, shape) for _ in range(6)]
        if name == "pair_forces":
            xs = [np.arange(12)[:, None] * np.array([1.1, 0.0, 0.0]) + RNG.uniform(-0.1, 0.1, (12, 3)) for _ in range(6)]
        out = [None] * len(xs)

        def post(i, name=name, xs=xs, out=out):
            out[i] = client.post(f"/v1/functions/{name}/jacobian", json={"inputs": [f64(xs[i])], "sparsity": "auto"})

        threads = [threading.Thread(target=post, args=(i,)) for i in range(len(xs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for x, r in zip(xs, out):
            assert r.status_code == 200, r.text
            from jacobian_client import wire

            want = jac(getattr(s11, name), x)
            np.testing.assert_allclose(wire.decode_sparse_json(r.json()["jacobian"]).toarray(), want,
                                       rtol=1e-10, atol=1e-10 * np.abs(want).max())
