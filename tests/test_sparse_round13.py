"""Sparse Jacobians and Hessians, round 13: ``sparse_format=csc``, the compressed
columns scipy's sparse LU (``splu``) and Julia's ``SparseMatrixCSC`` hold, on every
endpoint and format (JSON, ``.npz`` read by ``scipy.sparse.load_npz``, the SDK, ``GET
.../sparsity``, through the engine process's IPC), its result limit, and each answer
against torch.func in this process.

One in-process app serves most cases (no new server process), under a 1 MiB result
limit; the engine process's IPC is crossed on the session's shared ``remote_server``.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import scipy.sparse as sp
import scipy.sparse.linalg as spla
import torch

from jacobian_client import Client, wire
from jacobian_service import examples
from tests import sparse13_functions as s13

from .conftest import ready_app_with
from .test_sparse_round9 import f64
from .test_sparse_round10 import sdk  # noqa: F401 (round 10's fixture: the SDK through this module's in-process app)
from .test_sparse_round11 import _npy, _refused  # an array as an .npy body; a 413 problem's detail

RNG = np.random.default_rng(13)

#: The app's result limit.
LIMIT = 1 << 20


@pytest.fixture(scope="module")
def client():
    with ready_app_with("tests.sparse13_functions", max_result_bytes=LIMIT) as c:
        yield c


def jacrev(f, *args, argnums=0):
    ts = [torch.from_numpy(a) for a in args]
    J = torch.func.jacrev(f, argnums=argnums)(*ts)
    return J.reshape(-1, ts[argnums].numel()).numpy()


def assert_csc(J, want):
    """``J`` a scipy CSC array, canonical (sorted rows, no duplicates), equal to ``want``."""
    assert isinstance(J, sp.csc_array) and J.format == "csc", type(J)
    assert J.has_canonical_format
    np.testing.assert_allclose(J.toarray(), want, rtol=1e-13, atol=1e-13)


# ------------------------------------------------------------------ csc everywhere


def test_csc_on_every_endpoint_and_format(client, sdk):
    """``sparse_format=csc`` was a 422 ('Input should be 'csr', 'coo' or 'dense''), and
    ``GET .../sparsity?format=csc`` one too ('format is csr or coo'), though a scientist
    solving the implicit step's Newton system with ``scipy.sparse.linalg.splu`` needs
    CSC: handed a CSR, splu converts it with a SparseEfficiencyWarning (an error under
    this suite's filterwarnings). Now the Jacobian (and the Hessian) come back as CSC
    in JSON, as ``.npz`` (``load_npz`` reads a csc_array), through the SDK, for
    ``rows`` too, and GET draws the pattern as CSC; every one is torch's matrix."""
    n = 40
    u, u0 = RNG.uniform(0.2, 0.8, n), RNG.uniform(0.2, 0.8, n)
    want = jacrev(s13.implicit_step, u, u0)
    body = {"inputs": [f64(u), f64(u0)], "sparsity": "auto", "sparse_format": "csc"}
    r = client.post("/v1/functions/implicit_step/jacobian", json=body)
    assert r.status_code == 200, r.text
    doc = r.json()
    assert (doc["jacobian"]["format"], doc["meta"]["format"], doc["meta"]["products"]) == ("csc", "csc", 3), doc["meta"]
    assert len(doc["jacobian"]["indptr"]) == n + 1  # one pointer a column
    assert_csc(wire.decode_sparse_json(doc["jacobian"]), want)
    # .npz: exactly what scipy.sparse.save_npz writes, read with no SDK
    npz = io.BytesIO()
    np.savez(npz, u=u, u0=u0)
    r = client.post("/v1/functions/implicit_step/jacobian?sparsity=auto&sparse_format=csc", content=npz.getvalue(),
                    headers={"content-type": "application/x-npz", "accept": "application/x-npz"})
    assert r.status_code == 200, r.text
    assert_csc(sp.load_npz(io.BytesIO(r.content)), want)
    # rows: a (6, n) slice of the matrix, still by columns
    r = client.post("/v1/functions/implicit_step/jacobian", json={**body, "rows": [5, 11]})
    assert r.status_code == 200, r.text
    assert_csc(wire.decode_sparse_json(r.json()["jacobian"]), want[5:11])
    # the Hessian of an energy
    x = RNG.uniform(0.5, 1.5, n)
    r = client.post("/v1/functions/chain_energy/hessian", json={"inputs": [f64(x)], "sparsity": "auto", "sparse_format": "csc"})
    assert r.status_code == 200, r.text
    H = torch.func.hessian(s13.chain_energy)(torch.from_numpy(x)).numpy()
    assert_csc(wire.decode_sparse_json(r.json()["hessian"]), H)
    # GET .../sparsity: the pattern's ones, by columns
    for name, kind, shapes, dense in (("implicit_step", "jacobian", f"{n};{n}", want), ("chain_energy", "hessian", str(n), H)):
        r = client.get(f"/v1/functions/{name}/sparsity", params={"shapes": shapes, "kind": kind, "format": "csc"})
        assert r.status_code == 200, r.text
        P = wire.decode_sparse_json(r.json()["matrix"])
        assert isinstance(P, sp.csc_array) and P.dtype == np.int8
        assert np.array_equal(P.toarray() != 0, dense != 0)
    # the SDK: a csc_array that splu takes as it is, and the Newton step it gives
    J = sdk.jacobian("implicit_step", u, u0, sparsity="auto", sparse_format="csc")
    assert_csc(J, want)
    F = s13.implicit_step(torch.from_numpy(u), torch.from_numpy(u0)).numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # splu's SparseEfficiencyWarning on a CSR
        du = spla.splu(J).solve(-F)
    np.testing.assert_allclose(du, np.linalg.solve(want, -F), rtol=1e-12, atol=1e-14)
    assert isinstance(sdk.hessian("chain_energy", x, sparsity="auto", sparse_format="csc"), sp.csc_array)
    info = sdk.sparsity("chain_energy", (n,), kind="hessian", format="csc")
    assert isinstance(info["matrix"], sp.csc_array)


def test_csc_is_held_to_the_result_limit_by_its_own_size(client):
    """A CSC holds a pointer per column, a CSR one per row: the sum of the first 60,000
    of 120,000 inputs is 720,008 bytes as CSR and 960,000 as COO, under the 1 MiB
    limit, and 1,200,004 as CSC, past it. The CSC's 413 says its own size before any
    product, its JSON and .npz answers alike; CSR and COO are torch's row of ones."""
    n = 120_000
    x = RNG.uniform(0.5, 1.5, n)
    for accept in ("application/json", "application/x-npz"):
        r = client.post("/v1/functions/head_sum/jacobian?sparsity=auto&sparse_format=csc", content=_npy(x),
                        headers={"content-type": "application/x-npy", "accept": accept})
        _refused(r, f"the result would take {n // 2 * (8 + 4) + (n + 1) * 4} bytes; the limit is {LIMIT}. "
                    "Ask for a smaller input.")
    want = jacrev(s13.head_sum, x)
    for fmt in ("csr", "coo"):
        r = client.post(f"/v1/functions/head_sum/jacobian?sparsity=auto&sparse_format={fmt}", content=_npy(x),
                        headers={"content-type": "application/x-npy", "accept": "application/json"})
        assert r.status_code == 200, r.text
        J = wire.decode_sparse_json(r.json()["jacobian"])
        assert J.format == fmt and J.nnz == n // 2
        assert np.array_equal(J.toarray(), want)


def test_csc_through_the_engine_process(remote_server):
    """The same over a real server, whose engine process sends the matrix to its front
    end as raw index frames (IPC): lorenz96's periodic band and rosenbrock's Hessian as
    CSC, JSON and .npz, and through the SDK, against torch in this process."""
    n = 30
    x = RNG.uniform(0.5, 1.5, n)
    want = jacrev(examples.lorenz96, x)
    with Client(remote_server, max_retries=0) as c:
        for transport in ("json", "binary"):
            J = c.jacobian("lorenz96", x, sparsity="auto", sparse_format="csc", transport=transport)
            assert_csc(J, want)
        H = c.hessian("rosenbrock", x, sparsity="auto", sparse_format="csc")
        assert_csc(H, torch.func.hessian(examples.rosenbrock)(torch.from_numpy(x)).numpy())
        info = c.sparsity("lorenz96", (n,), format="csc")
        assert isinstance(info["matrix"], sp.csc_array) and np.array_equal(info["matrix"].toarray() != 0, want != 0)


def test_the_wire_reads_csc_with_or_without_scipy_and_refuses_a_hostile_one():
    """The SDK's reader: a CSC object or save_npz body back as a csc_array, or without
    scipy as SparseCOO entries; one whose pointers run over the rows (a CSR's) or whose
    row indices pass the shape is refused, as a hostile CSR is."""
    m = sp.random_array((7, 5), density=0.4, format="csc", rng=RNG)
    for back in (wire.decode_sparse_json(wire.loads(wire.dumps(wire.encode_sparse_json(m)))),
                 wire.read_sparse_npz(wire.write_sparse_npz(m))[0], sp.load_npz(io.BytesIO(wire.write_sparse_npz(m)))):
        assert isinstance(back, sp.csc_array) and np.array_equal(back.toarray(), m.toarray())
    plain = wire.decode_sparse_json(wire.encode_sparse_json(m), as_scipy=False)
    assert isinstance(plain, wire.SparseCOO) and np.array_equal(plain.toarray(), m.toarray())
    good = wire.encode_sparse_json(m)
    as_rows = {**wire.encode_sparse_json(m.tocsr()), "format": "csc"}  # 8 pointers for 5 columns
    with pytest.raises(wire.WireError, match=r"sparse csc: indptr must rise from 0 to nnz over shape\[1\] \+ 1 entries"):
        wire.decode_sparse_json(as_rows)
    with pytest.raises(wire.WireError, match="outside the shape"):
        wire.decode_sparse_json({**good, "indices": [7] * len(good["indices"])})  # row 7 of 7


# ------------------------------------------------------------------ an empty pattern is still jacrev's answer


def _dense_and_sparse(client, name, kind, x, **options):
    """The dense route's answer and the sparse one's (``sparsity=auto``), as responses."""
    body = {"inputs": [f64(x)], **options}
    return (client.post(f"/v1/functions/{name}/{kind}", json=body),
            client.post(f"/v1/functions/{name}/{kind}", json={**body, "sparsity": "auto"}))


def _torch_error(call):
    """What torch raises, as the service words a function's failure: 'Type: message'."""
    with pytest.raises(Exception) as caught, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unique's and index_reduce's own warnings
        call()
    return f"{type(caught.value).__name__}: {str(caught.value).splitlines()[0]}"


@pytest.mark.filterwarnings("ignore:index_reduce\\(\\) is in beta")  # (the engine runs in this process)
def test_an_empty_pattern_that_jacrev_cannot_differentiate_is_its_error(client):
    """A pattern with no entries needs no product, so the function never ran under
    autodiff and the answer was a 200 of zeros where jacrev raises: a product written
    through ``out=`` (which autograd refuses, and the trace never sees), ``unique`` of
    rounded values (no derivative), a Hessian through it (torch.func.hessian: no
    forward AD). Now one product with a zero seed runs, and the answer is torch's error
    (500 function_error), the dense route's, whatever the mode. Zero Jacobians and
    Hessians that torch answers stay 200 (and a Hessian through index_reduce, which has
    no forward AD, is still reverse over reverse's zeros)."""
    x = np.linspace(0.6, 1.6, 6)
    t = torch.from_numpy(x)
    cases = (("out_write", "jacobian", lambda: torch.func.jacrev(s13.out_write)(t)),
             ("rounded_unique", "jacobian", lambda: torch.func.jacrev(s13.rounded_unique)(t)),
             ("rounded_unique_energy", "hessian", lambda: torch.func.hessian(s13.rounded_unique_energy)(t)))
    for name, kind, torchs in cases:
        want = _torch_error(torchs)
        for mode in ("rev", "fwd") if kind == "jacobian" else (None,):
            dense, sparse = _dense_and_sparse(client, name, kind, x, **({"mode": mode} if mode else {}))
            for r in (dense, sparse):
                assert r.status_code == 500 and r.headers["content-type"].startswith("application/problem+json"), r.text
                doc = r.json()
                assert (doc["code"], doc["status"]) == ("function_error", 500) and doc["detail"].startswith(want), (name, mode, doc)
                assert "Traceback" not in r.text
    for name, kind, want in (("rounded", "jacobian", np.zeros((6, 6))), ("mean_pairs", "hessian", np.zeros((6, 6)))):
        dense, sparse = _dense_and_sparse(client, name, kind, x)
        assert dense.status_code == 200 and sparse.status_code == 200, (dense.text, sparse.text)
        assert np.array_equal(np.asarray(wire.decode_tree(dense.json())[kind]), want)
        S = wire.decode_sparse_json(sparse.json()[kind])
        assert (S.nnz, sparse.json()["meta"]["products"]) == (0, 0) and np.array_equal(S.toarray(), want)


# ------------------------------------------------------------------ a backward that switches grad off


def test_a_hessian_through_a_backward_under_no_grad_is_torchs_error_as_the_dense_one(client):
    """A custom Function whose backward is ``@once_differentiable`` runs it under
    no_grad: reverse over reverse then differentiates a gradient computed without a
    graph and finds 0 where the Hessian is not. The dense Hessian knows (it answers
    torch.func.hessian's error where that cannot run); the sparse one did not:

    - ``once_energy`` (no jvp): its forward-over-reverse products failed, and the
      reverse-over-reverse fallback answered 200 with a Hessian 13.4 off;
    - ``once_energy_probed`` (a jvp, no vmap rule, traced values read as a list, so
      probed): the probe's Hessian, reverse over reverse, was not even symmetric, a 422
      'sparsity 'auto': star colouring needs a square symmetric pattern' for a pattern
      the service found; symmetric, the products proved it wrong, and the dense
      fallback, reverse over reverse again, answered 200, 21.5 off.

    Now each is torch.func.hessian's error (500 function_error), the dense route's."""
    x = np.linspace(0.6, 1.6, 6)
    for name, fn in (("once_energy", s13.once_energy), ("once_energy_probed", s13.once_energy_probed)):
        want = _torch_error(lambda fn=fn: torch.func.hessian(fn)(torch.from_numpy(x)))
        for r in _dense_and_sparse(client, name, "hessian", x):
            assert r.status_code == 500 and r.headers["content-type"].startswith("application/problem+json"), (name, r.text)
            doc = r.json()
            assert (doc["code"], doc["status"]) == ("function_error", 500) and doc["detail"].startswith(want), (name, doc)


# ------------------------------------------------------------------ Hessians computed inside the function


def test_a_hessian_computed_inside_the_function_is_detected_without_a_crash(client):
    """A function that computes a Hessian-vector product (jvp of grad) or a Hessian
    inside itself: under the tracer, torch makes ZeroTensors for the tangents, which the
    tracer wrapped as constants, and torch (2.13) crashed the process at the next op on
    one (a segmentation fault: an engine process died at every such request, and with
    the in-process layout the server). Now ZeroTensors stay unwrapped: chain_hvp traces
    (an op on one taken as dense: exact false), cell_hessians' trace fails cleanly and
    its pattern is probed; each answer is jacrev's, its pattern holding every nonzero."""
    x = RNG.uniform(0.5, 1.5, 12)
    for name, source in (("chain_hvp", "detected"), ("cell_hessians", "probed")):
        r = client.post(f"/v1/functions/{name}/jacobian", json={"inputs": [f64(x)], "sparsity": "auto"})
        assert r.status_code == 200, r.text
        meta = r.json()["meta"]
        assert (meta["source"], meta["exact"]) == (source, False), meta
        J = wire.decode_sparse_json(r.json()["jacobian"])
        want = jacrev(getattr(s13, name), x)
        np.testing.assert_allclose(J.toarray(), want, rtol=1e-12, atol=1e-12)
        assert J.nnz >= np.count_nonzero(want)


def test_the_parts_of_a_conjugated_spectrum_are_traced(client):
    """``torch.fft.rfft(u).conj().imag``: torch reads the parts of the tracer's wrapper
    (which carries no conjugate bit) as ``view_as_real``, which the conjugated value
    refused, so tracing failed and the pattern was probed (dense Jacobians at three
    points; meta.source 'probed', exact false). Now it is traced: each row's outputs on
    that row alone (3 products for 3 rows of 8), jacrev's values."""
    u = RNG.uniform(0.5, 1.5, (3, 8))
    r = client.post("/v1/functions/row_spectra/jacobian", json={"inputs": [f64(u)], "sparsity": "auto"})
    assert r.status_code == 200, r.text
    meta = r.json()["meta"]
    assert (meta["source"], meta["exact"], meta["products"]) == ("detected", True, 8), meta
    J = wire.decode_sparse_json(r.json()["jacobian"])
    want = jacrev(s13.row_spectra, u)
    np.testing.assert_allclose(J.toarray(), want, rtol=1e-12, atol=1e-12)
    rows = np.repeat(np.arange(3), 10)  # 5 frequencies, real and imaginary parts, a row
    assert {(i, j) for i, j in zip(*J.nonzero())} <= {(k, j) for k in range(30) for j in range(rows[k] * 8, rows[k] * 8 + 8)}
