"""The memory budget bounds chunk sizes; out-of-memory halves them, down to 1, then 507."""

from __future__ import annotations

import numpy as np

from .conftest import assert_problem, decode


def test_out_of_memory_halves_the_chunk_until_it_fits(client):
    got, doc = decode(client.post("/v1/functions/memory_hungry/jacobian", json={"inputs": [[1.0] * 32]}))
    np.testing.assert_allclose(got, 2 * np.eye(32))
    assert doc["meta"]["chunk_size"] == 4  # 32 -> 16 -> 8 -> 4 rows
    got, doc = decode(client.post("/v1/functions/memory_hungry/jacobian", json={"inputs": [[1.0] * 32], "chunk_size": 6}))
    np.testing.assert_allclose(got, 2 * np.eye(32))
    assert doc["meta"]["chunk_size"] == 3


def test_still_out_of_memory_at_one_row_is_507(client):
    body = assert_problem(client.post("/v1/functions/memory_hungry/jacobian", json={"inputs": [[-1.0] * 8]}), 507, "out_of_memory")
    assert "Traceback" not in body["detail"]
    assert client.get("/healthz").status_code == 200


def test_chunk_size_follows_the_memory_budget(make_client):
    x = {"inputs": [[0.5] * 512]}
    roomy = make_client(memory_budget_bytes=1 << 30)
    assert roomy.post("/v1/functions/softmax/jacobian", json=x).json()["meta"]["chunk_size"] == 512
    tight = make_client(memory_budget_bytes=512 * 1024)
    doc = tight.post("/v1/functions/softmax/jacobian", json=x).json()
    # 4 x (512 + 512) x 4 bytes = 16 KiB a row: 32 rows fit the budget
    assert doc["meta"]["chunk_size"] == 32
    s = np.exp(0.0) / 512
    np.testing.assert_allclose(np.asarray(doc["jacobian"]["data"]), np.diag([s] * 512) - s * s, atol=1e-7)
