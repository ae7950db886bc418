"""On a GPU: the same answers as in-process torch.func on the CPU, one worker per GPU.

Marked ``gpu``: skipped where CUDA is not available (CI has none).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from starlette.testclient import TestClient

from jacobian_client import wire
from jacobian_service import create_app
from jacobian_service.settings import Settings

from .conftest import assert_problem, decode, npy_bytes
from .test_api_jacobian import BUILTINS, example_inputs, post, reference

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def gpu_client():
    settings = Settings(device="cuda", warmup=False, functions="jacobian_service.examples,tests.user_functions", stream_threshold_bytes=1 << 20)
    with TestClient(create_app(settings)) as c:
        yield c


def test_one_worker_per_visible_gpu(gpu_client):
    info = gpu_client.get("/v1/info").json()
    assert info["devices"] == [f"cuda:{i}" for i in range(torch.cuda.device_count())]


@pytest.mark.parametrize("name", BUILTINS)
@pytest.mark.parametrize("transport", ["json", "npz"])
def test_builtins_on_gpu_equal_cpu_reference(gpu_client, builtins, name, transport):
    inputs = example_inputs(name)
    got, doc = decode(post(gpu_client, name, inputs, transport))
    want = reference(builtins, name, inputs)
    if builtins.get(name).has_aux:
        want = want[0]
    tol = dict(rtol=1e-4, atol=1e-5) if name == "mlp" else dict(rtol=1e-6, atol=1e-8)
    if isinstance(want, tuple):
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w.numpy(), **tol)
    else:
        np.testing.assert_allclose(got, want.numpy(), **tol)
    if transport == "json":
        assert doc["meta"]["device"].startswith("cuda")


def test_batched_and_hessian_on_gpu(gpu_client, builtins):
    xs = example_inputs("mlp", batch=16)
    got, _ = decode(post(gpu_client, "mlp", xs, "npz", batched=True))
    np.testing.assert_allclose(got, reference(builtins, "mlp", xs, batched=True).numpy(), rtol=1e-4, atol=1e-5)
    x = example_inputs("sum_sin")[0]
    got, _ = decode(post(gpu_client, "sum_sin", [x], "json", endpoint="hessian"), "hessian")
    np.testing.assert_allclose(got, np.diag(-np.sin(x)), rtol=1e-10)


def test_large_jacobian_streams_from_gpu(gpu_client):
    n = 4096
    x = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    r = gpu_client.post("/v1/functions/softmax/jacobian", content=npy_bytes(x), headers={"content-type": wire.NPY, "accept": wire.NPY})
    got = wire.read_npy(r.content)
    s = torch.softmax(torch.from_numpy(x).double(), -1).numpy()
    np.testing.assert_allclose(got, np.diag(s) - np.outer(s, s), atol=1e-6)


def test_out_of_memory_on_gpu_halves_then_507(gpu_client):
    got, doc = decode(gpu_client.post("/v1/functions/memory_hungry/jacobian", json={"inputs": [[1.0] * 32]}))
    np.testing.assert_allclose(got, 2 * np.eye(32))
    assert doc["meta"]["chunk_size"] == 4
    assert_problem(gpu_client.post("/v1/functions/memory_hungry/jacobian", json={"inputs": [[-1.0] * 8]}), 507, "out_of_memory")
