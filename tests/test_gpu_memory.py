"""On a GPU, device memory that functions keep between requests (a leak on the device):
the engine is recycled before, or as soon as, it costs other requests their memory.

Each test runs its own server, with no other server of the suite running (pytest runs
the modules in name order): they need the GPU's memory to themselves. Marked ``gpu``:
skipped where CUDA is not available.
"""

from __future__ import annotations

import time

import httpx
import numpy as np
import pytest
import torch

from jacobian_client import wire

from ._fault_support import _log_saying
from .conftest import assert_problem, live_server
from .test_engine_faults import back_within, restarts, wait_spare
from .test_gpu_processes import SETTINGS, _mlp_reference, _npy

pytestmark = pytest.mark.gpu


def test_an_engine_whose_functions_keep_device_memory_is_recycled_without_losing_a_request():
    """A function that keeps 8 GiB more on the GPU at each call: past ENGINE_MAX_DEVICE_BYTES
    held between requests, the engine is recycled as planned (its spare takes over with
    all of the GPU's memory), every request is answered 200, and the log names the
    function. Without it every later request on that GPU ran out of memory (507)."""
    with live_server(**{**SETTINGS, "ENGINE_MAX_DEVICE_BYTES": 20 << 30}) as (url, proc):
        wait_spare(url, 180.0)
        for _ in range(4):
            r = httpx.post(f"{url}/v1/functions/keeps_on_the_device/jacobian", json={"inputs": [[666.0, 1.0]]}, timeout=60)
            assert r.status_code == 200, r.text
        deadline = time.monotonic() + 30
        while restarts(url) < 1:
            assert time.monotonic() < deadline, "the engine holding 24 GiB and more was not recycled"
            time.sleep(0.1)
        back_within(url, 10.0)
        r = httpx.post(f"{url}/v1/functions/sin/jacobian", json={"inputs": [[0.5, 1.0]]}, timeout=60)
        assert r.status_code == 200, r.text
        log = _log_saying(proc, "over ENGINE_MAX_DEVICE_BYTES (20480 MiB); grown most by keeps_on_the_device")
        assert "held" in log and "over ENGINE_MAX_DEVICE_BYTES (20480 MiB); grown most by keeps_on_the_device" in log


def test_by_default_device_memory_held_past_90_percent_recycles_once_a_request_runs_out():
    """ENGINE_MAX_DEVICE_BYTES unset: 90 % of the GPU, acted on only once a request has
    run out of memory (what is held could be a model loaded on a first call). 8 GiB kept
    at each call passes 90 % of an H200 after 16 calls; the next request that needs
    memory gets 507, and the engine is recycled: later requests have the whole GPU."""
    total = torch.cuda.get_device_properties(0).total_memory
    calls = int(0.9 * total) // (8 << 30) + 1
    with live_server(**SETTINGS) as (url, proc):
        wait_spare(url, 180.0)
        for _ in range(calls):
            r = httpx.post(f"{url}/v1/functions/keeps_on_the_device/jacobian", json={"inputs": [[666.0, 1.0]]}, timeout=60)
            assert r.status_code == 200, r.text
        time.sleep(2.0)
        assert restarts(url) == 0  # over 90 %, but nothing has run out yet: kept
        r = httpx.post(f"{url}/v1/functions/hogs_the_device/jacobian", json={"inputs": [[666.0, 1.0]]}, timeout=120)
        assert_problem(r, 507, "out_of_memory")
        deadline = time.monotonic() + 30
        while restarts(url) < 1:
            assert time.monotonic() < deadline, "the engine holding over 90 % of the GPU was not recycled"
            time.sleep(0.1)
        back_within(url, 10.0)
        x = np.random.default_rng(5).standard_normal(128).astype(np.float32)
        r = _npy(url, "mlp", x)
        np.testing.assert_allclose(wire.read_npy(r.content), _mlp_reference(x), rtol=1e-4, atol=1e-5)
        assert "grown most by keeps_on_the_device" in _log_saying(proc, "grown most by keeps_on_the_device")
