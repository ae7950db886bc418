"""Hostile clients, round thirty-five: sparse request batches across clients, and the
remembered refusal of a detection past its limits.

Probed on one real server of this module (five API keys: five clients), answers compared
with torch.func.jacrev of each member's own point:

- a batch of sparse Jacobians whose members have different deadlines (X-Request-Timeout),
  one member's client gone mid-batch: the short one is a 504 ``timeout``, every other a 200
  exactly jacrev's at its own point (no answer of another member's);
- a value-dependent pattern (``x[idx]``, ``idx`` an input) batched across clients, NaN and
  inf among the values: each member its own pattern and values;
- a detection refused at the JSON answer's limit is refused again at once (0.00 s, not
  detected again), yet the same point asked as a streamed ``.npy`` (a higher limit) is
  computed, and a smaller shape's ``GET .../sparsity`` is answered: the remembered
  refusal refuses no request that should succeed;
- query abuse on ``GET .../sparsity``: a 4xx problem+json each, no traceback.

Two did not hold, each tested on the real engine in-process (their tests last):

- a member whose client went while its value-dependent batch ran (each member alone
  after the batch's forward pass) stopped the batch, and its batch-mates' computed
  answers were computed again (engine.sparse._each);
- patterns of many shapes, each within every limit, grew the engine's pattern cache
  without a bound in bytes (sparsity.patterns.PatternCache's max_bytes).
"""

from __future__ import annotations

import io
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlparse

import httpx
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from jacobian_service.engine.core import Engine
from jacobian_service.registry import FunctionSpec, Input
from jacobian_service.scheduler import Job, Worker
from jacobian_service.types import Call

from . import clients35_functions as f
from ._client_support import real_server
from .conftest import assert_problem

KEYS = ("a", "b", "c", "d", "e")
N = 8
_HTTP = httpx.Client(timeout=60)


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    # A small result limit: a dense pattern of 1,500^2 entries is past the JSON answer's
    # detection limit (8 MiB / 8 entries), within the streamed .npy's (budget / 16).
    with real_server(functions="jacobian_service.examples,tests.clients35_functions", api_keys=",".join(KEYS),
                     max_result_bytes=8 << 20, memory_budget_bytes=256 << 20, stream_threshold_bytes=1 << 16) as url:
        yield url


def _post(url: str, name: str, doc: dict, key: str = "a", timeout_s: float | None = None,
          accept: str = "application/json") -> httpx.Response:
    headers = {"content-type": "application/json", "accept": accept, "authorization": f"Bearer {key}"}
    if timeout_s is not None:
        headers["x-request-timeout"] = str(timeout_s)
    return _HTTP.post(f"{url}/v1/functions/{name}/jacobian", content=json.dumps(doc).encode(), headers=headers)


def _csr(r: httpx.Response) -> np.ndarray:
    j = r.json()["jacobian"]
    return sp.csr_array((np.array(j["data"], dtype=j["dtype"]), j["indices"], j["indptr"]), shape=j["shape"]).toarray()


def _gone_mid_batch(url: str, x: np.ndarray, key: str, after_s: float) -> None:
    """A client that sends its request and closes its connection before the answer."""
    body = json.dumps({"inputs": [x.tolist()], "sparsity": "auto"}).encode()
    u = urlparse(url)
    with socket.create_connection((u.hostname, u.port)) as s:
        s.sendall(f"POST /v1/functions/slow_band35/jacobian HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                  f"authorization: Bearer {key}\r\ncontent-length: {len(body)}\r\n\r\n".encode() + body)
        time.sleep(after_s)


def test_a_sparse_batch_of_different_deadlines_and_a_client_gone_never_mixes_answers(server: str) -> None:
    rng = np.random.default_rng(35)
    r = _post(server, "slow_band35", {"inputs": [rng.standard_normal(N).tolist()], "sparsity": "auto"})
    assert r.status_code == 200, r.text[:300]  # (its key's first request runs alone: batches after)
    largest = 0
    for _ in range(3):  # (batching follows this machine's timing: a batch of two or more at least once)
        xs = {k: rng.standard_normal(N) for k in KEYS}
        answers: dict[str, httpx.Response] = {}

        def send(key: str, timeout_s: float | None = None, xs: dict = xs, answers: dict = answers) -> None:
            answers[key] = _post(server, "slow_band35", {"inputs": [xs[key].tolist()], "sparsity": "auto"}, key, timeout_s)

        threads = [threading.Thread(target=send, args=("a",))]
        threads[0].start()
        time.sleep(0.05)  # the engine busy with a's request: the others queue behind it
        threads += [threading.Thread(target=send, args=(k, t)) for k, t in (("b", None), ("c", 0.32), ("d", 5.0))]
        threads.append(threading.Thread(target=_gone_mid_batch, args=(server, xs["e"], "e", 0.25)))
        for t in threads[1:]:
            t.start()
        for t in threads:
            t.join()
        assert_problem(answers["c"], 504, "timeout")
        for key in "abd":
            r = answers[key]
            assert r.status_code == 200, (key, r.text[:300])
            want = torch.func.jacrev(f.slow_band35)(torch.from_numpy(xs[key])).numpy()
            np.testing.assert_array_equal(_csr(r), want)  # exactly jacrev's at its own point
            largest = max(largest, r.json()["meta"]["batch_size"])
        if largest >= 2:
            break
    assert largest >= 2  # (else nothing above was batched)


def test_a_value_dependent_batch_across_clients_with_nan_and_inf_keeps_each_members_pattern(server: str) -> None:
    rng = np.random.default_rng(350)
    warm = _post(server, "picked35", {"inputs": [[1.0] * N, list(range(N))], "sparsity": "auto"})
    assert warm.status_code == 200, warm.text[:300]
    points = {}
    for i, key in enumerate("abcd"):
        x = rng.standard_normal(N)
        x[i] = [np.nan, np.inf, -np.inf, 0.0][i]
        points[key] = (x, rng.integers(0, N, N))
    answers: dict[str, httpx.Response] = {}

    def send(key: str) -> None:
        x, idx = points[key]
        values = ", ".join("NaN" if np.isnan(v) else ("Infinity" if v > 0 else "-Infinity") if np.isinf(v) else repr(float(v))
                           for v in x)  # (JSON's NaN and Infinity, as Python's json writes them)
        doc = f'{{"inputs": [[{values}], {json.dumps(idx.tolist())}], "sparsity": "auto"}}'
        answers[key] = _HTTP.post(f"{server}/v1/functions/picked35/jacobian", content=doc,
                                  headers={"content-type": "application/json", "authorization": f"Bearer {key}"})

    threads = [threading.Thread(target=send, args=(k,)) for k in "abcd"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for key, (x, idx) in points.items():
        r = answers[key]
        assert r.status_code == 200, (key, r.text[:300])
        got = _csr(r)
        # entry (i, idx[i]) is 2 x[idx[i]], NaN or infinite there only (docs/sparse.md: a NaN
        # stays at its entry; jacrev's VJPs carry it into the other rows of its column)
        want = np.zeros((N, N))
        want[np.arange(N), idx] = 2 * x[idx]
        np.testing.assert_array_equal(got, want)
        jacrev = torch.func.jacrev(f.picked35)(torch.from_numpy(x), torch.from_numpy(idx)).numpy()
        finite = np.isfinite(jacrev)
        np.testing.assert_array_equal(got[finite], jacrev[finite])


def test_a_remembered_refusal_refuses_no_request_that_should_succeed(server: str) -> None:
    n = 1500
    x = np.linspace(0.5, 1.5, n).astype(np.float32)
    doc = {"inputs": [x.tolist()], "sparsity": "auto"}
    first = assert_problem(_post(server, "dense35", doc), 413, "result_too_large")
    t0 = time.monotonic()
    again = assert_problem(_post(server, "dense35", doc), 413, "result_too_large")
    assert time.monotonic() - t0 < 2.0 and "too dense for the limits" in again["detail"], again
    assert first["detail"].split(":")[0] == again["detail"].split(":")[0]
    # the same point under the streamed .npy's higher limit: detected and computed
    r = _post(server, "dense35", {**doc, "sparse_format": "dense"}, accept="application/x-npy")
    assert r.status_code == 200, r.text[:300]
    np.testing.assert_array_equal(np.load(io.BytesIO(r.content)), torch.func.jacrev(f.dense35)(torch.from_numpy(x)).numpy())
    # the JSON answer is still refused (its limit), a smaller shape still answered
    assert_problem(_post(server, "dense35", doc), 413, "result_too_large")
    r = _HTTP.get(f"{server}/v1/functions/dense35/sparsity", params={"shapes": "1500"}, headers={"authorization": "Bearer a"})
    assert_problem(r, 413, "result_too_large")
    r = _HTTP.get(f"{server}/v1/functions/dense35/sparsity", params={"shapes": "100"}, headers={"authorization": "Bearer a"})
    assert r.status_code == 200 and r.json()["pattern"]["nnz"] == 100 * 100, r.text[:300]
    small = np.linspace(0.5, 1.5, 100).astype(np.float32)
    r = _post(server, "dense35", {"inputs": [small.tolist()], "sparsity": "auto"})
    assert r.status_code == 200, r.text[:300]
    np.testing.assert_array_equal(_csr(r), torch.func.jacrev(f.dense35)(torch.from_numpy(small)).numpy())


@pytest.mark.parametrize(("query", "status", "code"), [
    ("shapes=99999999999999999999", 422, "invalid_input"),
    ("shapes=4294967296", 413, "payload_too_large"),
    ("shapes=8&shapes=9", 422, "invalid_input"),
    ("shapes=8&mode=fwd&mode=rev", 422, "invalid_input"),
    ("shapes=8&argnums=0,0", 422, "invalid_input"),
    ("shapes=8&format=dense", 422, "invalid_input"),
    ("shapes=8&rows=0,2", 422, "invalid_input"),
    ("shapes=%ff", 422, "invalid_input"),
    ("shapes=8&sparsity=band%00", 422, "sparsity_not_found"),
    ("shapes=" + ",".join(["1"] * 40), 422, "invalid_input"),
])
def test_query_abuse_on_the_sparsity_route_is_a_clear_4xx(server: str, query: str, status: int, code: str) -> None:
    r = _HTTP.get(f"{server}/v1/functions/slow_band35/sparsity?{query}", headers={"authorization": "Bearer e"})
    assert_problem(r, status, code)


# ---------------------------------------------------------------- a member gone mid-batch

PICKED = FunctionSpec("counted_picked35", lambda x, idx: (_COUNTED.append(1), x[idx] ** 2)[1],
                      (Input("x", shape=("n",), dtype="float64"), Input("idx", shape=("n",), dtype="int64")))
_COUNTED: list[int] = []


def _picked_batch(gone_after: int | None) -> tuple[dict[str, Any], int]:
    """Three clients' x[idx] (a value-dependent pattern: each member runs alone after the
    batch's vmapped forward pass) through the engine's scheduler; the last member's client
    goes (as a closed connection cancels its job) once the function ran ``gone_after``
    times. Returns each client's (result, error) and the function's calls in the batch."""
    engine = Engine(torch.device("cpu"), 1 << 30)
    jobs: dict[str, Job] = {}

    def cancelled_for(job: Job) -> Any:
        def gone() -> bool:
            if gone_after is not None and job is jobs.get("hostile") and len(_COUNTED) >= gone_after:
                job.done = True  # (ThreadedWorker.cancel: its front end saw the client go)
            return job.done
        return gone

    worker = Worker(engine, max_queue=10, max_batch=8, cancelled_for=cancelled_for)
    answers: dict[str, Any] = {}
    rng = np.random.default_rng(3535)

    def submit(client: str) -> None:
        call = Call(PICKED, [rng.standard_normal(N), rng.permutation(N)], ["float64", "int64"], sparsity="auto",
                    deadline=time.monotonic() + 60)
        jobs[client] = Job("jacobian", call, lambda result, error, info: answers.__setitem__(client, (result, error)),
                           deadline=call.deadline)
        worker.submit(jobs[client])

    submit("first")
    worker.run(worker.take(lambda s: None))  # alone: its key seen, the next are batched
    answers.clear()
    for client in ("a", "b", "hostile"):
        submit(client)
    group = worker.take(lambda s: None)
    assert group == [jobs["a"], jobs["b"], jobs["hostile"]]
    _COUNTED.clear()
    worker.run(group)
    for client in ("a", "b"):
        result, error = answers[client]
        assert error is None, error
        x, idx = jobs[client].call.args
        want = torch.func.jacrev(lambda t, i: t[i] ** 2)(torch.from_numpy(x), torch.from_numpy(idx)).numpy()
        np.testing.assert_array_equal(result.value.toarray(), want)  # its own point's, exactly jacrev's
    return answers, len(_COUNTED)


def test_a_client_gone_mid_batch_does_not_have_its_batch_mates_computed_again() -> None:
    """Measured on a real server (a 0.05 s x[idx], three clients batched): the third
    member's client closed its connection while its batch ran; the batch stopped at its
    member (each member of a value-dependent batch runs alone, under its own liveness),
    and the two others, computed already, were computed again from the start: 17 calls
    of the function where 14 answered all three, their answers 0.85 s where 0.53 s.
    Now the gone member's Timeout is its own: the others are answered from the batch."""
    _, everyone = _picked_batch(None)
    answers, calls = _picked_batch(gone_after=2)  # gone once the batch's forward pass and a's first call ran
    assert "hostile" not in answers  # (its front end answered it: a closed connection)
    assert calls < everyone, (calls, everyone)  # (before: 9, where 7 answered all three; now 6)


# ---------------------------------------------------------------- the pattern cache's bytes

def _cached_bytes(engine: Engine) -> int:
    """What the engine's pattern cache holds in memory: each pattern's rows and columns
    and its colouring's gather map (an int64 per entry each), counted here on their own."""
    total = 0
    for entry in engine.sparsity_cache._memory.values():
        if "pattern" in entry:
            total += entry["pattern"].rows.nbytes + entry["pattern"].cols.nbytes + entry["coloring"].gather.nbytes
    return total


def test_patterns_of_many_shapes_hold_the_engine_to_twice_its_memory_budget() -> None:
    """The pattern cache was bounded by its count (256) alone. Measured on a real server
    (memory budget 256 MiB): GET dense35/sparsity at 1,000 to 1,039 elements, each within
    every limit (1M entries) and 0.16 s, grew the engine by 31 MB a request, 1.25 GB in
    6 s; 256 such shapes at the entry limit would hold tens of GB. Now the cache holds at
    most twice the memory budget (the largest pattern allowed fits), the oldest going
    first; the latest is still served from memory."""
    budget = 4 << 20  # (patterns of 300-311 elements: 2.2 MB each, 26 MB in all)
    engine = Engine(torch.device("cpu"), budget)
    spec = FunctionSpec("dense35", f.dense35, (Input("x", shape=("n",)),))
    for n in range(300, 312):
        call = Call(spec, [np.linspace(0.5, 1.5, n, dtype=np.float32)], ["float32"], sparsity="auto",
                    deadline=time.monotonic() + 60)
        result = engine.sparsity_jacobian(call)
        assert result.sparse_meta["pattern"]["nnz"] == n * n and result.sparse_meta["cached"] is None
        assert _cached_bytes(engine) <= 2 * budget, (n, _cached_bytes(engine))  # (before: 26 MB at n = 311)
    again = engine.sparsity_jacobian(call)
    assert again.sparse_meta["cached"] == "memory"
