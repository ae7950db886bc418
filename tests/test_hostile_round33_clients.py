"""Hostile clients, round thirty-three: large evaluate answers and the stream budget's
room, and the early refusal of a request that cannot finish.

Each test names what a user saw before. They share one real server of this module (two
API keys: two clients; round 31's small stream budget), whose engines run on threads of
this process, so a test counts what the engine ran.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import pytest

from . import clients33_functions
from ._client_support import real_server
from .conftest import assert_problem
from .test_clients_round31 import _WIDE, HONEST, HOSTILE, X, _Held, _late_detail, _metric, _post, _slow_reader

OUTER = "/v1/functions/counted_outer/evaluate"


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with real_server(functions="jacobian_service.examples,tests.clients28_functions,tests.clients33_functions",
                     api_keys=f"{HOSTILE},{HONEST}", body_budget_bytes=32 << 20) as url:
        yield url


def _outer(r) -> np.ndarray:  # noqa: ANN001
    return np.array(r.json()["output"]["data"], dtype=np.float32)


def _calls() -> int:
    return len(clients33_functions.CALLS)


def _wait_until_nothing_held(server: str) -> None:
    deadline = time.monotonic() + 20  # (each slow answer's room comes back as its send fails)
    while _metric(server, "jacobian_service_stream_bytes_held") != 0:
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_a_large_evaluate_whose_room_came_back_while_it_waited_is_computed_once(server: str) -> None:
    """A front end sends a request's answer room with it, and an engine refuses a larger
    answer before computing it; a request refused for a room that came back while it
    waited is asked again (round 31). An evaluate's size is known only once it is
    computed: the engine computed it, refused it, and computed it again when asked
    again. Measured: a 7.84 MB evaluate asked while its client's two slow answers filled
    its share, queued behind another client's request, ran the function twice (a client
    could double the engine's work on each large evaluate). Now the engine answers what
    it computed and the front end holds it with the room there is now: one run,
    answered as torch computes it."""
    slow = [_slow_reader(server, _WIDE, HOSTILE) for _ in range(2)]
    before = _calls()
    with _Held(server) as held:
        try:
            held.add("queued", OUTER, _WIDE, HOSTILE)  # (its room: what the two slow answers leave)
        finally:
            for s in slow:
                s.close()
        _wait_until_nothing_held(server)
    [r] = held.answers["queued"]
    assert r.status_code == 200, r.text[:400]
    np.testing.assert_array_equal(_outer(r), np.outer(X, X))
    assert _calls() == before + 1  # (before: 2, the function run again for the same answer)


def test_a_large_evaluate_whose_room_is_still_taken_is_refused_in_the_budgets_words(server: str) -> None:
    """The other side: its client's share still full when it runs, it is refused 429 as
    the share refuses any answer, once computed (its size known only then; the refusal
    no longer says it was not computed)."""
    slow = [_slow_reader(server, _WIDE, HOSTILE) for _ in range(2)]
    before = _calls()
    try:
        with _Held(server) as held:
            held.add("queued", OUTER, _WIDE, HOSTILE)
    finally:
        for s in slow:
            s.close()
    problem = assert_problem(held.answers["queued"][0], 429, "overloaded")
    assert problem["detail"].startswith("this client holds 2 large answers ("), problem
    assert "before computing it" not in problem["detail"], problem
    assert held.answers["queued"][0].headers["retry-after"] == "1"
    assert _calls() == before + 1
    _wait_until_nothing_held(server)


def test_a_large_answer_queued_while_another_is_sent_is_refused_when_it_cannot_finish(server: str) -> None:
    """A request whose time left, when its turn comes, is less than what the last one
    like it took is refused then, before it is computed (round 31). A request whose
    answer could be held on the stream budget runs alone while anything is held there,
    and such a request skipped that check: a 7.84 MB evaluate queued behind another
    client's request while one large answer was being sent ran whole once its turn came
    with a fifth of a run's time left, the engine busy for an answer its front end had
    given up on: 504 "the request ran past its deadline", the function run. Now it is
    refused before it runs, 504 saying so; with its time it is computed as before."""
    for _ in range(2):  # (the engine learns what one costs: the second, warm)
        r = _post(server, OUTER, _WIDE, HOSTILE)
        assert r.status_code == 200, r.text[:300]
    each_s = r.json()["meta"]["compute_ms"] / 1e3
    timeout_s = 2.0 + each_s
    slow = _slow_reader(server, _WIDE, HONEST)  # (a large answer held: the request runs alone)
    try:
        before = _calls()
        with _Held(server) as held:
            held.add("late", OUTER, _WIDE, HOSTILE, timeout_s=timeout_s)
            queued = time.monotonic()  # (its deadline: at most this plus its timeout)
            # Its turn comes with at most 0.4 of what one run took left.
            time.sleep(max(0.0, queued + timeout_s - 0.4 * each_s - time.monotonic()))
        [late] = held.answers["late"]
        detail = _late_detail(late)  # (the engine's refusal, or the front end's deadline first)
        # With its time: computed, once the engine has had the late one's turn (queued first).
        r = _post(server, OUTER, _WIDE, HOSTILE, timeout_s=30)
        assert r.status_code == 200, r.text[:300]
        np.testing.assert_array_equal(_outer(r), np.outer(X, X))
        assert _calls() == before + 1, (_calls() - before, detail)  # the late one never called
    finally:
        slow.close()
    _wait_until_nothing_held(server)
