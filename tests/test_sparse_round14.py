"""Sparse Jacobians and Hessians, round 14: a sparse Hessian's dense form streamed as
``.npy`` (as a sparse Jacobian's is), the tracer's entry limit (the inputs are not the
answer), and each answer against torch.func in this process.

One in-process app serves most cases (no new server process), under a 1 MiB result
limit; the engine process's IPC is crossed on the session's shared ``remote_server``.
"""

from __future__ import annotations

import io
import re

import httpx
import numpy as np
import pytest
import torch

from jacobian_client import Client, wire
from jacobian_service import examples
from tests import sparse14_functions as s14

from .conftest import ready_app_with
from .test_sparse_round9 import f64
from .test_sparse_round10 import sdk  # noqa: F401 (round 10's fixture: the SDK through this module's in-process app)
from .test_sparse_round11 import _npy, _refused  # an array as an .npy body; a 413 problem's detail

RNG = np.random.default_rng(14)

#: The app's result limit.
LIMIT = 1 << 20

NPY = {"content-type": "application/x-npy", "accept": "application/x-npy"}


@pytest.fixture(scope="module")
def client():
    with ready_app_with("tests.sparse14_functions", max_result_bytes=LIMIT) as c:
        yield c


def hessian(f, x):
    return torch.func.hessian(f)(torch.from_numpy(x)).numpy()


def jacrev(f, x):
    return torch.func.jacrev(f)(torch.from_numpy(x)).reshape(-1, x.size).numpy()


# ------------------------------------------------------------------ a sparse Hessian's dense form, streamed


def test_a_sparse_hessians_dense_npy_streams_as_a_jacobians_does(client, sdk, tmp_path):
    """``sparse_format=dense`` as ``.npy``: a sparse Jacobian's dense form streams past
    the result limit, densified a chunk of rows at a time; a sparse Hessian's of the same
    size was a 413 whose detail offered 'a sparse Jacobian's dense form as
    application/x-npy'. Now it streams too (its length known before any row), through
    the SDK's ``out=`` as well; JSON, never streamed, is still a 413, which names the
    ``.npy`` way."""
    n = 400  # 400 x 400 float64: 1,280,000 bytes, over the 1 MiB limit
    x = RNG.uniform(0.5, 1.5, n)
    want = hessian(s14.ring_energy, x)
    r = client.post("/v1/functions/ring_energy/hessian?sparsity=auto&sparse_format=dense", content=_npy(x), headers=NPY)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/x-npy"
    assert int(r.headers["content-length"]) == len(r.content)  # known from the shapes before any row
    H = np.load(io.BytesIO(r.content))
    assert H.dtype == np.float64
    np.testing.assert_allclose(H, want, rtol=1e-13, atol=1e-13)
    r = client.post("/v1/functions/ring_energy/hessian",
                    json={"inputs": [f64(x)], "sparsity": "auto", "sparse_format": "dense"})
    _refused(r, f"the result would take {n * n * 8} bytes; the limit is {LIMIT}. Ask for the sparse matrix itself "
                "(sparse_format=csr, csc or coo), its dense form as application/x-npy (streamed without this limit)")
    path = tmp_path / "H.npy"
    sdk.hessian("ring_energy", x, sparsity="auto", sparse_format="dense", out=path)
    np.testing.assert_allclose(np.load(path), want, rtol=1e-13, atol=1e-13)


def _streamed(url):
    """The server's count of ``.npy`` bytes streamed chunk by chunk (every process's)."""
    found = re.search(r"^jacobian_service_streamed_bytes_total (\S+)$", httpx.get(f"{url}/metrics").text, re.M)
    return float(found.group(1)) if found else 0.0


def test_a_sparse_hessians_dense_npy_streams_through_the_engine_process(remote_server):
    """The same over a real server, past its 8 MiB stream threshold (no result limit
    set): rosenbrock's Hessian at n = 1,500 (9 MB of float32) comes from the engine
    process in chunks (it was gathered whole, in the engine, across the IPC and in the
    front end), and through the SDK, each against torch in this process."""
    n = 1500
    x = RNG.uniform(0.5, 1.5, n).astype(np.float32)
    want = hessian(examples.rosenbrock, x)
    before = _streamed(remote_server)
    r = httpx.post(f"{remote_server}/v1/functions/rosenbrock/hessian?sparsity=auto&sparse_format=dense",
                   content=_npy(x), headers=NPY, timeout=60)
    assert r.status_code == 200, r.text
    assert int(r.headers["content-length"]) == len(r.content)
    np.testing.assert_allclose(np.load(io.BytesIO(r.content)), want, rtol=1e-5, atol=1e-3)
    assert _streamed(remote_server) - before == n * n * 4
    with Client(remote_server, max_retries=0) as c:
        H = c.hessian("rosenbrock", x, sparsity="auto", sparse_format="dense")
    np.testing.assert_allclose(H, want, rtol=1e-5, atol=1e-3)


# ------------------------------------------------------------------ the tracer's entry limit: the inputs are not the answer

#: Entries one traced tensor may hold in this app: its result limit's (1 MiB / 8), under
#: the memory budget's (256 MiB / 16).
ENTRIES = LIMIT // 8


def _auto(client, name, x, kind="jacobian"):
    return client.post(f"/v1/functions/{name}/{kind}?sparsity=auto", content=_npy(x),
                       headers={"content-type": "application/x-npy", "accept": "application/json"})


def test_an_input_larger_than_the_entry_limit_is_not_counted_against_it(client):
    """The tracer starts from one entry per differentiated input element, and counted
    those against the entry limit, which is derived from the result limit: the product
    of the first three of 131,073 inputs (a pattern of 3 entries) was a 413 'the
    sparsity pattern is too dense for the limits: a traced tensor would hold 131,073
    entries; the limit is 131,072', its Hessian (9 entries) too. Now the inputs are held
    to the memory budget's bound alone; every tensor the function computes is still
    counted, to the entry: sin of all but the first input passes at 131,073 inputs (an
    intermediate of 131,072 entries) and is refused at 131,074, naming 131,073."""
    n = ENTRIES + 1
    x = RNG.uniform(0.5, 1.5, n)
    r = _auto(client, "head_product", x)
    assert r.status_code == 200, r.text
    J = wire.decode_sparse_json(r.json()["jacobian"])
    assert (J.shape, J.nnz, r.json()["meta"]["exact"]) == ((1, n), 3, True)
    np.testing.assert_allclose(J.toarray(), jacrev(s14.head_product, x), rtol=1e-15, atol=0)
    r = _auto(client, "head_product", x, kind="hessian")
    assert r.status_code == 200, r.text
    H = wire.decode_sparse_json(r.json()["hessian"]).tocoo()
    assert H.shape == (n, n) and set(H.row) | set(H.col) <= {0, 1, 2}
    head = torch.from_numpy(x[:3])  # the rest held fixed: torch's Hessian of the block where the entries are
    want = torch.func.hessian(lambda h: s14.head_product(torch.cat([h, torch.from_numpy(x[3:])])))(head).numpy()
    np.testing.assert_allclose(H.tocsr()[:3, :3].toarray(), want, rtol=1e-15, atol=0)
    r = _auto(client, "tail_sines", x)
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(wire.decode_sparse_json(r.json()["jacobian"]).toarray(), jacrev(s14.tail_sines, x),
                               rtol=1e-15, atol=0)
    r = _auto(client, "tail_sines", RNG.uniform(0.5, 1.5, n + 1))
    _refused(r, f"the sparsity pattern is too dense for the limits: a traced tensor would hold {n:,} entries; the limit "
                f"is {ENTRIES:,}. Ask for sparsity=dense")


def test_the_inputs_entries_have_their_own_bound():
    """The inputs' own entries are bounded apart (the service gives the memory budget's
    share, budget / 16): at the bound the trace runs, one element past it is refused
    before the tracer builds anything, in words that name the inputs."""
    from jacobian_service.sparsity import PatternTooLarge, entry_limit
    from jacobian_service.sparsity.detect import trace_hessian, trace_jacobian

    with entry_limit(10, None, 20):
        assert trace_jacobian(s14.head_product, [torch.rand(20, dtype=torch.float64)]).nnz == 3
        assert trace_hessian(s14.head_product, [torch.rand(20, dtype=torch.float64)]).nnz == 9
        for trace in (trace_jacobian, trace_hessian):
            with pytest.raises(PatternTooLarge, match="^tracing 21 input elements would hold as many entries; the limit is 20$"):
                trace(s14.head_product, [torch.rand(21, dtype=torch.float64)])


# ------------------------------------------------------------------ a sparse derivative of several inputs is one array


def _npz(**arrays):
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def test_a_sparse_derivative_of_several_inputs_is_one_npy_array(client, sdk, tmp_path):
    """A sparse derivative is one 2-D matrix whatever ``argnums`` is (the inputs'
    columns concatenated), as its JSON and ``.npz`` answers hold it. As a dense ``.npy``
    it was a 406 'this result is not one bare array (it has several arrays, aux or
    output)' for ``argnums=0,1`` and for a tuple of one, so a large one could not
    stream: the SDK's ``out=`` failed with that 406, and without ``out=`` it asked for
    ``.npz``, a 413 past the result limit. Now each streams as ``.npy``, the SDK's too,
    and equals jacrev's blocks side by side (a Hessian's for ``argnums=0,``)."""
    m = 20  # a 400 x 800 float64 Jacobian: 2,560,000 bytes, over the 1 MiB limit
    u, k = RNG.uniform(0.5, 1.5, (m, m)), RNG.uniform(0.5, 1.5, (m, m))
    blocks = torch.func.jacrev(s14.heat_source, argnums=(0, 1))(torch.from_numpy(u), torch.from_numpy(k))
    want = np.hstack([b.reshape(m * m, m * m).numpy() for b in blocks])
    for argnums, expected in (("0,1", want), ("1,", want[:, m * m:])):
        r = client.post(f"/v1/functions/heat_source/jacobian?sparsity=auto&sparse_format=dense&argnums={argnums}",
                        content=_npz(u=u, k=k), headers={"content-type": "application/x-npz", "accept": "application/x-npy"})
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "application/x-npy" and int(r.headers["content-length"]) == len(r.content)
        np.testing.assert_allclose(np.load(io.BytesIO(r.content)), expected, rtol=1e-13, atol=1e-13)
    x = RNG.uniform(0.5, 1.5, 30)
    r = client.post("/v1/functions/ring_energy/hessian?sparsity=auto&sparse_format=dense&argnums=0,", content=_npy(x),
                    headers=NPY)
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(np.load(io.BytesIO(r.content)), hessian(s14.ring_energy, x), rtol=1e-13, atol=1e-13)
    J = sdk.jacobian("heat_source", u, k, argnums=(0, 1), sparsity="auto", sparse_format="dense")
    np.testing.assert_allclose(J, want, rtol=1e-13, atol=1e-13)
    path = tmp_path / "J.npy"
    sdk.jacobian("heat_source", u, k, argnums=(0, 1), sparsity="auto", sparse_format="dense", out=path)
    np.testing.assert_allclose(np.load(path), want, rtol=1e-13, atol=1e-13)


def test_a_dense_form_with_its_output_is_refused_in_words_that_hold(client):
    """With ``return_output`` a sparse derivative's dense form is not one array: ``.npy``
    is a 406, so it is gathered (``.npz``) and held to the result limit. Its 413 told
    the caller to ask for 'its dense form as application/x-npy (streamed without this
    limit)', the request just refused with a 406. Now it offers the sparse matrix, and
    says the dense form streams alone."""
    x = RNG.uniform(0.5, 1.5, 400)
    url = "/v1/functions/ring_energy/hessian?sparsity=auto&sparse_format=dense&return_output=true"
    r = client.post(url, content=_npy(x), headers=NPY)
    assert r.status_code == 406 and r.json()["code"] == "not_acceptable", r.text
    r = client.post(url, content=_npy(x), headers={**NPY, "accept": "application/x-npz"})
    _refused(r, f"the result would take {400 * 400 * 8} bytes; the limit is {LIMIT}. Ask for the sparse matrix itself "
                "(sparse_format=csr, csc or coo), or a smaller input (its dense form streams as application/x-npy only "
                "alone: without return_output, of a function without aux).")


# ------------------------------------------------------------------ star colouring of a Hessian with a dense row


def test_an_arrowhead_hessian_is_star_coloured_in_linear_time(client):
    """CUTEst's ARWHEAD, a standard sparse-Hessian test (asdex and SparseMatrixColorings
    colour it with 2 colours in milliseconds): its last variable meets every other. The
    greedy star colouring walked, for each vertex, its neighbours' neighbours: through
    that variable, every vertex, n^2 pure-Python steps (12.8 s at n = 5,000; at n =
    20,000 the request ran to its deadline, a 504, holding the engine all along).
    Now the colours around each vertex are kept as it goes: 2 products, well inside a
    10 s deadline, and the Hessian is torch's (its products with random vectors at n =
    20,000, every entry at n = 40)."""
    for n in (40, 20_000):
        x = RNG.uniform(0.5, 1.5, n)
        r = client.post("/v1/functions/arwhead/hessian?sparsity=auto", content=_npy(x),
                        headers={"content-type": "application/x-npy", "accept": "application/json",
                                 "x-request-timeout": "10"})
        assert r.status_code == 200, r.text
        meta = r.json()["meta"]
        assert (meta["mode"], meta["products"], meta["nnz"]) == ("star", 2, 3 * n - 2), meta
        H = wire.decode_sparse_json(r.json()["hessian"])
        if n == 40:
            np.testing.assert_allclose(H.toarray(), hessian(s14.arwhead, x), rtol=1e-13, atol=1e-13)
            continue
        tx = torch.from_numpy(x)
        for v in torch.from_numpy(RNG.standard_normal((2, n))):
            want = torch.func.jvp(torch.func.grad(s14.arwhead), (tx,), (v,))[1].numpy()
            np.testing.assert_allclose(H @ v.numpy(), want, rtol=1e-12, atol=1e-9)


def test_the_greedy_star_colouring_reads_kept_colours_as_walking_did():
    """The colours each vertex forbids, kept as vertices are coloured, are those the walk
    over neighbours' neighbours found: the same colouring, vertex for vertex, on random
    graphs with hubs (vertices next to every other), in three orders."""
    from jacobian_service.sparsity import coloring
    from jacobian_service.sparsity.patterns import Pattern

    from .test_sparsity_patterns import _greedy_star_by_walking

    rng = np.random.default_rng(14)
    for _ in range(30):
        n, k = int(rng.integers(2, 40)), int(rng.integers(1, 6))
        r, c = rng.integers(0, n, n * k // 2 + 1), rng.integers(0, n, n * k // 2 + 1)
        hubs = rng.integers(0, n, int(rng.integers(0, 3)))
        hr, hc = np.repeat(hubs, n), np.tile(np.arange(n), hubs.size)
        p = Pattern((n, n), np.r_[r, c, hr, hc, np.arange(n)], np.r_[c, r, hc, hr, np.arange(n)])
        indptr, nbr = coloring._adjacency(p)
        active = np.bincount(p.rows, minlength=n) > 0
        for seq in (np.argsort(-np.diff(indptr), kind="stable"), np.arange(n), rng.permutation(n)):
            want = _greedy_star_by_walking(indptr, nbr, seq.tolist(), active)
            assert np.array_equal(coloring._greedy_star(p, indptr, nbr, seq), want)


# ------------------------------------------------------------------ a declared Hessian pattern given as one triangle


def test_a_declared_hessian_pattern_of_one_triangle_is_mirrored(client, sdk):
    """A Hessian's structure is often given as one triangle (Ipopt's and CUTEst's
    convention). Declared so (``banded(1, 0, hessian=True)``, or a callable returning
    the lower triangle), it was a 422 'sparsity 'lower': star colouring needs a square
    symmetric pattern', on the POST and on GET .../sparsity. A Hessian is symmetric, so
    the triangle says where the rest is: it is mirrored (a note says so) and the
    Hessian is torch's, in every format; the products still check it."""
    n = 30
    x = RNG.uniform(0.5, 1.5, n)
    want = hessian(s14.chain_lower, x)
    for name in ("lower", "lower_coo"):
        for fmt in ("csr", "csc", "coo"):
            r = client.post("/v1/functions/chain_lower/hessian",
                            json={"inputs": [f64(x)], "sparsity": name, "sparse_format": fmt})
            assert r.status_code == 200, r.text
            doc = r.json()
            assert (doc["meta"]["source"], doc["meta"]["nnz"], doc["hessian"]["format"]) == ("declared", 3 * n - 2, fmt)
            assert doc["meta"]["notes"] == ["the declared Hessian pattern is not symmetric: mirrored (a Hessian is)"]
            np.testing.assert_allclose(wire.decode_sparse_json(doc["hessian"]).toarray(), want, rtol=1e-13, atol=1e-13)
        r = client.get("/v1/functions/chain_lower/sparsity", params={"shapes": str(n), "kind": "hessian", "sparsity": name})
        assert r.status_code == 200, r.text
        assert r.json()["pattern"]["nnz"] == 3 * n - 2
    np.testing.assert_allclose(sdk.hessian("chain_lower", x, sparsity="lower").toarray(), want, rtol=1e-13, atol=1e-13)
