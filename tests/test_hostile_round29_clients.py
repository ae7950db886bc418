"""Red team, round twenty-nine: one client's share of an engine (its batches, its queue).

Round 28 had the engine take its queue in turns among clients; a batch, though, took
every queued request of its key, and the queue's places went to whoever came first.
Each test names what a user saw before. They share one real server of this module (two
API keys: two clients).
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Iterator

import httpx
import numpy as np
import pytest
import torch
from jacobian_client import wire
from jacobian_service.scheduler import _SHARED_BATCH_S

from . import clients28_functions, clients29_functions
from ._client_support import real_server
from .conftest import assert_problem
from .test_hostile_round28_clients import _queue_depth

HOSTILE, HONEST = "hostile-key", "honest-key"
MAX_QUEUE = 32


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with real_server(functions="jacobian_service.examples,tests.clients28_functions,tests.clients29_functions",
                     api_keys=f"{HOSTILE},{HONEST}", max_queue=MAX_QUEUE) as url:
        yield url


def _post(url: str, path: str, doc: dict, key: str, timeout_s: float | None = None) -> httpx.Response:
    headers = {"content-type": wire.JSON, "authorization": f"Bearer {key}"}
    if timeout_s is not None:
        headers["x-request-timeout"] = f"{timeout_s:.3f}"
    return httpx.post(url + path, content=json.dumps(doc).encode(), headers=headers, timeout=60)


X = np.linspace(-1, 1, 256)
SLOW = ("/v1/functions/slow_chain/jacobian", {"inputs": [X.tolist()]})
SIN = ("/v1/functions/sin/jacobian", {"inputs": [[0.5, 1.0]]})


def _each_s(url: str) -> float:
    """What one slow_chain Jacobian costs the engine now (run alone: its batches' measure)."""
    r = _post(url, *SLOW, HOSTILE)
    assert r.status_code == 200, r.text[:300]
    expected = torch.func.jacrev(clients29_functions.chain)(torch.tensor(X, dtype=torch.float32))
    np.testing.assert_allclose(np.array(r.json()["jacobian"]["data"]), expected.numpy(), rtol=1e-4, atol=1e-6)
    return r.json()["meta"]["compute_ms"] / 1e3


class _Held:
    """The engine held by a hostile request (clients28's gate) while requests queue, in
    the order started; ``release`` lets it go."""

    def __init__(self, url: str) -> None:
        self.url, self.number = url, os.getpid() % 1_000_000 + 29
        self.threads: list[threading.Thread] = []
        self.answers: dict[str, list[httpx.Response]] = {}
        self.add("holder", "/v1/functions/holds_the_engine/evaluate", {"inputs": [[float(self.number)]]}, HOSTILE)

    def add(self, name: str, path: str, doc: dict, key: str, timeout_s: float | None = None, count: int = 1,
            depth: int | None = None) -> None:
        """Start ``count`` requests; return once the engine holds ``depth`` (all so far)."""
        def send() -> None:
            self.answers.setdefault(name, []).append(_post(self.url, path, doc, key, timeout_s))

        for _ in range(count):
            t = threading.Thread(target=send)
            t.start()
            self.threads.append(t)
        deadline = time.monotonic() + 30
        while _queue_depth(self.url) < (depth or len(self.threads)):
            assert time.monotonic() < deadline, (name, self.answers)
            time.sleep(0.01)  # (not a busy loop of /metrics requests: the front end fills the queue meanwhile)

    def release(self) -> None:
        clients28_functions.gate(self.number).touch()

    def __enter__(self) -> "_Held":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
        for t in self.threads:
            t.join()
        clients28_functions.gate(self.number).unlink()


RUNS = 8  # a request's time: so many measured runs, and the queue's fill


def test_a_batch_never_runs_past_its_requests_deadlines(server: str) -> None:
    """A batch was bounded by MAX_BATCH_SIZE and the memory budget alone: 40 softmax
    Hessians one client sent at once (1.3 s each) ran as one batch of 39, past their
    60 s deadline: every one a 504 after a minute of the engine. Now a batch holds no
    more requests than the last batch's time per request fits in half the time left to
    its earliest deadline: here requests each given eight times one's cost and the queue's
    fill (as many as one and a half times that holds) are answered, two batched at least, never all
    504.

    Sized to the time left once the queue is full, not to a fixed 2 s: the engine reads
    the first queued job alone as the holder returns (one run), and a batch of two fits
    only with four runs left (half the time left, ``_DEADLINE_SHARE``); under a loaded
    machine (one run ~1 s) the fill took 2-3 s of a 2 s allowance and every request ran
    alone (``0 >= 2``). A fill that leaves less than eight runs, or a first run alone that
    took 1.5 times the measured one, is tried again (the load's doing, not the service's);
    the first try with time enough is asserted."""
    room = 2.0  # (the queue's fill, s)
    for _ in range(3):
        each = _each_s(server)  # (again each try: the scheduler's own estimate is its key's last run)
        timeout_s = RUNS * each + room
        count = min(MAX_QUEUE - 2, int(1.5 * timeout_s / each) + 2)
        if (count - 1) * each <= 1.25 * timeout_s:  # one batch of all could be in time: nothing to show here
            pytest.skip(f"this machine computes a slow_chain Jacobian in {each:.3f} s: too fast for the queue's room")
        with _Held(server) as held:
            sent = time.monotonic()
            held.add("slow", *SLOW, HOSTILE, timeout_s=timeout_s, count=count)
            filled_s = time.monotonic() - sent
        if timeout_s - filled_s < RUNS * each:
            room = 1.5 * filled_s + 0.5  # (a loaded machine filled the queue slowly: not the service's doing)
            continue
        # The first queued job runs alone (the scheduler's measure for the next batch):
        # one that took half as long again as the measured run (the machine slowed under
        # the test: four workers on two cores, the CI's) leaves a batch of two no room in
        # half the time left, and the sizes above no longer hold: tried again, as a slow fill.
        alone = [r.json()["meta"]["compute_ms"] / 1e3 for r in held.answers["slow"]
                 if r.status_code == 200 and r.json()["meta"]["batch_size"] == 1]
        if all(s <= 1.5 * each for s in alone):
            break
    else:
        pytest.skip(f"the machine's speed moved under the test three times ({each:.3f} s a run, the queue's fill "
                    f"{filled_s:.1f} s): no fair time left to test")
    slow = held.answers["slow"]
    batched = [r for r in slow if r.status_code == 200 and r.json()["meta"]["batch_size"] > 1]
    assert len(batched) >= 2, [r.text[:200] for r in slow]  # (one batch of all: each a 504)
    for r in batched:  # (a request run alone runs whatever its time left)
        meta = r.json()["meta"]
        assert meta["queue_ms"] + meta["compute_ms"] < timeout_s * 1e3, meta
    for r in slow:
        if r.status_code != 200:
            assert_problem(r, 504, "timeout")


def test_while_another_client_waits_a_batch_is_a_time_slice(server: str) -> None:
    """Taking turns, the engine had another client wait for one batch of a client's at
    most, but that batch was every queued request of its key: the honest client's second
    request waited behind 12 slow Jacobians (and with 40 softmax Hessians, a minute: a
    504). Now while another client's jobs wait, a batch holds what its measured time per
    request fits in a second: no batch of the slow client's holds more than the second
    fits at its fastest time per request (with no slice: one batch of 15, 4.3 s), and the
    honest client's requests, each given 3 s, are answered.

    An honest 504 where the slice held and a slow batch took over 1.5 s (the slice is 1 s:
    the machine slowed under the test, the full suite here at a load of 19) is tried
    again, then skipped."""
    slice_ms = _SHARED_BATCH_S * 1e3
    for _ in range(3):
        each = _each_s(server)
        count = min(MAX_QUEUE - 3, int(4.5 / each) + 1)  # (all at once: 4.5 s or the queue's room)
        with _Held(server) as held:
            held.add("slow", *SLOW, HOSTILE, count=count)
            held.add("honest", *SIN, HONEST, timeout_s=3.0, count=2)
        assert [r.status_code for r in held.answers["slow"]] == [200] * count
        sizes = [r.json()["meta"]["batch_size"] for r in held.answers["slow"]]
        runs_ms = [r.json()["meta"]["compute_ms"] for r in held.answers["slow"]]
        # (slow_chain's batches cost in proportion to their size: a batch of 2 took 2.6
        # runs alone; 1.5: the margin between the scheduler's measure and compute_ms)
        sliced = max(sizes) * min(ms / n for n, ms in zip(sizes, runs_ms)) <= 1.5 * slice_ms
        late = any(r.status_code == 504 for r in held.answers["honest"])
        if not (late and sliced and max(runs_ms) > 1.5 * slice_ms):
            break
    else:
        pytest.skip(f"the machine slowed under the test three times (slow batches of {max(runs_ms):.0f} ms, the slice "
                    f"{slice_ms:.0f} ms): no fair time left to test")
    assert sliced, (sizes, runs_ms)
    for r in held.answers["honest"]:
        assert r.status_code == 200, (r.text[:300], sizes, runs_ms)
        np.testing.assert_allclose(np.array(r.json()["jacobian"]["data"]), np.diag(np.cos([0.5, 1.0])), rtol=1e-6)
    # Batching still works where two fit the slice: the scheduler costs a batch of two at
    # twice its key's last run alone (``BatchStats.cost``, one size seen), so a run alone
    # that took under half the slice, with two or more of its key still queued, must be
    # followed by a batch: of runs all alone, only the last two may have been that quick.
    # Judged from the runs' own times, not the measure before the test: on CI's four
    # workers on two cores a 0.34 s Jacobian took over 0.5 s each time under the test, and
    # every batch rightly held one (``1 > 1``).
    quick = sum(ms < 0.45 * slice_ms for ms in runs_ms)
    assert max(sizes) > 1 or quick <= 2, (sizes, runs_ms, each)


def test_a_client_that_fills_the_queue_gives_a_place_to_another(server: str) -> None:
    """One client could take every place of an engine's queue (MAX_QUEUE): every other
    client's request was a 429 until its jobs drained. Now, the queue full, another
    client's request takes the place of the newest queued request of the client holding
    the most (which is answered 429, Retry-After, saying so); the client holding the most
    is refused as before, and a lone client still uses the whole queue."""
    with _Held(server) as held:
        held.add("hostile", *SIN, HOSTILE, count=MAX_QUEUE - 1)  # (with the holder: the queue is full)
        refused = _post(server, *SIN, HOSTILE)
        problem = assert_problem(refused, 429, "overloaded")
        assert problem["detail"].startswith(f"the engine holds {MAX_QUEUE} requests"), problem
        assert refused.headers["retry-after"] == "1"
        held.add("honest", *SIN, HONEST, timeout_s=30, depth=MAX_QUEUE)
        deadline = time.monotonic() + 30  # (the one pushed out is answered at once)
        while not any(r.status_code == 429 for r in held.answers["hostile"]):
            assert not held.answers.get("honest") and time.monotonic() < deadline, held.answers  # (before: a 429)
        pushed = [r for r in held.answers["hostile"] if r.status_code == 429]
        assert len(pushed) == 1, held.answers
    problem = assert_problem(pushed[0], 429, "overloaded")
    assert problem["detail"] == (f"the engine's queue is full (limit {MAX_QUEUE}) and this client held {MAX_QUEUE - 1} "
                                 "of its places: its newest request gave its place to another client's; retry shortly")
    assert pushed[0].headers["retry-after"] == "1"
    honest = held.answers["honest"][0]
    assert honest.status_code == 200, honest.text[:300]
    np.testing.assert_allclose(np.array(honest.json()["jacobian"]["data"]), np.diag(np.cos([0.5, 1.0])), rtol=1e-6)
    assert sum(r.status_code == 200 for r in held.answers["hostile"]) == MAX_QUEUE - 2
