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

from jacobian_client import Client
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
