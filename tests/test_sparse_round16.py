"""Sparse Jacobians and Hessians, round 16: functions that reach a tensor's storage
(``share_memory_``, DLPack) under the tracer. Each answer against torch.func (or its
error) in this process.

One in-process app serves every case (no new server process).
"""

from __future__ import annotations

import pytest

from .conftest import assert_problem, ready_app


@pytest.fixture(scope="module")
def client():
    with ready_app("tests.sparse16_functions") as c:
        yield c


# ------------------------------------------------------------------ a tensor's storage under the tracer


@pytest.mark.parametrize("name", ["shared_buffer", "dlpack_round_trip"])
def test_a_function_that_reaches_a_storage_is_torchs_error_not_a_crash(client, name):
    """``torch.full(...).share_memory_()`` in the function (or a DLPack round trip of
    its input): jacrev refuses it ('Cannot access storage of TensorWrapper'), so the
    dense route answers 500 function_error. The tracer's wrapper handed its storage,
    which has no data, to torch's C++ code: the engine died by SIGSEGV at each
    ``sparsity: auto`` request (500 'the engine process was killed by SIGSEGV'), and the
    third quarantined the function, its ``/evaluate`` refused 503 for 600 s. Now the
    trace fails there as jacrev does, and the sparse answer is the dense one's error;
    the engine lives on, and evaluates."""
    body = {"inputs": [[1.0, 2.0, 3.0]]}
    dense = client.post(f"/v1/functions/{name}/jacobian", json=body)
    want = assert_problem(dense, 500, "function_error")["detail"]
    for _ in range(2):
        r = client.post(f"/v1/functions/{name}/jacobian", json={**body, "sparsity": "auto"})
        assert assert_problem(r, 500, "function_error")["detail"] == want
    r = client.get(f"/v1/functions/{name}/sparsity?shapes=3")
    assert assert_problem(r, 500, "function_error")["detail"] == want
    r = client.post(f"/v1/functions/{name}/evaluate", json=body)
    assert r.status_code == 200, r.text

