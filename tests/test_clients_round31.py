"""Clients and timing, round thirty-one: what a request that waited in an engine's queue is
answered once its turn comes.

Each test names what a user saw before. They share one real server of this module (two
API keys: two clients) whose stream budget is small enough for two slow answers to fill
a client's share (round 28's).
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Self

import httpx
import jacobian_client as jc
import numpy as np
import pytest
import torch
from jacobian_client import wire
from jacobian_service.engine.profile import BatchStats
from jacobian_service.scheduler import _SHARED_BATCH_S, _SHARED_RECENT_S

from . import clients28_functions, clients31_functions
from ._client_support import real_server
from .conftest import assert_problem
from .test_hostile_round27_clients import _head, _softmax_jacobian

HOSTILE, HONEST = "hostile-key", "honest-key"
# One client for every request of this module's (from any thread), kept open for the
# worker's life: round 33 (test_hostile_round33_clients) sends through these helpers
# after this module's tests are done.
_HTTP = httpx.Client(timeout=60)
atexit.register(_HTTP.close)


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with real_server(functions="jacobian_service.examples,tests.clients28_functions,tests.clients31_functions", api_keys=f"{HOSTILE},{HONEST}",
                     body_budget_bytes=32 << 20) as url:
        yield url


def _post(url: str, path: str, doc: dict, key: str, accept: str = wire.JSON, timeout_s: float | None = None,
          ) -> httpx.Response:
    headers = {"content-type": wire.JSON, "accept": accept, "authorization": f"Bearer {key}"}
    if timeout_s is not None:
        headers["x-request-timeout"] = f"{timeout_s:.3f}"
    return _HTTP.post(url + path, content=json.dumps(doc).encode(), headers=headers)


def _metric(url: str, name: str) -> float:
    text = _HTTP.get(url + "/metrics", headers={"authorization": f"Bearer {HONEST}"}, timeout=10).text
    return float(next(line.split()[1] for line in text.splitlines() if line.startswith(name + " ")))


def _queue_depth(url: str) -> float:
    return _metric(url, "jacobian_service_queue_depth")


def _slow_reader(url: str, doc: dict, key: str) -> socket.socket:
    """A connection that asked for a 7.84 MB softmax Jacobian as JSON (a gathered answer,
    held on the stream budget while it is sent) and reads next to nothing of it."""
    body = json.dumps(doc).encode()
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", int(url.rsplit(":", 1)[1])))
    s.sendall(b"POST /v1/functions/softmax/jacobian HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
              b"Authorization: Bearer %s\r\nContent-Length: %d\r\n\r\n" % (key.encode(), len(body)) + body)
    status, head = _head(s)
    assert status == 200, head
    return s


class _Held:
    """The engine held by a request of the honest key (clients28's gate) while others
    queue behind it; ``release`` lets it go."""

    def __init__(self, url: str) -> None:
        self.url, self.number = url, os.getpid() % 1_000_000 + 31
        clients28_functions.gate(self.number).unlink(missing_ok=True)
        self.threads: list[threading.Thread] = []
        self.answers: dict[str, list[httpx.Response]] = {}
        self.add("holder", "/v1/functions/holds_the_engine/evaluate", {"inputs": [[float(self.number)]]}, HONEST)

    def add(self, name: str, path: str, doc: dict, key: str, count: int = 1, depth: int | None = None,
            **how: object) -> None:
        """Start ``count`` requests; return once the engine holds ``depth`` (all so far)."""
        def send() -> None:
            self.answers.setdefault(name, []).append(_post(self.url, path, doc, key, **how))  # type: ignore[arg-type]

        for _ in range(count):
            t = threading.Thread(target=send)
            t.start()
            self.threads.append(t)
        deadline = time.monotonic() + 30
        while _queue_depth(self.url) < (depth or len(self.threads)):
            assert time.monotonic() < deadline, (name, self.answers)
            time.sleep(0.005)  # (the server is this process's: polls back to back starve it)

    def release(self) -> None:
        clients28_functions.gate(self.number).touch()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
        for t in self.threads:
            t.join()
        clients28_functions.gate(self.number).unlink(missing_ok=True)


SIN = ("/v1/functions/sin/jacobian", {"inputs": [[0.5, 1.0]]})
X = np.linspace(-1, 1, 1400, dtype=np.float32)
_WIDE = {"inputs": [X.tolist()]}


def _hessian(r: httpx.Response) -> np.ndarray:
    return np.array(r.json()["hessian"]["data"])


def _jacobian(r: httpx.Response) -> np.ndarray:
    return np.array(r.json()["jacobian"]["data"])


# (path, the 7.84 MB answer's check): a Hessian, never streamed; a softmax Jacobian as
# JSON, which reserves a stream's room first and is gathered (under the stream threshold)
_QUEUED = [
    ("/v1/functions/sum_sin/hessian", _hessian, lambda: np.diag(-np.sin(X.astype(np.float64)))),
    ("/v1/functions/softmax/jacobian", _jacobian, lambda: _softmax_jacobian(X)),
]


@pytest.mark.parametrize("path, read, expected", _QUEUED, ids=["hessian", "softmax-json"])
def test_a_request_that_waited_is_checked_against_the_room_there_is_when_it_runs(server: str, path, read,
                                                                                  expected) -> None:
    """The front end sends a request's answer room with it (round 28), and the engine
    refuses a larger answer before computing it. The room was the one there was when the
    request was sent: a 7.84 MB Hessian asked while the client's two slow answers filled
    its share, queued behind another client's request, was refused when its turn came
    though those answers had long gone and the whole budget was free: 503 "large answers
    being sent held the room this one needs ... when it was asked". Now a request the
    engine refused for a room that has come back since is asked again, with the room
    there is now: answered, as torch.func computes it."""
    slow = [_slow_reader(server, _WIDE, HOSTILE) for _ in range(2)]
    with _Held(server) as held:
        try:
            held.add("queued", path, _WIDE, HOSTILE)  # (its room: what the two slow answers leave)
        finally:
            for s in slow:
                s.close()
        deadline = time.monotonic() + 20  # (each slow answer's room comes back as its send fails)
        while _metric(server, "jacobian_service_stream_bytes_held") != 0:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    [r] = held.answers["queued"]
    assert r.status_code == 200, r.text[:400]  # (before: 503, the room free for seconds)
    np.testing.assert_allclose(read(r), expected(), rtol=1e-5, atol=1e-7)
    assert held.answers["holder"][0].status_code == 200


def test_a_request_whose_room_is_still_taken_when_it_runs_is_refused_before_computing(server: str) -> None:
    """The other side of the test above: the room still taken when the request's turn
    comes, it is refused as before, in the budget's words, before it is computed."""
    slow = [_slow_reader(server, _WIDE, HOSTILE) for _ in range(2)]
    try:
        with _Held(server) as held:
            held.add("queued", "/v1/functions/sum_sin/hessian", _WIDE, HOSTILE)
    finally:
        for s in slow:
            s.close()
    problem = assert_problem(held.answers["queued"][0], 429, "overloaded")
    assert problem["detail"].startswith("this client holds 2 large answers ("), problem
    assert problem["detail"].endswith(" (refused by the engine as soon as its size was known, before computing it)")
    assert held.answers["queued"][0].headers["retry-after"] == "1"


# ------------------------------------------------------------ a request its time left cannot fit


CHAIN = ("/v1/functions/counted_chain/jacobian", {"inputs": [np.linspace(-1, 1, 256).tolist()]})
# What one counted_chain Jacobian is sized to take here (clients31_functions.size_steps),
# on a machine of any speed: long enough for 0.4 of it to cover an engine's turn after a
# release (the time-left test); few enough of them fill 2 s (beyond 30: a skip).
# A fixed chain of 1,200 steps took 4-10 s a Jacobian on the loaded 2-core VM (62 CPU-s
# for this file, most of it those Jacobians), and would have been too short for these
# tests on a machine some times faster than it.
CHAIN_S = 0.75
# ... and for the time-slice test, short enough that a batch of two or more fits its 1 s
# slice on a loaded machine (at 0.75 s a run, a pair was costed 1.5 s: every batch 1).
SLICE_CHAIN_S = 0.2


def _chain_jacobian() -> np.ndarray:
    """counted_chain's Jacobian at CHAIN, as torch.func computes it in this process, at
    the chain's length now."""
    x = torch.tensor(CHAIN[1]["inputs"][0], dtype=torch.float32)
    return torch.func.jacrev(clients31_functions.chain)(x).numpy()


@pytest.fixture(scope="module")
def chain_jacobian(server: str) -> np.ndarray:
    """counted_chain's Jacobian at CHAIN, once its length is sized to CHAIN_S (after the
    server started: its engines set the torch threads the measure runs on)."""
    clients31_functions.size_steps(CHAIN_S)
    return _chain_jacobian()


def _calls() -> int:
    return len(clients31_functions.CALLS)


def test_a_request_whose_time_left_its_last_run_passes_is_refused_before_it_is_computed(
        server: str, chain_jacobian: np.ndarray) -> None:
    """A batch holds no more requests than their time per request fits in half the time
    left to their earliest deadline (round 29); its first always ran, whatever its time
    left. A slow Jacobian queued with less time left than the last one like it took ran
    whole: the engine spent its compute (every other client waiting behind it) on an
    answer the front end had already given up on, a 504 at the deadline. Now a request
    whose time left is less than what the last run of its kind took per request is
    refused when its turn comes, before the function is called: 504 ``timeout`` saying
    so. One with the time is computed as before."""
    for _ in range(2):  # (the engine learns what one costs: the second, warm)
        r = _post(server, *CHAIN, HOSTILE)
        assert r.status_code == 200, r.text[:300]
        np.testing.assert_allclose(_jacobian(r), chain_jacobian, rtol=1e-4, atol=1e-6)
    each_s = r.json()["meta"]["compute_ms"] / 1e3
    timeout_s = 2.0 + each_s
    calls = _calls()
    with _Held(server) as held:
        held.add("late", *CHAIN, HOSTILE, timeout_s=timeout_s)
        queued = time.monotonic()  # (its deadline runs from a moment before: when it came)
        # Its turn comes with 0.4 of the time one run took left, less what the queue took
        # to show it (the engine refuses it with less than half). Timed from before it was
        # sent, it came a third of a second later on the loaded VM: more than a fifth of a
        # half-second run, which ran.
        time.sleep(max(0.0, queued + timeout_s - 0.4 * each_s - time.monotonic()))
    [late] = held.answers["late"]
    detail = _late_detail(late)
    # With its time, the same request is computed; queued behind the late one, it is
    # answered once the engine has had the late one's turn (run or refused).
    r = _post(server, *CHAIN, HOSTILE, timeout_s=30)
    assert r.status_code == 200, r.text[:300]
    np.testing.assert_allclose(_jacobian(r), chain_jacobian, rtol=1e-4, atol=1e-6)
    # The late one was never called, whichever 504 came first (before: called, run whole).
    assert _calls() == calls + 1, (_calls() - calls, detail)


def _late_detail(late: httpx.Response) -> str:
    """The detail of a late request's 504, skipping where the engine took its turn past
    its deadline (nothing to show). The engine's refusal has its own words; but the front
    end's deadline timer can answer first, in a window of ~0.4 x one run (the time the
    test leaves between the turn and the deadline), saying "the request ran past its
    deadline" as it does for a request that ran. Those words are then no evidence either
    way: the caller tells the two apart by the function's calls (a refused request's
    function is never called; one that ran was).

    A 200 is a skip too: the engine refuses on its key's last run, and where that run (the
    large answer's, at another moment of a loaded machine) took under twice the time left,
    the late one ran and ended in time, as it should (the full suite beside three busy
    loops: 0.5 s of compute with ~0.5 s left). With the refusal gone a quiet machine never
    answers 200 here: a run takes 2.5 times the time left, and the deadline answers 504."""
    if late.status_code == 200:
        pytest.skip("the last run of its key said it would fit, and it did (a loaded machine's runs vary): "
                    "nothing to show here")
    problem = assert_problem(late, 504, "timeout")
    detail = problem["detail"]
    if detail == "the request waited in the queue past its deadline":
        pytest.skip("the engine took its turn past the deadline (a loaded machine): nothing to show here")
    if detail != "the request ran past its deadline":  # (the front end's timer: see above)
        assert detail.startswith("the request would not finish before its deadline: the last like it took "), \
            problem  # (before: "the request ran past its deadline", after the engine ran it)
    return detail


# ------------------------------------------------------------ one request at a time, beside a flood


def test_a_client_sending_one_request_at_a_time_waits_for_a_time_slice_of_another(server: str) -> None:
    """While another client's request waits, a batch holds what its time per request
    fits in a second (round 29). Only while one waited: a client that sends its next
    request as its last is answered (one at a time, as a page or a script does) found
    the other client's batch formed in the moment it had nothing queued, and waited all
    of it. Measured under load (16 threads of slow_chain, 3 of small Jacobians): batches
    of 13 slow Jacobians (4.5 s), the small requests' p99 2 s and some 504 at 3 s. Now
    a batch is a time slice too while the engine took another client's job a moment
    ago (10 s): here the honest client, answered just before, sends its request while
    the hostile client's slow Jacobians run, and is answered after the first of them,
    not after all (counted: the hostile answers that came first, the batches run)."""
    steps = clients31_functions.STEPS
    clients31_functions.size_steps(SLICE_CHAIN_S)
    try:
        _time_slice(server, _chain_jacobian())
    finally:
        clients31_functions.STEPS = steps  # (the next test's, if any, as the fixture sized it)


def _time_slice(server: str, chain_jacobian: np.ndarray) -> None:
    for _ in range(2):  # (the engine learns what one costs: the second, warm)
        r = _post(server, *CHAIN, HOSTILE)
        assert r.status_code == 200, r.text[:300]
        np.testing.assert_allclose(_jacobian(r), chain_jacobian, rtol=1e-4, atol=1e-6)
    each_s = r.json()["meta"]["compute_ms"] / 1e3
    count = max(4, int(2.0 / each_s) + 2)  # (one batch of all: 2 s or more, two time slices)
    if count > 30:
        pytest.skip(f"this machine computes a counted_chain Jacobian in {each_s:.3f} s: too fast")
    with _Held(server) as held:  # (the honest key's request: the engine's last other client)
        for name, path, doc, key in [("hostile", *CHAIN, HOSTILE)] * count:
            held.add(name, path, doc, key)
        batches = _calls()
        held.release()
        deadline = time.monotonic() + 30  # (the first batch runs: the honest client has nothing queued)
        while _calls() == batches:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        honest = _post(server, *SIN, HONEST, timeout_s=30)
        arrived = len(held.answers.get("hostile", []))
    assert honest.status_code == 200, honest.text[:300]
    np.testing.assert_allclose(_jacobian(honest), np.diag(np.cos([0.5, 1.0])), rtol=1e-6)
    hostile = held.answers["hostile"]
    assert [r.status_code for r in hostile] == [200] * count, [r.text[:200] for r in hostile]
    for r in hostile:
        np.testing.assert_allclose(_jacobian(r), chain_jacobian, rtol=1e-4, atol=1e-6)
    sizes = [r.json()["meta"]["batch_size"] for r in hostile]
    # Before: one batch of all of them (one call), the honest request answered after all.
    assert arrived < count, (arrived, count, sizes)
    # Each batch of two or more fit the slice by the scheduler's own estimate
    # (``BatchStats.cost``, from its key's last runs: the warm run alone, then each batch
    # as it ended, whose time every member's compute_ms says), replayed in the order the
    # batches ended. Not ``max(sizes) * each_s <= 1 + each_s``: that took a batch to cost
    # its size times the run alone, while the estimate is fitted through the sizes run,
    # and a machine whose load eased under the test (a batch of 3 in 0.6 s after a
    # 0.3 s run alone) rightly ran batches of 5 of what had been measured at 0.3 s each.
    # The slice holds for _SHARED_RECENT_S after the engine took the honest request and
    # then the hostile one's next batch (batches run back to back: their times add up to
    # when each began); a machine slowed enough to run past it rightly batches the rest.
    runs = list(dict.fromkeys((r.json()["meta"]["batch_size"], r.json()["meta"]["compute_ms"]) for r in hostile))
    assert sum(size for size, _ in runs) == count, (runs, count)  # (no two batches taken for one)
    stats = BatchStats(batch_size=1, compute_s=each_s, times={1: each_s})
    since_shared_s = 0.0
    for i, (size, ms) in enumerate(runs):
        estimate = stats.cost(size)
        if since_shared_s < _SHARED_RECENT_S - 1.0:
            assert size == 1 or estimate <= _SHARED_BATCH_S + 1e-5, (size, estimate, runs, each_s)
        stats.observe(0, size, ms / 1e3)
        since_shared_s += ms / 1e3 if i else 0.0
    # ... and batches there were, where the estimate let one form: the first batch, all
    # of them queued, is costed from the warm run alone (each_s a request), so two fit
    # the slice where 2 x each_s does (judged by the server's own measure, not this
    # machine's speed; a load that slows the warm run to over half the slice leaves
    # every batch rightly 1). Before: counted_chain's call count was state the engine's
    # kept-state watch saw, and every batch was 1, the check above idle.
    if 2 * each_s <= _SHARED_BATCH_S - 0.05:
        assert runs[0][0] >= 2, (runs, each_s)
    assert len(runs) >= 2 and _calls() - batches >= len(runs), (_calls() - batches, runs)


# ------------------------------------------------------------ pushed out of a full queue, through the SDK

SMALL_QUEUE = 8


@pytest.fixture(scope="module")
def small_queue_server() -> Iterator[str]:
    with real_server(functions="jacobian_service.examples,tests.clients28_functions", api_keys=f"{HOSTILE},{HONEST}",
                     max_queue=SMALL_QUEUE) as url:
        yield url


def test_an_sdk_call_pushed_out_of_a_full_queue_is_retried_and_answered(small_queue_server: str) -> None:
    """A request already queued that gives its place to another client's (round 29) is
    answered 429 with ``Retry-After: 1``: the SDK's call waits as told and sends it
    again (refused 429 again while the queue stays full), and is answered once the queue
    drains, as torch.func computes it, within its retry time; the other client's
    request is answered too."""
    url = small_queue_server
    answers: list[object] = []
    with _Held(url) as held:
        held.add("hostile", *SIN, HOSTILE, count=SMALL_QUEUE - 2)
        with jc.Client(url, api_key=HOSTILE, timeout=30, transport="json",
                       retry=jc.RetryPolicy(max_retry_time=30)) as client:
            sdk = threading.Thread(target=lambda: answers.append(_sdk_jacobian(client)))
            sdk.start()
            deadline = time.monotonic() + 30
            while _queue_depth(url) < SMALL_QUEUE:  # (the queue is full, the SDK's call the newest)
                assert time.monotonic() < deadline
                time.sleep(0.005)
            pushed_at = _answered_429(url)
            held.add("honest", *SIN, HONEST, timeout_s=30, depth=SMALL_QUEUE)  # (its place: the SDK's call's)
            while _answered_429(url) < pushed_at + 2:  # (pushed, refused again)
                assert time.monotonic() < deadline and sdk.is_alive(), answers
                time.sleep(0.005)
            held.release()
            sdk.join(35)
    assert len(answers) == 1 and isinstance(answers[0], np.ndarray), answers
    np.testing.assert_allclose(answers[0], np.diag(np.cos([0.5, 1.0])), rtol=1e-6)
    for r in held.answers["honest"] + held.answers["hostile"]:
        assert r.status_code == 200, r.text[:300]


def _answered_429(url: str) -> float:
    text = _HTTP.get(url + "/metrics", headers={"authorization": f"Bearer {HONEST}"}, timeout=10).text
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("jacobian_service_requests_total{") and 'status="429"' in line)


def _sdk_jacobian(client: jc.Client) -> object:
    try:
        return client.jacobian("sin", np.array([0.5, 1.0], dtype=np.float32))
    except Exception as exc:  # noqa: BLE001 (the test says what it was)
        return exc
