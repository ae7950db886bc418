"""Sparsity detection under hostile clients, round 1: detection costs only its own request.

The engine runs one job at a time, and pattern detection is one job: a bare
``GET /v1/functions/lorenz96/sparsity?shapes=1000000`` held it for its whole 60 s
deadline (504), another client's 2-element Jacobian waiting 58 s behind it. Detection's
work is now bounded: the entries it handles, summed over the function's ops, at most 8 x
the input limit (the memory budget / 16, capped at 2**24): past it, a 413
``result_too_large`` problem+json, whichever way detection started (GET /sparsity,
``sparsity=auto`` on a Jacobian or a Hessian, JSON or .npy), nothing cached. With a
64 MiB budget (a work limit of 32 M entries) a detection is refused in seconds.

One real server (an engine process) serves every case.
"""

from __future__ import annotations

import threading
import time

import httpx
import numpy as np
import pytest
import torch

from tests import detect1_functions as d1

from .conftest import decode, live_server

FUNCTIONS = "jacobian_service.examples,tests.detect1_functions"
BUDGET = 64 << 20  # the work limit: (BUDGET // 16) * 8 = 32 M entries


@pytest.fixture(scope="module")
def url():
    with live_server(FUNCTIONS=FUNCTIONS, WORKERS=1, WARMUP="false", MEMORY_BUDGET_BYTES=BUDGET) as (u, _):
        yield u


def _problem(r, status, code):
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json"), r.headers
    body = r.json()
    assert body["status"] == status and body["code"] == code, body
    assert "Traceback" not in r.text
    return body


def _tiny_ok(r, x):
    got, _ = decode(r)
    want = torch.func.jacrev(d1.tiny1)(torch.tensor(x, dtype=torch.float64)).numpy()
    np.testing.assert_allclose(np.asarray(got, dtype=np.float64), want, rtol=1e-12)


def _pattern(body):
    m = body["matrix"]
    dense = np.zeros(m["shape"], dtype=bool)
    for row in range(m["shape"][0]):
        dense[row, m["indices"][m["indptr"][row]:m["indptr"][row + 1]]] = True
    return dense


def test_a_huge_detection_costs_only_its_own_request(url):
    """400,000 elements through 1,200 traced ops (480 M entries, ~40 s of the engine
    before): refused at the work limit, while another client's Jacobians go on."""
    done = threading.Event()
    answer = {}

    def detect():
        t0 = time.monotonic()
        with httpx.Client(timeout=120) as c:
            answer["r"] = c.get(f"{url}/v1/functions/long_loop1/sparsity", params={"shapes": 400_000})
        answer["s"] = time.monotonic() - t0
        done.set()

    latencies = []
    with httpx.Client(timeout=120) as victim:
        _tiny_ok(victim.post(f"{url}/v1/functions/tiny1/jacobian", json={"inputs": [[1.0, 2.0]]}), [1.0, 2.0])
        t = threading.Thread(target=detect)
        t.start()
        time.sleep(0.5)  # (the detection is in the engine first)
        during = 0
        i = 0
        while not done.is_set() or i < 3:
            x = [0.1 * i, 2.0 - i]
            t0 = time.monotonic()
            r = victim.post(f"{url}/v1/functions/tiny1/jacobian", json={"inputs": [x]})
            latencies.append(time.monotonic() - t0)
            _tiny_ok(r, x)
            during += not done.is_set()
            i += 1
        t.join()
    body = _problem(answer["r"], 413, "result_too_large")
    assert "detecting the sparsity pattern costs too much" in body["detail"], body
    assert answer["s"] < 30, answer  # was the 60 s deadline's 504
    assert max(latencies) < 30, latencies  # was 58 s behind it
    assert i >= 3, i


@pytest.mark.parametrize("how", ["jacobian-json", "jacobian-npy", "hessian-json"])
def test_every_way_detection_starts_is_bounded(url, how):
    kind, accept = how.split("-")
    fn = "long_loop1" if kind == "jacobian" else "long_energy1"
    x = np.linspace(-1, 1, 60_000).tolist()  # 1,200 ops x 60,000 entries: over 32 M
    headers = {"Accept": "application/x-npy"} if accept == "npy" else {}
    t0 = time.monotonic()
    r = httpx.post(f"{url}/v1/functions/{fn}/{kind}", json={"inputs": [x], "sparsity": "auto", "sparse_format": "dense"
                                                              if accept == "npy" else "csr"},
                   headers=headers, timeout=120)
    assert time.monotonic() - t0 < 30
    body = _problem(r, 413, "result_too_large")
    assert "costs too much" in body["detail"], body
    # the engine is fine afterwards, and nothing was cached: a small one is answered
    _tiny_ok(httpx.post(f"{url}/v1/functions/tiny1/jacobian", json={"inputs": [[3.0, 4.0]]}), [3.0, 4.0])


# (the loop at 500: 600 K entries of detection work, well under the 32 M limit as 2000 was;
# the reference, jacrev through 1,200 ops, cost ~21 CPU-s at 2000 and ~1 s at 500)
@pytest.mark.parametrize("fn,n", [("lorenz96", 3000), ("long_loop1", 500)])
def test_a_detection_under_the_limit_equals_jacrev(url, fn, n):
    from jacobian_service import examples

    f = getattr(examples, fn, None) or getattr(d1, fn)
    r = httpx.get(f"{url}/v1/functions/{fn}/sparsity", params={"shapes": n}, timeout=120)
    assert r.status_code == 200, r.text
    got = _pattern(r.json())
    x = torch.randn(n, dtype=torch.float64)
    want = torch.func.jacrev(f)(x).numpy() != 0
    assert (got == want).all(), (got.sum(), want.sum())
