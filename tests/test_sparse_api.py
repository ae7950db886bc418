"""Sparse Jacobians and Hessians over HTTP (SPEC 7): the ``sparsity`` request option,
``GET /v1/functions/{name}/sparsity``, the SDK and the CLI.

Every sparse result is compared, densified, with ``torch.func.jacrev`` / ``hessian`` run
in this process; ``.npz`` bodies are read with ``scipy.sparse.load_npz`` alone. The
in-process app covers the options and errors; one real ``serve`` process (engine
processes, results through the IPC frames) covers the same results end to end.
"""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from starlette.testclient import TestClient

from jacobian_client import AsyncClient, Client, SparsityNotFound, wire
from jacobian_service import create_app
from jacobian_service.examples import lorenz96, reaction_diffusion, rosenbrock
from jacobian_service.settings import Settings
from tests import sparse_functions as sf
from tests.conftest import ROOT, assert_problem, live_server, npy_bytes, npz_bytes

FUNCTIONS = "jacobian_service.examples,tests.sparse_functions"
RNG = np.random.default_rng(7)


@pytest.fixture(scope="module")
def client():
    with TestClient(create_app(Settings(warmup=False, functions=FUNCTIONS))) as c:
        yield c


def jac(fn, *args, argnums=0):
    """jacrev in process, as the 2-D (output elements) x (input elements) matrix."""
    t = [torch.tensor(a) for a in args]
    out = fn(*t)
    nums = argnums if isinstance(argnums, tuple) else (argnums,)
    blocks = torch.func.jacrev(fn, argnums=nums)(*t)
    return np.hstack([b.reshape(out.numel(), -1).numpy() for b in blocks])


def hess(fn, x):
    return torch.func.hessian(fn)(torch.tensor(x)).numpy()


def sparse_json(response, key="jacobian"):
    assert response.status_code == 200, response.text
    doc = response.json()
    return wire.decode_sparse_json(doc[key]), doc["meta"]


def load_npz(response):
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == wire.NPZ
    return sp.load_npz(io.BytesIO(response.content))  # scipy alone, no SDK


# ------------------------------------------------------------------ results, JSON


@pytest.mark.parametrize("sparsity,source", [("auto", "detected"), ("band", "declared")])
def test_lorenz96_json_equals_jacrev(client, sparsity, source):
    x = RNG.standard_normal(26).astype(np.float32)
    J, meta = sparse_json(client.post("/v1/functions/lorenz96/jacobian", json={"inputs": [x.tolist()], "sparsity": sparsity}))
    assert sp.issparse(J) and J.format == "csr" and J.shape == (26, 26)
    np.testing.assert_allclose(J.toarray(), jac(lorenz96, x), rtol=1e-5, atol=1e-6)
    # A periodic band of 8 + 4 + 1 = 13 per row: 13 colours on n = 26, not 26 VJPs.
    assert meta["source"] == source and meta["sparsity"] == sparsity
    assert (meta["colors"], meta["products"], meta["nnz"], meta["shape"]) == (13, 13, 26 * 13, [26, 26])
    assert meta["dense_products"] == 26 and meta["mode"] in ("fwd", "rev") and meta["format"] == "csr"


@pytest.mark.parametrize("sparsity", ["auto", "tri"])
@pytest.mark.parametrize("mode", ["rev", "fwd"])
def test_a_function_calling_autograd_grad_inside_gets_its_jacobian(client, sparsity, mode):
    """A force computed as torch.autograd.grad of an energy: jacrev answers (the dense
    /jacobian too), the sparse path was a 500 (its output was sized under no_grad, where
    the function's own autograd.grad fails)."""
    from .sparse_functions import chain_force

    x = RNG.standard_normal(6)
    J, meta = sparse_json(client.post("/v1/functions/chain_force/jacobian",
                                      json={"inputs": [x.tolist()], "sparsity": sparsity, "mode": mode}))
    np.testing.assert_allclose(J.toarray(), jac(chain_force, x), rtol=1e-6, atol=1e-9)


def test_banded_takes_lower_plus_upper_plus_one_products(client):
    x = RNG.standard_normal(20).astype(np.float32)
    for sparsity in ("band", "auto"):
        J, meta = sparse_json(client.post("/v1/functions/band_1_2/jacobian", json={"inputs": [x.tolist()], "sparsity": sparsity}))
        np.testing.assert_allclose(J.toarray(), jac(sf.band_1_2, x), rtol=1e-5, atol=1e-6)
        assert meta["products"] == meta["colors"] == 1 + 2 + 1
        assert meta["nnz"] == 20 * 4 - 1 - 3  # the band, cut at both ends


def test_mode_forces_the_side(client):
    x = RNG.standard_normal(20).astype(np.float32)
    for mode in ("fwd", "rev"):
        J, meta = sparse_json(client.post("/v1/functions/band_1_2/jacobian",
                                          json={"inputs": [x.tolist()], "sparsity": "band", "mode": mode}))
        assert meta["mode"] == mode and meta["products"] == 4
        np.testing.assert_allclose(J.toarray(), jac(sf.band_1_2, x), rtol=1e-5, atol=1e-6)


def test_a_nonzero_that_vanishes_here_is_kept(client):
    """x * y at y = 0: dJ/dx is zero at this point but not structurally; detection keeps it."""
    x, y = RNG.standard_normal(6).astype(np.float32), np.zeros(6, np.float32)
    body = {"inputs": [x.tolist(), y.tolist()], "sparsity": "auto", "argnums": [0, 1]}
    J, meta = sparse_json(client.post("/v1/functions/xy_product/jacobian", json=body))
    assert J.shape == (6, 12) and meta["nnz"] == 12 and meta["source"] == "detected" and meta["exact"] is True
    np.testing.assert_array_equal(J.toarray(), jac(sf.xy_product, x, y, argnums=(0, 1)))


def test_stencil_npz_reads_with_scipy_load_npz(client):
    u = RNG.uniform(size=(6, 5)).astype(np.float32)
    for sparsity in ("stencil", "auto"):
        r = client.post(f"/v1/functions/reaction_diffusion/jacobian?sparsity={sparsity}", content=npy_bytes(u),
                        headers={"content-type": wire.NPY, "accept": wire.NPZ})
        J = load_npz(r)
        assert isinstance(J, sp.csr_array) and J.shape == (30, 30)
        np.testing.assert_allclose(J.toarray(), jac(reaction_diffusion, u), rtol=1e-5, atol=1e-6)
        _, _, meta = wire.read_sparse_result_npz(r.content)
        # 5 is the optimum for a 5-point stencil; greedy colourings may use a little more
        assert meta["function"] == "reaction_diffusion" and 5 <= meta["colors"] == meta["products"] <= 7
        assert meta["source"] == ("declared" if sparsity == "stencil" else "detected")


def test_npz_request_carries_the_option_in_the_query(client):
    x, y = RNG.standard_normal(5).astype(np.float32), RNG.standard_normal(5).astype(np.float32)
    r = client.post("/v1/functions/xy_product/jacobian?sparsity=auto&argnums=0,1&sparse_format=coo",
                    content=npz_bytes(x=x, y=y), headers={"content-type": wire.NPZ, "accept": wire.NPZ})
    J = load_npz(r)
    assert isinstance(J, sp.coo_array)
    np.testing.assert_allclose(J.toarray(), jac(sf.xy_product, x, y, argnums=(0, 1)), rtol=1e-6)


@pytest.mark.filterwarnings("ignore:index_reduce\\(\\) is in beta")
def test_a_sparse_hessian_through_an_op_without_forward_ad_equals_the_dense_one(client):
    """index_reduce has no forward AD: the star products (forward over reverse) failed,
    a 500, where the dense Hessian falls back to reverse over reverse. The sparse one
    now falls back too."""
    x = RNG.uniform(0.5, 1.5, size=10)
    url, head = "/v1/functions/segment_products/hessian", {"content-type": wire.NPY}
    dense = client.post(url, content=npy_bytes(x), headers={**head, "accept": wire.NPY})
    assert dense.status_code == 200, dense.text
    r = client.post(f"{url}?sparsity=auto", content=npy_bytes(x), headers={**head, "accept": wire.NPZ})
    H = load_npz(r)
    want = torch.func.jacrev(torch.func.jacrev(sf.segment_products))(torch.tensor(x)).numpy()
    np.testing.assert_allclose(H.toarray(), want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.load(io.BytesIO(dense.content)), want, rtol=1e-12, atol=1e-12)
    meta = json.loads(zipfile.ZipFile(io.BytesIO(r.content)).read("meta.json"))
    assert meta["exact"] and meta["products"] < 10


def test_sparse_hessian_detected_and_declared(client):
    x = RNG.standard_normal(16)
    for name, sparsity in (("rosenbrock", "auto"), ("rosen_declared", "tridiagonal")):
        H, meta = sparse_json(client.post(f"/v1/functions/{name}/hessian",
                                          json={"inputs": [{"dtype": "float64", "shape": [16], "data": x.tolist()}],
                                                "sparsity": sparsity}), "hessian")
        np.testing.assert_allclose(H.toarray(), hess(rosenbrock, x), rtol=1e-10, atol=1e-10)
        # acyclic colouring: a path takes 2 products (star colouring: 3)
        assert meta["mode"] == "acyclic" and meta["products"] == 2 and meta["nnz"] == 3 * 16 - 2
        r = client.post(f"/v1/functions/{name}/hessian?sparsity={sparsity}", content=npy_bytes(x),
                        headers={"content-type": wire.NPY, "accept": wire.NPZ})
        np.testing.assert_allclose(load_npz(r).toarray(), hess(rosenbrock, x), rtol=1e-10, atol=1e-10)


def test_dense_format_is_the_same_matrix(client):
    x = RNG.standard_normal(26).astype(np.float32)
    r = client.post("/v1/functions/lorenz96/jacobian?sparsity=band&sparse_format=dense", content=npy_bytes(x),
                    headers={"content-type": wire.NPY, "accept": wire.NPY})
    assert r.status_code == 200 and r.headers["content-type"] == wire.NPY
    np.testing.assert_allclose(np.load(io.BytesIO(r.content)), jac(lorenz96, x), rtol=1e-5, atol=1e-6)
    r = client.post("/v1/functions/lorenz96/jacobian", json={"inputs": [x.tolist()], "sparsity": "band", "sparse_format": "dense"})
    got = wire.decode_json_array(r.json()["jacobian"])[0]
    assert got.shape == (26, 26) and r.json()["meta"]["format"] == "dense"


def test_aux_and_output_travel_beside_the_matrix(client):
    x = RNG.standard_normal(7).astype(np.float32)
    r = client.post("/v1/functions/sin_with_aux/jacobian", json={"inputs": [x.tolist()], "sparsity": "auto", "return_output": True})
    J, meta = sparse_json(r)
    np.testing.assert_allclose(J.toarray(), np.diag(np.cos(x)), rtol=1e-6)
    assert meta["nnz"] == 7 and meta["products"] == 1
    doc = r.json()
    assert doc["aux"]["label"] == "sin"
    np.testing.assert_allclose(wire.decode_tree(doc["output"]), np.sin(x), rtol=1e-6)
    r = client.post("/v1/functions/sin_with_aux/jacobian?sparsity=auto&return_output=true", content=npy_bytes(x),
                    headers={"content-type": wire.NPY, "accept": wire.NPZ})
    np.testing.assert_allclose(load_npz(r).toarray(), np.diag(np.cos(x)), rtol=1e-6)  # extra members ignored
    matrix, trees, _ = wire.read_sparse_result_npz(r.content)
    np.testing.assert_allclose(trees["output"], np.sin(x), rtol=1e-6)
    assert trees["aux"]["label"] == "sin" and float(trees["aux"]["total"]) == pytest.approx(float(x.sum()), rel=1e-5)


def test_dense_stays_the_default(client):
    x = RNG.standard_normal(26).astype(np.float32)
    r = client.post("/v1/functions/lorenz96/jacobian", json={"inputs": [x.tolist()]})
    assert r.status_code == 200 and "products" not in r.json()["meta"] and r.json()["meta"]["mode"] == "rev"
    assert wire.decode_json_array(r.json()["jacobian"])[0].shape == (26, 26)


# ------------------------------------------------------------------ rows, chunk_size, streaming, batching


def test_rows_give_that_block_from_fewer_products(client):
    """rows over the flattened output, as for dense Jacobians: the block of the sparse
    matrix, from only the products those rows need (10 rows of a 13-wide band share
    every column with each other: 10 row colours instead of 13 for n = 65, 5 x 13)."""
    x = RNG.standard_normal(65).astype(np.float32)
    want = jac(lorenz96, x)
    full, full_meta = sparse_json(client.post("/v1/functions/lorenz96/jacobian",
                                              json={"inputs": [x.tolist()], "sparsity": "band"}))
    for rows in ([10, 20], [0, 65], [60, 65], [5, 5]):
        body = {"inputs": [x.tolist()], "sparsity": "band", "rows": rows}
        J, meta = sparse_json(client.post("/v1/functions/lorenz96/jacobian", json=body))
        assert J.shape == (rows[1] - rows[0], 65) and meta["shape"] == [rows[1] - rows[0], 65]
        np.testing.assert_allclose(J.toarray(), want[rows[0]:rows[1]], rtol=1e-5, atol=1e-6)
        assert meta["nnz"] == 13 * (rows[1] - rows[0]) and meta["products"] <= full_meta["products"] == 13
    _, meta = sparse_json(client.post("/v1/functions/lorenz96/jacobian",
                                      json={"inputs": [x.tolist()], "sparsity": "auto", "rows": [10, 20], "mode": "rev"}))
    assert meta["products"] == 10 and meta["mode"] == "rev" and meta["source"] == "detected"
    # Several inputs (argnums 0 and 1), .npz both ways; rows count the output's elements.
    a, b = RNG.standard_normal(9).astype(np.float32), RNG.standard_normal(9).astype(np.float32)
    r = client.post("/v1/functions/xy_product/jacobian?sparsity=auto&argnums=0,1&rows=2,7", content=npz_bytes(x=a, y=b),
                    headers={"content-type": wire.NPZ, "accept": wire.NPZ})
    np.testing.assert_array_equal(load_npz(r).toarray(), jac(sf.xy_product, a, b, argnums=(0, 1))[2:7])


def test_chunk_size_caps_the_products_per_vmap(client):
    x = RNG.standard_normal(26).astype(np.float32)
    for chunk in (1, 4, 100):
        J, meta = sparse_json(client.post("/v1/functions/lorenz96/jacobian",
                                          json={"inputs": [x.tolist()], "sparsity": "band", "chunk_size": chunk}))
        assert meta["chunk_size"] == min(chunk, 13)
        np.testing.assert_allclose(J.toarray(), jac(lorenz96, x), rtol=1e-5, atol=1e-6)


def test_dense_npy_of_a_sparse_jacobian_streams_past_the_result_limit(make_client):
    """sparse_format=dense as .npy: the products and the CSR (small), then the dense rows
    a chunk at a time. So it is not held to the result limit, as streamed dense
    Jacobians are not; JSON, which is not streamed, still is."""
    c = make_client(MAX_RESULT_BYTES=4096, STREAM_THRESHOLD_BYTES=4096, functions=FUNCTIONS)
    x = RNG.standard_normal(300).astype(np.float32)  # 300 x 300 float32: 360,000 bytes dense
    r = c.post("/v1/functions/lorenz96/jacobian?sparsity=band&sparse_format=dense", content=npy_bytes(x),
               headers={"content-type": wire.NPY, "accept": wire.NPY})
    assert r.status_code == 200 and r.headers["content-type"] == wire.NPY
    assert int(r.headers["content-length"]) == len(r.content)  # known from the shape before any row
    np.testing.assert_allclose(np.load(io.BytesIO(r.content)), jac(lorenz96, x), rtol=1e-5, atol=1e-6)
    r = c.post("/v1/functions/lorenz96/jacobian?sparsity=band&sparse_format=dense", content=npy_bytes(x),
               headers={"content-type": wire.NPY, "accept": wire.JSON})
    assert_problem(r, 413, "result_too_large")
    small = RNG.standard_normal(20).astype(np.float32)  # under the threshold: one body
    r = c.post("/v1/functions/lorenz96/jacobian?sparsity=band&sparse_format=dense&rows=3,9", content=npy_bytes(small),
               headers={"content-type": wire.NPY, "accept": wire.NPY})
    np.testing.assert_allclose(np.load(io.BytesIO(r.content)), jac(lorenz96, small)[3:9], rtol=1e-5, atol=1e-6)


def test_concurrent_sparse_requests_share_a_batch(make_client):
    """Equal sparse requests (function, shapes, options) are stacked: one pattern, and
    each product chunk vmapped over their points too. Each gets its own matrix."""
    c = make_client(max_batch_wait_ms=300, max_batch_size=8, functions=FUNCTIONS)
    xs = RNG.standard_normal((8, 39)).astype(np.float32)  # 3 x 13: a periodic band of 13 takes 13 colours

    def one(x):
        return c.post("/v1/functions/lorenz96/jacobian?sparsity=auto&return_output=true", content=npy_bytes(x),
                      headers={"content-type": wire.NPY, "accept": wire.NPZ})

    sizes = []
    for _ in range(2):  # the first round teaches the scheduler the result's size
        with ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(one, xs))
        for x, r in zip(xs, responses):
            np.testing.assert_allclose(load_npz(r).toarray(), jac(lorenz96, x), rtol=1e-5, atol=1e-6)
            _, trees, meta = wire.read_sparse_result_npz(r.content)
            np.testing.assert_allclose(trees["output"], lorenz96(torch.tensor(x)).numpy(), rtol=1e-6)
            assert meta["products"] == 13 and meta["source"] == "detected"
            sizes.append(meta["batch_size"])
    assert max(sizes) > 1, sizes
    # Hessians and rows batch alike.
    hs = RNG.standard_normal((6, 16))
    with ThreadPoolExecutor(6) as pool:
        for _ in range(2):
            responses = list(pool.map(lambda x: c.post("/v1/functions/rosenbrock/hessian", json={
                "inputs": [{"dtype": "float64", "shape": [16], "data": x.tolist()}], "sparsity": "auto"}), hs))
    for x, r in zip(hs, responses):
        H, meta = sparse_json(r, "hessian")
        np.testing.assert_allclose(H.toarray(), hess(rosenbrock, x), rtol=1e-10, atol=1e-10)
    assert max(r.json()["meta"]["batch_size"] for r in responses) > 1


def test_a_failing_point_does_not_fail_its_sparse_batch_mates(make_client):
    c = make_client(max_batch_wait_ms=300, max_batch_size=8, functions=FUNCTIONS)
    xs = [RNG.uniform(0.5, 1.0, 12) for _ in range(6)]
    xs[3] = -xs[3]  # sqrt_positive raises on a negative input

    def one(x):
        return c.post("/v1/functions/sqrt_positive/jacobian", json={"inputs": [x.tolist()], "sparsity": "auto"})

    for _ in range(2):
        with ThreadPoolExecutor(6) as pool:
            responses = list(pool.map(one, xs))
    for i, (x, r) in enumerate(zip(xs, responses)):
        if i == 3:
            assert_problem(r, 500, "function_error")
        else:
            J, _ = sparse_json(r)
            np.testing.assert_allclose(J.toarray(), np.diag(0.5 / np.sqrt(x)), rtol=1e-6)


def test_a_pattern_that_depends_on_values_is_never_reused_at_another_point(make_client):
    """A @ x with A an input and x[idx] with idx an input: the pattern follows A's zeros
    and idx. A GET at placeholder values, then POSTs at other values, one after another
    and batched together: every answer is jacrev at its own point."""
    c = make_client(max_batch_wait_ms=300, max_batch_size=8, functions=FUNCTIONS)
    n = 6
    doc = c.get(f"/v1/functions/gather_input/sparsity?shapes={n};{n}").json()
    assert doc["pattern"]["value_dependent"] is True
    assert any("input values" in note for note in doc["pattern"]["notes"])
    x = np.arange(1.0, n + 1, dtype=np.float32)
    for idx in (np.arange(n), np.arange(n)[::-1].copy(), np.arange(n)):
        body = {"inputs": [x.tolist(), {"dtype": "int64", "shape": [n], "data": idx.tolist()}], "sparsity": "auto"}
        J, meta = sparse_json(c.post("/v1/functions/gather_input/jacobian", json=body))
        np.testing.assert_array_equal(J.toarray(), np.eye(n)[idx])
        assert meta["value_dependent"] is True and meta["exact"] is True
    eye, shifted = np.eye(n, dtype=np.float32), (np.eye(n) + np.roll(np.eye(n), 1, 1)).astype(np.float32)
    operators = [eye, shifted, eye * 2, np.triu(shifted + 1)]
    for A in operators:
        J, meta = sparse_json(c.post("/v1/functions/matvec_input/jacobian", json={"inputs": [x.tolist(), A.tolist()], "sparsity": "auto"}))
        np.testing.assert_array_equal(J.toarray(), A)

    def one(A):
        return c.post("/v1/functions/matvec_input/jacobian?sparsity=auto", content=npz_bytes(x=x, A=A),
                      headers={"content-type": wire.NPZ, "accept": wire.NPZ})

    for _ in range(2):
        with ThreadPoolExecutor(len(operators)) as pool:
            responses = list(pool.map(one, operators))
        for A, r in zip(operators, responses):
            np.testing.assert_array_equal(load_npz(r).toarray(), A)


@pytest.mark.parametrize("mode", ["fwd", "rev"])
def test_an_output_size_that_follows_the_values_gets_its_own_pattern(client, mode):
    """x[x > 0] * 3: 3 rows at one point, 1 at the next. Each answer has its own shape
    and equals jacrev; a pattern detected for 3 rows is never used for 1 (it gave a 3 x 7
    matrix, or a 500 function_error)."""
    for x in ([1.0, 1, 1, -1, -1, -1, -1], [-1.0, 1, -1, -1, -1, -1, -1], [1.0, 1, 1, -1, -1, -1, -1]):
        x = np.asarray(x, np.float32)
        J, meta = sparse_json(client.post("/v1/functions/positives/jacobian",
                                          json={"inputs": [x.tolist()], "sparsity": "auto", "mode": mode}))
        want = jac(sf.positives, x)
        assert J.shape == want.shape == (int((x > 0).sum()), 7) and meta["shape"] == list(want.shape)
        np.testing.assert_array_equal(J.toarray(), want)


def test_an_output_size_that_follows_global_state_is_detected_again(client):
    """leading() returns x[:k] with k global state: the cached pattern (k = 3) no longer
    fits once k = 1. It is detected again, never used with the wrong number of rows."""
    x = np.linspace(1, 2, 6).astype(np.float32)
    try:
        for k in (3, 1, 3):
            sf.LEADING[0] = k
            J, meta = sparse_json(client.post("/v1/functions/leading/jacobian", json={"inputs": [x.tolist()], "sparsity": "auto"}))
            np.testing.assert_array_equal(J.toarray(), 2 * np.eye(6)[:k])
            assert meta["shape"] == [k, 6]
    finally:
        sf.LEADING[0] = 3
    # An output size that changes from call to call (a counter it keeps): each request's
    # calls all begin from the state its first began in (engine.kept_state.Replay), so
    # each answers the Jacobian of torch.func.jacrev's one call, k alternating request by
    # request (a 422 "output size" before, the detection's calls each seeing another k)
    shapes = []
    for _ in range(2):
        J, meta = sparse_json(client.post("/v1/functions/flipping/jacobian", json={"inputs": [x.tolist()], "sparsity": "auto"}))
        k = meta["shape"][0]
        np.testing.assert_array_equal(J.toarray(), 2 * np.eye(6)[:k])
        shapes.append(k)
    assert sorted(shapes) == [1, 2]


def test_a_sparse_hessian_through_no_grad_equals_the_dense_one(client, make_client, tmp_path):
    """s = x.sum() under torch.no_grad: torch.func.hessian (forward over reverse, as the
    dense /hessian computes it) differentiates through s in its forward pass, so the
    Hessian is s^2 I + 2 s x 1^T, not symmetric. The sparse answer is the same matrix
    (every column, a note in meta saying why), also from the disk cache after a restart."""
    x = np.array([1.0, 2.0, 3.0], np.float32)
    want = hess(sf.no_grad_scale, x)
    dense = client.post("/v1/functions/no_grad_scale/hessian", json={"inputs": [x.tolist()]})
    np.testing.assert_allclose(wire.decode_json_array(dense.json()["hessian"])[0], want, rtol=1e-6)
    H, meta = sparse_json(client.post("/v1/functions/no_grad_scale/hessian", json={"inputs": [x.tolist()], "sparsity": "auto"}),
                          "hessian")
    np.testing.assert_allclose(H.toarray(), want, rtol=1e-6)
    assert meta["products"] == 3 and any("torch.no_grad" in note and "densely" in note for note in meta["notes"])
    for expected in (None, "disk"):
        c = make_client(functions=FUNCTIONS, sparsity_cache_dir=tmp_path)
        H, meta = sparse_json(c.post("/v1/functions/no_grad_scale/hessian", json={"inputs": [x.tolist()], "sparsity": "auto"}),
                              "hessian")
        c.__exit__(None, None, None)
        assert meta["cached"] == expected
        np.testing.assert_allclose(H.toarray(), want, rtol=1e-6)


@pytest.mark.parametrize("mode", ["fwd", "rev", "auto"])
def test_a_function_that_writes_into_its_input_gets_jacrev(client, mode):
    """x.mul_(2) under no_grad, then x**3: jacrev gives diag(12, 48, 108) at [1, 2, 3].
    Sparse detection said nnz 0 (exact: true), and each call of the function (forward,
    detection, products) saw the input its previous call had doubled."""
    x = np.array([1.0, 2.0, 3.0], np.float32)
    want = np.diag([12.0, 48.0, 108.0])
    dense = client.post("/v1/functions/doubles_in_place/jacobian", json={"inputs": [x.tolist()]})
    np.testing.assert_allclose(wire.decode_json_array(dense.json()["jacobian"])[0], want)
    for _ in range(2):  # detected, then from the cache
        J, meta = sparse_json(client.post("/v1/functions/doubles_in_place/jacobian",
                                          json={"inputs": [x.tolist()], "sparsity": "auto", "mode": mode}))
        np.testing.assert_allclose(J.toarray(), want)
        assert meta["nnz"] == 3 and meta["mode"] == "rev"  # no_grad: reverse mode only


@pytest.mark.parametrize("fmt", ["json", "npz"])
def test_forward_mode_answers_jacrevs_derivative_at_a_kink(client, fmt):
    """fmax(x, 0) at x = 0: jvp and vjp take different sides. mode=fwd answered jvp's
    (1 where jacrev says 0); the answer never depends on mode. Now one VJP checks the
    forward products, and the VJPs of a reverse colouring answer, as meta says."""
    x = np.array([0.0, 1.0, -2.0, 0.0, 3.0, 2.0], np.float32)
    query = "sparsity=auto&mode=fwd"
    if fmt == "json":
        J, meta = sparse_json(client.post(f"/v1/functions/fmax_ties/jacobian?{query}", json={"inputs": [x.tolist()]}))
    else:
        r = client.post(f"/v1/functions/fmax_ties/jacobian?{query}", content=npy_bytes(x),
                        headers={"content-type": wire.NPY, "accept": wire.NPZ})
        J = load_npz(r)
        meta = json.loads(zipfile.ZipFile(io.BytesIO(r.content)).read("meta.json"))
    np.testing.assert_allclose(J.toarray(), jac(sf.fmax_ties, x))
    assert meta["mode"] == "rev" and meta["colors"] == meta["products"] == 2


@pytest.mark.parametrize("fmt,accept", [("csr", wire.JSON), ("coo", wire.NPZ), ("dense", wire.NPY), ("dense", wire.JSON)])
def test_float16_inputs_get_their_sparse_jacobian_in_every_format(client, fmt, accept):
    """scipy.sparse holds no float16: coo and dense answers were 500 internal_error with
    a logged traceback, and csr a matrix no client could densify. The sparse matrix now
    holds float32 (exactly the float16 values); a dense answer is float16, as jacrev's."""
    x = np.array([0.4, 1.6, -2.2, 0.1, 3.1, 2.0], np.float16)
    dense = client.post("/v1/functions/lorenz96/jacobian", content=npy_bytes(x),
                        headers={"content-type": wire.NPY, "accept": wire.NPY})
    want = np.load(io.BytesIO(dense.content))
    r = client.post(f"/v1/functions/lorenz96/jacobian?sparsity=auto&mode=rev&sparse_format={fmt}", content=npy_bytes(x),
                    headers={"content-type": wire.NPY, "accept": accept})
    assert r.status_code == 200, r.text
    if fmt == "dense":
        got = np.load(io.BytesIO(r.content)) if accept == wire.NPY else wire.decode_json_array(r.json()["jacobian"])[0]
        assert got.dtype == np.float16
    else:
        got = load_npz(r) if accept == wire.NPZ else sparse_json(r)[0]
        assert got.dtype == np.float32
        got = got.toarray()
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("mode", ["auto", "fwd", "rev"])
def test_an_integer_output_is_refused_as_jacrev_refuses_it(client, mode):
    """jacrev refuses a function with an integer output (the dense route: 422
    invalid_input); sparse requests answered 200, the integer output's rows zeros."""
    body = {"inputs": [[1.0, 3.0, 2.0]], "mode": mode}
    dense = assert_problem(client.post("/v1/functions/with_an_index/jacobian", json=body), 422, "invalid_input")
    sparse = assert_problem(client.post("/v1/functions/with_an_index/jacobian", json={**body, "sparsity": "auto"}),
                            422, "invalid_input")
    assert "int64" in dense["detail"] and "int64" in sparse["detail"]


@pytest.mark.parametrize("mode", ["auto", "fwd", "rev"])
def test_a_declared_pattern_proven_wrong_is_a_422_not_wrong_values(client, mode):
    """A declared pattern is trusted: declared diagonal, the function couples neighbours.
    The one product of a diagonal colouring sums every row (or column), and the values
    read from it were 3, not 2 (200). A product with a random seed disagrees: 422."""
    x = np.arange(1.0, 6.0).astype(np.float32)
    problem = assert_problem(client.post("/v1/functions/wrong_declared/jacobian",
                                         json={"inputs": [x.tolist()], "sparsity": "diag", "mode": mode}), 422, "invalid_input")
    assert "'diag'" in problem["detail"] and "trusted" in problem["detail"] and "sparsity=auto" in problem["detail"]
    problem = assert_problem(client.post("/v1/functions/wrong_declared_h/hessian",
                                         json={"inputs": [x.tolist()], "sparsity": "diagH"}), 422, "invalid_input")
    assert "'diagH'" in problem["detail"]
    # auto still answers, right
    J, _ = sparse_json(client.post("/v1/functions/wrong_declared/jacobian", json={"inputs": [x.tolist()], "sparsity": "auto"}))
    np.testing.assert_allclose(J.toarray(), jac(sf.wrong_declared, x))


def test_a_probed_pattern_includes_this_point_and_is_checked(client):
    """Tracing fails, probing runs. The derivative of the where() part is nonzero only at
    x == 1 exactly: at the request's point x = ones it is there, and random points miss it.
    The probe now includes the point itself; and a probed pattern the products prove
    wrong at a later point is answered densely (with a note), never with wrong values."""
    ones = np.ones(4, np.float32)
    J, meta = sparse_json(client.post("/v1/functions/probed_at_one/jacobian", json={"inputs": [ones.tolist()], "sparsity": "auto"}))
    assert meta["source"] == "probed"
    np.testing.assert_allclose(J.toarray(), jac(sf.probed_at_one, ones))
    # probed (and cached) at a point where the where() part vanishes, then asked at x = ones
    x = np.array([2.0, 3.0, 4.0, 5.0], np.float32)
    for mode in ("fwd", "rev"):  # each mode its own cache entry: probed afresh at x
        for point, dense in ((x, False), (ones, True)):
            J, meta = sparse_json(client.post("/v1/functions/probed_at_one/jacobian",
                                              json={"inputs": [point.tolist()], "sparsity": "auto", "mode": mode}))
            np.testing.assert_allclose(J.toarray(), jac(sf.probed_at_one, point))
            assert any("proved this pattern wrong" in note for note in meta["notes"]) is dense
            assert meta["products"] == (4 if dense else 1) and meta["nnz"] == (8 if dense else 4)
        # The cached pattern proven wrong was kept: every later request paid the products,
        # then a dense derivative. It is now widened by what that point showed.
        for point in (ones, x):
            J, meta = sparse_json(client.post("/v1/functions/probed_at_one/jacobian",
                                              json={"inputs": [point.tolist()], "sparsity": "auto", "mode": mode}))
            np.testing.assert_allclose(J.toarray(), jac(sf.probed_at_one, point))
            assert not any("proved this pattern wrong" in note for note in meta["notes"])
            assert meta["cached"] == "memory" and meta["products"] == 2 and meta["nnz"] == 8
            assert any("widened" in note for note in meta["notes"])


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize("path,body,status,code", [
    ("lorenz96/jacobian", {"sparsity": "nope"}, 422, "sparsity_not_found"),
    ("lorenz96/evaluate", {"sparsity": "auto"}, 422, "invalid_input"),
    ("lorenz96/vjp", {"sparsity": "auto", "cotangents": [0.0] * 26}, 422, "invalid_input"),
    ("lorenz96/jacobian", {"sparsity": "auto", "rows": [0, 27]}, 422, "invalid_input"),  # past 26 outputs
    ("lorenz96/jacobian", {"sparsity": "auto", "sparse_format": "bsr"}, 422, "invalid_input"),
    ("lorenz96/jacobian", {"sparsity": 3}, 422, "invalid_input"),
    ("rosen_declared/jacobian", {"sparsity": "tridiagonal"}, 422, "invalid_input"),  # a Hessian pattern
    ("band_1_2/hessian", {"sparsity": "band"}, 422, "invalid_input"),  # a Jacobian pattern
    ("lorenz96/hessian", {"sparsity": "auto"}, 422, "invalid_input"),  # not scalar
])
def test_errors(client, path, body, status, code):
    x = np.linspace(0.1, 1, 26).tolist()
    problem = assert_problem(client.post(f"/v1/functions/{path}", json={"inputs": [x], **body}), status, code)
    if code == "sparsity_not_found":
        assert "'nope'" in problem["detail"] and "band" in problem["detail"]


def test_errors_for_binary_bodies_and_batches(client):
    x = np.linspace(0.1, 1, 26).astype(np.float32)
    headers = {"content-type": wire.NPY, "accept": wire.NPZ}
    assert_problem(client.post("/v1/functions/lorenz96/jacobian?sparsity=nope", content=npy_bytes(x), headers=headers),
                   422, "sparsity_not_found")
    assert_problem(client.post("/v1/functions/lorenz96/jacobian?sparsity=auto&batched=true",
                               content=npy_bytes(np.stack([x, x])), headers=headers), 422, "invalid_input")
    # A sparse matrix is not one .npy: 406 before any compute, unless asked dense.
    assert_problem(client.post("/v1/functions/lorenz96/jacobian?sparsity=auto", content=npy_bytes(x),
                               headers={"content-type": wire.NPY, "accept": wire.NPY}), 406, "not_acceptable")
    # A declared pattern that does not fit the shapes: told by the engine, still a 422.
    problem = assert_problem(client.post("/v1/functions/band_1_2/jacobian?sparsity=fixed3", content=npy_bytes(x),
                                         headers=headers), 422, "invalid_input")
    assert "(3, 3)" in problem["detail"] and "(26, 26)" in problem["detail"]
    assert_problem(client.post("/v1/functions/band_1_2/jacobian?sparsity=hessian_only", content=npy_bytes(x),
                               headers=headers), 422, "invalid_input")


def test_result_limit_holds_for_sparse_results(make_client):
    c = make_client(MAX_RESULT_BYTES=4096, functions=FUNCTIONS)
    x = np.linspace(0.1, 1, 200).astype(np.float32)
    # 200 x 13 entries: 2600 * (4 + 4) + 201 * 4 bytes > 4096, known from the pattern
    r = c.post("/v1/functions/lorenz96/jacobian?sparsity=band", content=npy_bytes(x),
               headers={"content-type": wire.NPY, "accept": wire.NPZ})
    assert_problem(r, 413, "result_too_large")
    small = np.linspace(0.1, 1, 26).astype(np.float32)  # 338 * 8 + 27 * 4 = 2812 bytes: fits
    assert c.post("/v1/functions/lorenz96/jacobian?sparsity=band", content=npy_bytes(small),
                  headers={"content-type": wire.NPY, "accept": wire.NPZ}).status_code == 200
    # Densified it would take 26 * 26 * 4 = 2704 bytes: fits; 40 x 40 does not.
    r = c.post("/v1/functions/lorenz96/jacobian?sparsity=band&sparse_format=dense",
               content=npy_bytes(np.linspace(0.1, 1, 40).astype(np.float32)), headers={"content-type": wire.NPY})
    assert_problem(r, 413, "result_too_large")


def test_deadline_holds(make_client):
    c = make_client(functions=FUNCTIONS, REQUEST_TIMEOUT_S="0.000001")
    r = c.post("/v1/functions/band_1_2/jacobian", json={"inputs": [[1.0, 2.0, 3.0]], "sparsity": "band"})
    assert_problem(r, 504, "timeout")


def test_detection_stops_at_the_deadline_and_frees_the_engine(make_client):
    """Tracing a long Python loop takes seconds: a request with a short deadline gets its
    504, and the engine (one on this machine) stops detecting then, instead of tracing
    to the end for nobody. Nothing partial is cached: a later request detects in full.
    (How long a full detection takes here is read off that last request, not a run of its
    own: each one costs seconds of the suite.)"""
    c = make_client(functions=FUNCTIONS)
    x = np.linspace(-1, 1, 256).astype(np.float32)
    small = np.linspace(0.1, 1, 26).astype(np.float32)
    short = {"X-Request-Timeout": "0.3"}

    def fast_answer():
        t0 = time.perf_counter()
        J, _ = sparse_json(c.post("/v1/functions/lorenz96/jacobian", json={"inputs": [small.tolist()], "sparsity": "band"}))
        elapsed = time.perf_counter() - t0
        np.testing.assert_allclose(J.toarray(), jac(lorenz96, small), rtol=1e-5, atol=1e-6)
        return elapsed

    r = c.post("/v1/functions/slow_detection/jacobian", json={"inputs": [x.tolist()], "sparsity": "auto"}, headers=short)
    assert_problem(r, 504, "timeout")
    after_post = fast_answer()
    # GET .../sparsity detects the same way, under the same deadline.
    assert_problem(c.get("/v1/functions/slow_detection/sparsity?shapes=256", headers=short), 504, "timeout")
    after_get = fast_answer()
    t0 = time.perf_counter()
    r = c.post("/v1/functions/slow_detection/jacobian", json={"inputs": [x.tolist()], "sparsity": "auto"},
               headers={"X-Request-Timeout": "120"})
    full = time.perf_counter() - t0  # a full detection (and the compressed products), here
    J, meta = sparse_json(r)
    assert meta["source"] == "detected" and meta["cached"] is None and meta["nnz"] == 2 * 256
    np.testing.assert_allclose(J.toarray(), jac(sf.slow_detection, x), rtol=1e-5, atol=1e-6)
    assert full > 1.0, "the test needs detection clearly longer than its 0.3 s deadline"
    # Queued behind a detection that ran on, each would have waited about full - 0.3 s.
    assert after_post < full / 2 and after_get < full / 2, (after_post, after_get, full)


# ------------------------------------------------------------------ GET .../sparsity


def test_get_sparsity_declared(client):
    r = client.get("/v1/functions/lorenz96/sparsity?shapes=26&sparsity=band")
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["function"] == "lorenz96" and doc["kind"] == "jacobian"
    assert doc["pattern"]["source"] == "declared" and doc["pattern"]["nnz"] == 26 * 13
    assert doc["products"] == doc["coloring"]["colors"] == 13 and doc["dense_products"] == 26
    assert doc["picture"] and set(doc["picture"]) <= {chr(c) for c in range(0x2800, 0x2900)} | {"\n"}
    M = wire.decode_sparse_json(doc["matrix"])
    x = RNG.standard_normal(26).astype(np.float32)
    np.testing.assert_array_equal(M.toarray() != 0, jac(lorenz96, x) != 0)


def test_get_sparsity_detected_contains_the_true_pattern(client):
    r = client.get("/v1/functions/reaction_diffusion/sparsity", params={"shapes": "6,5", "format": "coo"})
    doc = r.json()
    assert r.status_code == 200 and doc["pattern"]["source"] == "detected" and doc["matrix"]["format"] == "coo"
    M = wire.decode_sparse_json(doc["matrix"]).toarray() != 0
    true = jac(reaction_diffusion, RNG.uniform(size=(6, 5)).astype(np.float32)) != 0
    assert (M | true == M).all() and M.sum() == true.sum()  # exact for these ops


def test_get_sparsity_hessian_as_npz(client):
    r = client.get("/v1/functions/rosenbrock/sparsity?shapes=12&kind=hessian", headers={"accept": wire.NPZ})
    H = load_npz(r)
    assert H.shape == (12, 12) and H.nnz == 3 * 12 - 2
    _, meta = wire.read_sparse_npz(r.content)
    assert meta["coloring"]["mode"] == "acyclic" and meta["products"] == 2


def test_get_sparsity_several_inputs_and_argnums(client):
    doc = client.get("/v1/functions/xy_product/sparsity?shapes=4;4&argnums=0,1").json()
    assert doc["pattern"]["shape"] == [4, 8] and doc["pattern"]["nnz"] == 8


@pytest.mark.parametrize("query,status,code", [
    ("", 422, "invalid_input"),  # no shapes
    ("shapes=3;4", 422, "invalid_input"),  # lorenz96 has one input
    ("shapes=a", 422, "invalid_input"),
    ("shapes=26&kind=gradient", 422, "invalid_input"),
    ("shapes=26&sparsity=nope", 422, "sparsity_not_found"),
    ("shapes=26&sparsity=dense", 422, "invalid_input"),
    ("shapes=26&format=dense", 422, "invalid_input"),
    ("shapes=26&colour=1", 422, "invalid_input"),
    ("shapes=99999999999", 413, "payload_too_large"),  # over the element limit, as in a body
])
def test_get_sparsity_errors(client, query, status, code):
    assert_problem(client.get(f"/v1/functions/lorenz96/sparsity?{query}"), status, code)


def test_get_sparsity_unknown_function_and_auth(client, make_client):
    assert_problem(client.get("/v1/functions/nope/sparsity?shapes=3"), 404, "function_not_found")
    r = client.get("/v1/functions/lorenz96/sparsity?shapes=26", headers={"accept": wire.NPY})
    assert_problem(r, 406, "not_acceptable")
    # It pointed at sparse_format=dense, an option of the POSTs that this endpoint refuses.
    assert "sparse_format" not in r.json()["detail"] and wire.NPZ in r.json()["detail"]
    c = make_client(API_KEYS="k1")
    assert_problem(c.get("/v1/functions/lorenz96/sparsity?shapes=26"), 401, "unauthorized")
    assert c.get("/v1/functions/lorenz96/sparsity?shapes=26", headers={"authorization": "Bearer k1"}).status_code == 200


def test_openapi_documents_the_option_and_the_endpoint(client):
    doc = client.get("/openapi.json").json()
    op = doc["paths"]["/v1/functions/{name}/sparsity"]["get"]
    assert op["operationId"] == "getSparsity"
    assert {"shapes", "kind", "sparsity", "format"} <= {p["name"] for p in op["parameters"]}
    assert "422" in op["responses"] and "sparsity_not_found" in op["responses"]["422"]["description"]
    schemas = doc["components"]["schemas"]
    assert {"sparsity", "sparse_format"} <= set(schemas["JacobianRequest"]["properties"])
    assert {"SparseMatrix", "SparsityPattern"} <= set(schemas)
    assert "sparsity_not_found" in schemas["Problem"]["properties"]["code"]["enum"]


# ------------------------------------------------------------------ one real server, SDK and CLI


@pytest.fixture(scope="module")
def server():
    # one front end: the engine process is what these tests reach (a second front end cost
    # ~1.3 CPU-s at start, and none of them counts front ends)
    with live_server(functions=FUNCTIONS, engine_standby="false", workers=1) as (url, proc):
        yield url


def test_real_server_sdk_sync_and_async(server):
    x = RNG.standard_normal(26).astype(np.float32)
    want = jac(lorenz96, x)
    with Client(server) as c:
        for transport in ("binary", "json"):
            for fmt, kind in ((None, sp.csr_array), ("coo", sp.coo_array), ("dense", np.ndarray)):
                J = c.jacobian("lorenz96", x, sparsity="band", sparse_format=fmt, transport=transport)
                assert isinstance(J, kind)
                np.testing.assert_allclose(J if fmt == "dense" else J.toarray(), want, rtol=1e-5, atol=1e-6)
        xh = RNG.standard_normal(16)
        H = c.hessian("rosenbrock", xh, sparsity="auto")
        np.testing.assert_allclose(H.toarray(), hess(rosenbrock, xh), rtol=1e-10, atol=1e-10)
        J, output, aux = c.jacobian("sin_with_aux", x, sparsity="auto", return_output=True)
        np.testing.assert_allclose(J.toarray(), np.diag(np.cos(x)), rtol=1e-6)
        assert aux["label"] == "sin"
        d = c.sparsity("lorenz96", (26,), sparsity="band")
        assert d["products"] == 13 and isinstance(d["matrix"], sp.csr_array) and d["matrix"].nnz == 26 * 13
        d = c.sparsity("xy_product", x, x, argnums=(0, 1))
        assert d["pattern"]["shape"] == [26, 52] and d["pattern"]["source"] == "detected"
        with pytest.raises(SparsityNotFound):
            c.jacobian("lorenz96", x, sparsity="nope")

    async def run():
        async with AsyncClient(server) as ac:
            return (await ac.jacobian("lorenz96", x, sparsity="auto"),
                    await ac.sparsity("rosenbrock", (16,), kind="hessian"))

    J, d = asyncio.run(run())
    np.testing.assert_allclose(J.toarray(), want, rtol=1e-5, atol=1e-6)
    assert d["coloring"]["mode"] == "acyclic" and d["products"] == 2


def test_real_server_raw_npz_and_stencil(server):
    import httpx

    u = RNG.uniform(size=(6, 5)).astype(np.float32)
    r = httpx.post(f"{server}/v1/functions/reaction_diffusion/jacobian?sparsity=stencil", content=npy_bytes(u),
                   headers={"content-type": wire.NPY, "accept": wire.NPZ}, timeout=60)
    J = load_npz(r)
    np.testing.assert_allclose(J.toarray(), jac(reaction_diffusion, u), rtol=1e-5, atol=1e-6)
    r = httpx.post(f"{server}/v1/functions/lorenz96/jacobian", json={"inputs": [[1.0] * 26], "sparsity": "nope"}, timeout=60)
    assert_problem(r, 422, "sparsity_not_found")
    # Through the engine process: a dense .npy of a sparse Jacobian, streamed (16 MiB, over
    # the 8 MiB stream threshold), and a block of rows.
    x = RNG.standard_normal(2048).astype(np.float32)
    want = jac(lorenz96, x)
    r = httpx.post(f"{server}/v1/functions/lorenz96/jacobian?sparsity=band&sparse_format=dense", content=npy_bytes(x),
                   headers={"content-type": wire.NPY, "accept": wire.NPY}, timeout=60)
    assert r.status_code == 200 and int(r.headers["x-chunk-size"]) < 2048  # rows came a chunk at a time
    np.testing.assert_allclose(np.load(io.BytesIO(r.content)), want, rtol=1e-5, atol=1e-6)
    with Client(server) as c:
        J = c.jacobian("lorenz96", x, sparsity="auto", rows=(100, 140))
        np.testing.assert_allclose(J.toarray(), want[100:140], rtol=1e-5, atol=1e-6)


def test_real_server_cli_prints_the_pattern(server, tmp_path):
    x = np.linspace(0.1, 1, 26).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    cmd = [sys.executable, "-m", "jacobian_service.cli", "call", "lorenz96", "--url", server,
           "--input", str(tmp_path / "x.npy"), "--sparsity", "band", "--pattern", "--out", str(tmp_path / "J.npz")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("26 x 26, 338 stored entries\n")
    assert any(0x2800 < ord(ch) < 0x2900 for ch in done.stdout)
    np.testing.assert_allclose(sp.load_npz(tmp_path / "J.npz").toarray(), jac(lorenz96, x), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ plumbing


def test_ipc_carries_sparse_matrices_as_frames():
    from jacobian_service import ipc
    from jacobian_service.types import JobInfo, Result

    csr = sp.random_array((7, 9), density=0.3, format="csr", dtype=np.float64, rng=1)
    result = Result(csr, aux={"coo": csr.tocoo()}, has_aux=True, sparse_meta={"products": 3, "source": "detected"})
    frames = ipc.encode_reply(5, result, JobInfo(device="cpu"))
    assert len(frames) == 1 + 3 + 3  # the header, then indptr/indices/data and row/col/data as raw frames
    got, _ = ipc.decode_reply(*ipc.parse([bytes(memoryview(f)) for f in frames]))
    assert isinstance(got.value, sp.csr_array) and isinstance(got.aux["coo"], sp.coo_array)
    np.testing.assert_array_equal(got.value.toarray(), csr.toarray())
    np.testing.assert_array_equal(got.aux["coo"].toarray(), csr.toarray())
    assert got.sparse_meta == {"products": 3, "source": "detected"} and got.nbytes() == result.nbytes() > 0


def test_disk_cache_survives_a_restart(make_client, tmp_path):
    body = {"inputs": [np.linspace(0.1, 1, 26).tolist()], "sparsity": "auto"}
    metas = []
    for _ in range(2):  # two apps, as two server runs: the second reads the pattern from disk
        c = make_client(functions=FUNCTIONS, sparsity_cache_dir=tmp_path)
        metas.append(c.post("/v1/functions/lorenz96/jacobian", json=body).json()["meta"])
        c.__exit__(None, None, None)
    assert metas[0]["cached"] is None and metas[1]["cached"] == "disk"
    assert metas[0]["products"] == metas[1]["products"] and list(tmp_path.glob("*.npz"))


def test_without_scipy_the_sdk_decodes_to_sparsecoo(client, monkeypatch):
    x = RNG.standard_normal(26).astype(np.float32)
    body_npz = client.post("/v1/functions/lorenz96/jacobian?sparsity=band", content=npy_bytes(x),
                           headers={"content-type": wire.NPY, "accept": wire.NPZ}).content
    doc = client.post("/v1/functions/lorenz96/jacobian", json={"inputs": [x.tolist()], "sparsity": "band"}).json()
    monkeypatch.setitem(sys.modules, "scipy", None)  # as in the SDK's base install
    monkeypatch.setitem(sys.modules, "scipy.sparse", None)
    for J in (wire.read_sparse_result_npz(body_npz)[0], wire.decode_tree(doc["jacobian"])):
        assert isinstance(J, wire.SparseCOO) and J.nnz == 26 * 13
        np.testing.assert_allclose(J.toarray(), jac(lorenz96, x), rtol=1e-5, atol=1e-6)


def test_empty_inputs_give_an_empty_matrix(client):
    J, meta = sparse_json(client.post("/v1/functions/softmax/jacobian", json={"inputs": [[]], "sparsity": "auto"}))
    assert J.shape == (0, 0) and meta["products"] == 0 and meta["source"] == "empty"
    doc = client.get("/v1/functions/lorenz96/sparsity?shapes=0").json()
    assert doc["pattern"]["shape"] == [0, 0] and doc["products"] == 0


def test_a_pattern_too_dense_for_the_limits_is_413_before_it_is_built(make_client):
    """softmax is dense: detecting it at n = 300 would hold 90,000 entries; a 1 MiB
    memory budget allows 65,536 (budget / 16). Refused, never probed densely."""
    c = make_client(functions=FUNCTIONS, memory_budget_bytes=1 << 20)
    x = np.linspace(0.1, 1, 300).astype(np.float32)
    r = c.post("/v1/functions/softmax/jacobian?sparsity=auto", content=npy_bytes(x),
               headers={"content-type": wire.NPY, "accept": wire.NPZ})
    problem = assert_problem(r, 413, "result_too_large")
    assert "90,000" in problem["detail"] and "65,536" in problem["detail"]
    assert_problem(c.get("/v1/functions/softmax/sparsity?shapes=300"), 413, "result_too_large")
    # the same function a little smaller still works, and dense requests are untouched
    small = np.linspace(0.1, 1, 100).astype(np.float32)
    J, meta = sparse_json(c.post("/v1/functions/softmax/jacobian", json={"inputs": [small.tolist()], "sparsity": "auto"}))
    assert meta["nnz"] == 100 * 100 and meta["products"] == 100
    assert c.post("/v1/functions/softmax/jacobian", content=npy_bytes(x), headers={"content-type": wire.NPY}).status_code == 200


def test_get_sparsity_shapes_are_bounded_like_a_body(client):
    assert_problem(client.get("/v1/functions/lorenz96/sparsity?shapes=40000000"), 413, "payload_too_large")


@pytest.mark.parametrize("name,shapes,status,needle", [
    ("sin", "99999999999999999999999", 422, "beyond int64"),  # was an OverflowError: 500
    ("sin", "9223372036854775808", 422, "beyond int64"),  # 2**63: numpy's "maximum allowed dimension exceeded"
    ("sin", "0,99999999999999999999999", 422, "beyond int64"),
    ("sin", "9" * 5000, 422, "beyond int64"),  # int() refuses more than 4,300 digits
    ("sin", "0,9223372036854775807", 422, "holds no elements"),  # holds nothing, but numpy refuses it
    # over the element limit: a 413, as the same shape in a body is (it was a 422 here)
    ("reaction_diffusion", "4294967296,4294967296", 413, "over the limit of 268435456 elements"),  # np.prod wrapped to 0
    ("reaction_diffusion", "65536,65536", 413, "over the limit of 268435456 elements"),
    ("sin", "3;4", 422, "sin takes 1 input ['x']; shapes gives 2"),  # said "1 inputs", as a body's count once did
    ("xy_product", "3", 422, "xy_product takes 2 inputs ['x', 'y']; shapes gives 1"),
])
def test_get_sparsity_shapes_are_checked_as_the_wire_checks_them(client, name, shapes, status, needle):
    """Sizes are Python ints within int64 whose product (exact, over the non-zero sizes)
    is within the element limit, as the JSON and .npy paths check a shape: a 422 or 413
    that says which, as a body's shape gets, never a 500 from an overflow further on."""
    code = "invalid_input" if status == 422 else "payload_too_large"
    problem = assert_problem(client.get(f"/v1/functions/{name}/sparsity", params={"shapes": shapes}), status, code)
    assert needle in problem["detail"] and "Traceback" not in problem["detail"]


def test_real_server_a_costly_sparsity_request_ends_at_its_deadline(server):
    """The red team's request, GET softmax's pattern at n = 2000 (dense), ran a minute
    in the one engine: every other request waited, its 504 came at the deadline, then
    the supervisor killed the engine as hung (and counted it against softmax). Now it
    is answered in about a second; a detection that is still long (7,500 traced ops
    under a 1 s deadline: a stencil, even at 600 x 600, is now detected and coloured
    within it) stops at its deadline, the engine takes the next request at once, and
    no engine is restarted."""
    def restarts():
        text = httpx.get(f"{server}/metrics").text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("jacobian_service_engine_restarts{"))

    before = restarts()
    t0 = time.monotonic()
    r = httpx.get(f"{server}/v1/functions/softmax/sparsity?shapes=2000", timeout=60,
                  headers={"accept": wire.NPZ, "X-Request-Timeout": "15"})
    elapsed = time.monotonic() - t0
    P = load_npz(r)
    _, meta = wire.read_sparse_npz(r.content)
    assert P.shape == (2000, 2000) and P.nnz == 2000 * 2000 and meta["products"] == 2000
    assert elapsed < 10, elapsed  # ~1.2 s here
    t0 = time.monotonic()
    r = httpx.get(f"{server}/v1/functions/slow_detection/sparsity?shapes=4096", timeout=60,
                  headers={"X-Request-Timeout": "1"})  # seconds of detection to the end
    assert_problem(r, 504, "timeout")
    assert time.monotonic() - t0 < 3
    t0 = time.monotonic()
    x = RNG.standard_normal(26).astype(np.float32)
    J, _ = sparse_json(httpx.post(f"{server}/v1/functions/lorenz96/jacobian", timeout=60,
                                  json={"inputs": [x.tolist()], "sparsity": "band"}))
    assert time.monotonic() - t0 < 2  # the engine was free
    np.testing.assert_allclose(J.toarray(), jac(lorenz96, x), rtol=1e-5, atol=1e-6)
    assert restarts() == before == 0


@pytest.mark.parametrize("dtype", ["int64", "bool"])
def test_a_pattern_for_integers_named_for_a_floating_input_is_422_as_its_request_would_be(client, dtype):
    """GET .../sparsity answered a pattern where the POST it describes is refused."""
    r = client.get(f"/v1/functions/sum_sin/sparsity?shapes=3&dtypes={dtype}")
    assert r.status_code == 422 and r.json()["code"] == "invalid_input"
    assert r.json()["detail"].startswith(f"input 'x' is {dtype}; only floating inputs can be differentiated: send it as floats")
    assert client.get("/v1/functions/sum_sin/sparsity?shapes=3&dtypes=float64").status_code == 200


def test_a_pattern_for_a_complex_input_is_refused_in_a_bodys_words(client):
    """A complex dtype here was an "unknown dtype" (a JSON or .npy body's says why: inputs
    are real; complex arrays are read only as a complex output's cotangents)."""
    r = client.get("/v1/functions/sum_sin/sparsity?shapes=3&dtypes=complex64")
    body = assert_problem(r, 422, "invalid_input")
    assert body["detail"].startswith("dtypes: unsupported dtype complex64 here: inputs and tangents are real"), body
    posted = client.post("/v1/functions/sum_sin/jacobian",
                         json={"inputs": [{"dtype": "complex64", "shape": [3], "data": [1, 2, 3]}]})
    assert assert_problem(posted, 422, "invalid_input")["detail"].startswith("input 'x': unsupported dtype complex64 here")


@pytest.mark.parametrize("name,shape,nnz,colors", [
    ("fem_1d", (100_000,), 3 * 100_000 - 2, 3),  # tridiagonal
    # triangles on a 100 x 100 grid: each node, its 4 grid neighbours and 2 diagonal ones
    ("fem_2d", (100, 100), 100 * 100 + 2 * (2 * 100 * 99 + 99 * 99), 8),
])
def test_a_finite_element_residual_at_scale_gets_its_sparse_jacobian(client, name, shape, nnz, colors):
    """Element residuals index_add-ed into ``torch.zeros(n)``: the tracer gave up on the
    write into a buffer it never saw made, and the probe it fell back to needs the dense
    Jacobian, 10^10 entries at n = 10^5: a 413. Now an exact pattern, a few products."""
    u = RNG.uniform(0.5, 1.5, size=shape)
    r = client.post(f"/v1/functions/{name}/jacobian?sparsity=auto", content=npy_bytes(u),
                    headers={"content-type": wire.NPY, "accept": wire.NPZ})
    J = load_npz(r)
    meta = json.loads(zipfile.ZipFile(io.BytesIO(r.content)).read("meta.json"))
    assert meta["source"] == "detected" and meta["exact"] and not meta["value_dependent"] and meta["nnz"] == J.nnz == nnz
    assert meta["products"] == meta["colors"] <= colors
    # the values: J v and w^T J against torch.func's jvp and vjp at random v, w
    fn, t = getattr(sf, name), torch.tensor(u)
    v, w = RNG.standard_normal(u.size), RNG.standard_normal(u.size)
    _, jv = torch.func.jvp(fn, (t,), (torch.tensor(v).reshape(shape),))
    _, vjp = torch.func.vjp(fn, t)
    np.testing.assert_allclose(J @ v, jv.reshape(-1).numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(w @ J, vjp(torch.tensor(w).reshape(shape))[0].reshape(-1).numpy(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["random_scatter", "numpy_random_scatter"])
@pytest.mark.parametrize("mode", ["fwd", "rev"])
def test_a_function_that_draws_its_indices_gets_one_draws_jacobian(client, name, mode):
    """y = x + index_add(randint(...), x**2): each request draws anew. The pattern of the
    first draw was cached and read the products of later draws (values off by ~2 with
    exact: true). Now each answer is the Jacobian of the very draw its output shows:
    one entry 2 x_k per column k (past the identity), where y says x_k**2 went."""
    x = np.linspace(0.5, 2.0, 10)
    for _ in range(3):
        r = client.post(f"/v1/functions/{name}/jacobian",
                        json={"inputs": [x.tolist()], "sparsity": "auto", "mode": mode, "return_output": True})
        J, meta = sparse_json(r)
        y = np.asarray(r.json()["output"]["data"])
        P = J.toarray() - np.eye(10)
        assert ((P != 0).sum(axis=0) == 1).all()
        np.testing.assert_allclose(P.max(axis=0), 2 * x, rtol=1e-12)
        np.testing.assert_allclose(y, x + P @ (x / 2), rtol=1e-12)
        assert meta["value_dependent"] is True and meta["cached"] is None
        assert any("draws random numbers" in note for note in meta["notes"])
