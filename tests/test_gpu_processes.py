"""On a GPU, the process layout: ``jacobian-service serve`` with one engine process per
visible GPU, checked end to end over HTTP against in-process torch.func on the CPU.

The in-process layout's GPU checks are tests/test_gpu.py. Marked ``gpu``: skipped where
CUDA is not available (CI has none). Run on a GPU host with ``pytest -m gpu``.
"""

from __future__ import annotations

import time

import httpx
import numpy as np
import pytest
import torch

from jacobian_client import wire

from .conftest import assert_problem, live_server, npy_bytes
from .test_engine_faults import back_within, restarts, wait_spare

pytestmark = pytest.mark.gpu

SETTINGS = dict(DEVICE="cuda", WORKERS=2, REQUEST_TIMEOUT_S=60, HANG_GRACE_S=1, QUARANTINE_AFTER=3,
                FUNCTIONS="jacobian_service.examples,tests.fault_functions,tests.gpu_functions")


@pytest.fixture(scope="module")
def server():
    with live_server(**SETTINGS) as (url, proc):
        yield url, proc


def _npy(url: str, name: str, x: np.ndarray, timeout: float = 120, **params: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/functions/{name}/jacobian", content=npy_bytes(x), params=params, timeout=timeout,
                      headers={"content-type": wire.NPY, "accept": wire.NPY})


def _mlp_reference(x: np.ndarray, batched: bool = False) -> np.ndarray:
    from jacobian_service.examples import mlp

    jac = torch.func.jacrev(mlp)
    return (torch.func.vmap(jac) if batched else jac)(torch.from_numpy(x)).numpy()


def test_one_engine_process_per_gpu_and_answers_equal_cpu(server):
    url, _ = server
    info = httpx.get(f"{url}/v1/info").json()
    assert info["engines"] == "processes"
    assert info["devices"] == [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    x = np.random.default_rng(0).standard_normal(128).astype(np.float32)
    r = httpx.post(f"{url}/v1/functions/mlp/jacobian", json={"inputs": [x.tolist()]})
    assert r.status_code == 200, r.text
    assert r.json()["meta"]["device"] == "cuda:0"
    np.testing.assert_allclose(r.json()["jacobian"]["data"], _mlp_reference(x), rtol=1e-4, atol=1e-5)
    r = _npy(url, "mlp", x)
    np.testing.assert_allclose(wire.read_npy(r.content), _mlp_reference(x), rtol=1e-4, atol=1e-5)
    xs = np.random.default_rng(1).standard_normal((32, 128)).astype(np.float32)
    r = _npy(url, "mlp", xs, batched="true")
    np.testing.assert_allclose(wire.read_npy(r.content), _mlp_reference(xs, batched=True), rtol=1e-4, atol=1e-5)


def test_a_large_jacobian_streams_from_the_gpu_engine(server):
    url, _ = server
    n = 6000  # 144 MB of float32: past the stream threshold, read back in chunks
    x = np.random.default_rng(2).standard_normal(n).astype(np.float32)
    r = _npy(url, "softmax", x)
    assert r.status_code == 200, r.text
    got = wire.read_npy(r.content)
    s = torch.softmax(torch.from_numpy(x).double(), -1).numpy()
    np.testing.assert_allclose(got[::97], (np.diag(s) - np.outer(s, s))[::97], atol=1e-6)


def test_rows_that_do_not_fit_on_the_gpu_are_chunked(server):
    """All 4096 rows at once would need 256 GiB of temporaries: the engine cuts them."""
    url, _ = server
    n = 4096
    x = np.random.default_rng(3).uniform(-1, 1, n)
    r = _npy(url, "big_outer_rows", x, timeout=300)
    assert r.status_code == 200, r.text[:2000]
    assert r.headers["x-device"] == "cuda:0"
    got = wire.read_npy(r.content)
    c = np.cos(np.outer(x, x))
    want = c * x[:, None] + np.diag(c @ x)  # d/dx_k sum_j sin(x_i x_j)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)


def test_a_cuda_out_of_memory_in_a_function_is_507_and_the_engine_stays(server):
    url, _ = server
    before = restarts(url)
    r = httpx.post(f"{url}/v1/functions/hogs_the_device/jacobian", json={"inputs": [[666.0, 1.0]]}, timeout=120)
    assert_problem(r, 507, "out_of_memory")
    r = httpx.post(f"{url}/v1/functions/hogs_the_device/jacobian", json={"inputs": [[0.5, 1.0]]})
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(r.json()["jacobian"]["data"], np.diag(np.cos([0.5, 1.0])), rtol=1e-6)
    assert restarts(url) == before  # the memory came back: no restart was needed


@pytest.mark.parametrize("name", ["segfaults", "exits"])
def test_a_crash_on_the_gpu_costs_only_its_request(server, name):
    """With the spare warm (the steady state), so that the restart measured is a
    promotion; the spare's own start-up on CUDA (torch, the context, every function's
    first jacrev) is printed too. The first GPU run, without this wait, measured 5.7 s
    and 9.1 s: the spare had not finished warming up."""
    url, proc = server
    t0 = time.monotonic()
    wait_spare(url, 180.0)
    print(f"{name}: spare warm after {time.monotonic() - t0:.2f} s more")
    before = restarts(url)
    r = httpx.post(f"{url}/v1/functions/{name}/jacobian", json={"inputs": [[666.0, 1.0]]}, timeout=60)
    assert_problem(r, 500, "function_error")
    t0 = time.monotonic()
    back = back_within(url, 5.0)  # issue 9's goal (set for the CPU): a promotion is well within it
    x = np.random.default_rng(4).standard_normal(128).astype(np.float32)
    r = _npy(url, "mlp", x)
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(wire.read_npy(r.content), _mlp_reference(x), rtol=1e-4, atol=1e-5)
    print(f"{name}: ready again after {back:.2f} s, first answer after {time.monotonic() - t0:.2f} s (cuda)")
    assert restarts(url) == before + 1
    assert proc.poll() is None


def test_a_hang_on_the_gpu_is_cut_and_the_engine_restarts(server):
    url, _ = server
    before = restarts(url)
    r = httpx.post(f"{url}/v1/functions/spins/jacobian", json={"inputs": [[666.0, 1.0]]},
                   headers={"X-Request-Timeout": "2"}, timeout=30)
    assert_problem(r, 504, "timeout")
    deadline = time.monotonic() + 30
    while restarts(url) < before + 1:
        assert time.monotonic() < deadline, "the hung engine was not restarted"
        time.sleep(0.1)
    back_within(url, 30.0)
    r = httpx.post(f"{url}/v1/functions/sin/jacobian", json={"inputs": [[0.5, 1.0]]}, timeout=60)
    assert r.status_code == 200, r.text

