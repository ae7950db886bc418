"""Red team, round forty-two: misbehaving inside a cross-client batch (one vmapped call).

The functions (tests/hostile42_functions.py) unwrap vmap's batched tensor to see every
member's input, so one member's input (666) makes the stacked call itself end the engine
or hang. Batch-mates queue behind ``holds42`` (1.5 s) and are stacked once two earlier
calls taught the engine the key's cost. One real server for the file (one engine and its
spare; a hang grace of 2 s; quarantine out of the way: each function misbehaves once).
"""

from __future__ import annotations

import re
import subprocess
import threading
import time
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import torch

from ._fault_support import _log_until
from ._spare_support import body
from .conftest import assert_problem, live_server

GOOD = [[0.5, 1.0, 2.0], [1.5, -1.0, 0.25]]
ARMED = [666.0, 0.0, 0.0]


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, subprocess.Popen]]:
    with live_server(FUNCTIONS="tests.hostile42_functions", WORKERS=1, QUARANTINE_AFTER=10, HANG_GRACE_S=2,
                     REQUEST_TIMEOUT_S=30) as served:
        yield served


def _post(url: str, function: str, x: list[float], timeout_s: float = 20.0) -> httpx.Response:
    return httpx.post(f"{url}/v1/functions/{function}/jacobian", json=body(*x), timeout=60,
                      headers={"X-Request-Timeout": f"{timeout_s:g}"})


def _as_the_sdk(url: str, function: str, x: list[float], timeout_s: float = 20.0) -> list[tuple[float, httpx.Response]]:
    """Each try (when, answer) until one is not a 503 ``unavailable`` (the SDK's retry)."""
    start, tries = time.monotonic(), []
    while True:
        r = _post(url, function, x, timeout_s)
        tries.append((time.monotonic() - start, r))
        if r.status_code != 503 or r.json()["code"] != "unavailable" or len(tries) == 40:
            return tries
        time.sleep(0.5)


def _batch(url: str, function: str, timeouts: list[float]) -> list[list[tuple[float, httpx.Response]]]:
    """GOOD[0], ARMED, GOOD[1] (with ``timeouts``), queued behind holds42 into one batch."""
    for x in GOOD:  # (a key runs alone until the engine knows its cost: then it is stacked)
        assert _as_the_sdk(url, function, x)[-1][1].status_code == 200  # (the last test's engine may be starting)
    answers: list = [None] * 3

    def send(i: int, x: list[float]) -> None:
        answers[i] = _as_the_sdk(url, function, x, timeouts[i])

    holder = threading.Thread(target=_post, args=(url, "holds42", GOOD[0]))
    holder.start()
    time.sleep(0.3)
    threads = [threading.Thread(target=send, args=(i, x)) for i, x in enumerate([GOOD[0], ARMED, GOOD[1]])]
    for t in threads:
        t.start()
    for t in [holder, *threads]:
        t.join()
    return answers


def _right(r: httpx.Response, x: list[float], f) -> None:
    assert r.status_code == 200, r.text
    expected = torch.func.jacrev(f)(torch.tensor(x, dtype=torch.float64)).numpy()
    np.testing.assert_allclose(np.asarray(r.json()["jacobian"]["data"]), expected, rtol=1e-12)


def test_a_hang_inside_a_batch_holds_no_batch_mate_to_its_own_deadline(server) -> None:
    """A batch runs to its last member's deadline (types.stacked_liveness), and the hang
    watch killed it there: one member's input (given 2 s) hung the stacked call, and its
    batch-mates, given 20 s for milliseconds of work, were each a 504 "ran past its
    deadline" at 20 s (measured 20.0 s; the engine hung until 25 s). Now a batch of
    several is hung past its earliest member's deadline plus the grace: the hanging
    member's caller gets its 504 at 2 s, the others a 503 at about 4 s, and their
    retry runs alone (the function isolated) and is answered as torch.func.jacrev."""
    url, proc = server
    start = len(proc.read_log())
    mate0, armed, mate2 = _batch(url, "hangs_in_batch42", [20.0, 2.0, 20.0])
    ((when, r),) = armed
    assert_problem(r, 504, "timeout")
    assert 1.9 < when < 6.0, when
    for tries, x in ((mate0, GOOD[0]), (mate2, GOOD[1])):
        first_when, first = tries[0]
        assert first_when < 12.0, (first_when, first.text)  # (before: 504 at 20 s)
        body_ = assert_problem(first, 503, "unavailable")
        assert body_["detail"] == "the engine restarted while this request waited; retry", body_
        _right(tries[-1][1], x, torch.sin)
    log = _log_until(proc, start, r"died: hangs_in_batch42 did not return by its deadline")
    assert "(running hangs_in_batch42 for 3 requests)" in log, log


@pytest.mark.parametrize("function, f", [("exits_in_batch42", torch.sin), ("exits_sparse42", torch.square)])
def test_a_crash_inside_a_batch_is_its_culprits_500_and_its_mates_answers(server, function, f) -> None:
    """One member's input ends the engine inside the stacked call (dense vmap, or a
    sparse batch's vmapped forward pass): the culprit is unknown, so every member gets a
    503 and the function runs alone from then on; the retries are answered, the
    culprit's by the 500 naming the crash (its engine the second to end, alone), never
    a batch re-run for ever (two engine deaths in all)."""
    url, proc = server
    start = len(proc.read_log())
    mate0, armed, mate2 = _batch(url, function, [20.0, 20.0, 20.0])
    assert_problem(armed[0][1], 503, "unavailable")
    body_ = assert_problem(armed[-1][1], 500, "function_error")
    assert body_["detail"] == ("the engine process exited with status 7 while running this request; "
                               "the engine was restarted"), body_
    for tries, x in ((mate0, GOOD[0]), (mate2, GOOD[1])):
        _right(tries[-1][1], x, f)
    log = _log_until(proc, start, rf"exited with status 7 \(running {function} for 1 requests\)")
    assert f"exited with status 7 (running {function} for 3 requests)" in log, log
    assert len(re.findall(r"engine 0 died: ", log)) == 2, log
    _right(_as_the_sdk(url, function, GOOD[0])[-1][1], GOOD[0], f)
