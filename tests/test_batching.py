"""Requests that arrive together are stacked into one vmap and split back exactly."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from jacobian_client import wire

from .conftest import assert_problem, decode, npy_bytes
from .user_functions import branchy, cholesky


def test_concurrent_requests_share_a_batch_and_get_their_own_answers(make_client, builtins):
    c = make_client(max_batch_wait_ms=300, max_batch_size=8)
    xs = np.random.default_rng(0).standard_normal((8, 128)).astype(np.float32)

    def one(x):
        return c.post("/v1/functions/mlp/jacobian", content=npy_bytes(x), headers={"content-type": wire.NPY, "accept": wire.NPZ})

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(one, xs))
    sizes = []
    for x, r in zip(xs, responses):
        got, doc = decode(r)
        sizes.append(doc["meta"]["batch_size"])
        want = torch.func.jacrev(builtins.get("mlp").fn)(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert max(sizes) > 1, sizes
    assert "jacobian_service_batch_size_bucket" in c.get("/metrics").text


def test_batching_off_runs_each_alone(make_client):
    c = make_client(max_batch_wait_ms=100, max_batch_size=1)
    with ThreadPoolExecutor(4) as pool:
        docs = list(pool.map(lambda x: c.post("/v1/functions/sin/jacobian", json={"inputs": [[x]]}).json(), [0.1, 0.2, 0.3, 0.4]))
    assert {d["meta"]["batch_size"] for d in docs} == {1}


def test_one_failure_does_not_fail_its_batch_mates(make_client):
    c = make_client(max_batch_wait_ms=300, max_batch_size=8)
    good = [np.eye(3) * (i + 1) + 0.1 for i in range(5)]
    bad = -np.eye(3)  # not positive definite: cholesky raises
    inputs = good[:2] + [bad] + good[2:]

    def one(a):
        return c.post("/v1/functions/cholesky/jacobian", content=wire.dumps({"inputs": [wire.encode_tree(a)]}))

    with ThreadPoolExecutor(len(inputs)) as pool:
        responses = list(pool.map(one, inputs))
    for a, r in zip(inputs, responses):
        if a is bad:
            assert_problem(r, 500, "function_error")
        else:
            got, _ = decode(r)
            np.testing.assert_allclose(got, torch.func.jacrev(cholesky)(torch.from_numpy(a)).numpy(), rtol=1e-10)


def test_mixed_options_are_not_stacked_together(make_client, builtins):
    c = make_client(max_batch_wait_ms=200, max_batch_size=16)
    x = np.random.default_rng(1).standard_normal(5)
    y = np.random.default_rng(2).standard_normal(5)
    bodies = [
        {"inputs": [wire.encode_tree(x), wire.encode_tree(y)], "argnums": 0},
        {"inputs": [wire.encode_tree(x), wire.encode_tree(y)], "argnums": 1},
        {"inputs": [wire.encode_tree(x), wire.encode_tree(y)], "argnums": [0, 1]},
        {"inputs": [wire.encode_tree(x[:3]), wire.encode_tree(y[:3])], "argnums": 1},
    ] * 3
    with ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(lambda b: c.post("/v1/functions/add_square/jacobian", content=wire.dumps(b)), bodies))
    fn = builtins.get("add_square").fn
    for body, r in zip(bodies, responses):
        args = [torch.from_numpy(wire.decode_tree(a)) for a in wire.loads(wire.dumps(body))["inputs"]]
        argnums = tuple(body["argnums"]) if isinstance(body["argnums"], list) else body["argnums"]
        got, _ = decode(r)
        want = torch.func.jacrev(fn, argnums=argnums)(*args)
        if isinstance(want, tuple):
            for g, w in zip(got, want):
                np.testing.assert_allclose(g, w.numpy())
        else:
            np.testing.assert_allclose(got, want.numpy())


def test_scalar_outputs_stay_arrays_when_split_from_a_batch(make_client):
    c = make_client(max_batch_wait_ms=300, max_batch_size=8)
    with ThreadPoolExecutor(4) as pool:
        docs = list(pool.map(lambda v: c.post("/v1/functions/sum_sin/evaluate", json={"inputs": [[v, 1.0]]}).json(), [0.1, 0.2, 0.3, 0.4]))
    assert max(d["meta"]["batch_size"] for d in docs) > 1
    for v, d in zip([0.1, 0.2, 0.3, 0.4], docs):
        assert d["output"]["shape"] == [] and d["output"]["dtype"] == "float32"
        np.testing.assert_allclose(d["output"]["data"], np.sin(v) + np.sin(1.0), rtol=1e-6)


def _round(c, url, bodies):
    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(lambda b: c.post(url, content=wire.dumps(b)), bodies))


def test_a_data_error_does_not_turn_batching_off(make_client):
    c = make_client(max_batch_wait_ms=300, max_batch_size=8)
    url = "/v1/functions/cholesky/jacobian"
    first = _round(c, url, [{"inputs": [wire.encode_tree(np.eye(2) * (i + 1))]} for i in range(3)] + [{"inputs": [wire.encode_tree(-np.eye(2))]}])
    assert sorted(r.status_code for r in first) == [200, 200, 200, 500]
    again = _round(c, url, [{"inputs": [wire.encode_tree(np.eye(2) * (i + 1))]} for i in range(4)])
    assert max(r.json()["meta"]["batch_size"] for r in again) > 1


def test_a_function_vmap_cannot_run_is_learned_and_served_alone(make_client):
    c = make_client(max_batch_wait_ms=300, max_batch_size=8)
    url = "/v1/functions/branchy/jacobian"
    bodies = [{"inputs": [[float(i + 1), 2.0]]} for i in range(4)]
    for responses in (_round(c, url, bodies), _round(c, url, bodies)):
        for body, r in zip(bodies, responses):
            got, doc = decode(r)
            np.testing.assert_allclose(got, torch.func.jacrev(branchy)(torch.tensor(body["inputs"][0])).numpy(), rtol=1e-6)
    assert {r.json()["meta"]["batch_size"] for r in responses} == {1}  # the second round ran alone
    assert not c.app.service_state.engines.workers[0].worker.engine.profiles["branchy"].vmap_function  # learned


def test_batches_stay_inside_the_memory_budget(make_client):
    # softmax n=200 in float64: a 320 kB Jacobian; 4 x 320 kB x 3 fits a 4 MB budget, x 4 does not
    c = make_client(max_batch_wait_ms=300, max_batch_size=16, memory_budget_bytes=4_000_000)
    x = np.linspace(0, 1, 200)
    assert c.post("/v1/functions/softmax/jacobian", content=wire.dumps({"inputs": [wire.encode_tree(x)]})).status_code == 200
    responses = _round(c, "/v1/functions/softmax/jacobian", [{"inputs": [wire.encode_tree(x + i)]} for i in range(8)])
    sizes = [r.json()["meta"]["batch_size"] for r in responses]
    assert max(sizes) == 3, sizes
