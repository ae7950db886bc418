"""Red team, round thirteen: what a hostile function returns or raises runs code in the
engine after the function is done, what it leaves set costs later functions, and a hang
only the front ends see is put down to the function that hangs.

One server for the module (two front ends: a hang's requests may come through either),
each case naming what a user saw before. The functions are in tests/hostile13_functions.py;
each misbehaves only on the input 666, the second input picking how.
"""

from __future__ import annotations

import concurrent.futures
import io
import os
import re
import subprocess
import time
from contextlib import closing
from types import SimpleNamespace
from typing import Iterator

import httpx
import numpy as np
import pytest

from ._fault_support import _log_saying, _log_until
from .conftest import assert_problem, live_server
from .test_hostile_round11 import (  # round 11's: the same functions' conventions
    _armed,
    _engine_pid,
    _replaced,
)

FUNCTIONS = "jacobian_service.examples,tests.hostile13_functions"
X = [0.5, 1.0, 2.0]


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, subprocess.Popen]]:
    # QUARANTINE_AFTER=1: one strike quarantines, so a strike on the wrong function shows.
    # WARMUP=false: the spare that takes over from a hung engine is ready sooner. An engine
    # holds ~1 GiB of address space once started.
    with live_server(FUNCTIONS=FUNCTIONS, WORKERS=2, WARMUP="false", QUARANTINE_AFTER=1, REQUEST_TIMEOUT_S=20,
                     HANG_GRACE_S=0.5, ENGINE_MEMORY_LIMIT_BYTES=3 << 30) as served:
        yield served


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=30) as c:
        yield c


def _sin_ok(client: httpx.Client, url: str) -> None:
    """Another client is served as before, and the service says it is ready."""
    r = client.post(f"{url}/v1/functions/sin/jacobian", json={"inputs": [X]})
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(r.json()["jacobian"]["data"], np.diag(np.cos(np.float32(X))), rtol=1e-6)
    assert client.get(f"{url}/readyz").status_code == 200


def _settled(client: httpx.Client, url: str, spare: bool) -> None:
    """Ready, and (``spare``) with a warm spare: a test that takes its engine down needs
    one, which the test before may have used (a new one warms up in seconds)."""
    deadline = time.monotonic() + 60
    while client.get(f"{url}/readyz").status_code != 200 or (
            spare and not all(client.get(f"{url}/v1/info").json()["spares"])):
        assert time.monotonic() < deadline, "not ready (with a warm spare) within 60 s"
        time.sleep(0.1)


# ------------------------------------------------------------ a hang seen only by the front ends


def _pinned(url: str) -> tuple[httpx.Client, str]:
    """A client on one connection, hence one front end, and which (its request ids' prefix)."""
    c = httpx.Client(timeout=30, limits=httpx.Limits(max_connections=1, max_keepalive_connections=1))
    return c, c.get(f"{url}/healthz").headers["x-request-id"][:16]


def _pair(url: str, same: bool) -> tuple[httpx.Client, httpx.Client]:
    """Two pinned clients, on one front end or on two (the kernel spreads connections)."""
    first, where = _pinned(url)
    for _ in range(64):
        other, there = _pinned(url)
        if (there == where) == same:
            return first, other
        other.close()
    raise AssertionError("the connections all went to one front end")


def test_a_hang_is_put_down_to_its_function_not_to_a_request_queued_behind(server, client) -> None:
    """A function hangs (its thread writing the engine's board idle, so that only the
    front ends' word finds the hang) with the default deadline, and a request of ``sin``
    with ``X-Request-Timeout: 1``, sent through another front end, waits behind it. The front end that cancelled ``sin``
    told the supervisor, naming ``sin``: ``sin`` was struck for the hang (here
    quarantined: every later ``sin`` a 503), the hung request got a retryable 503 as if
    it had only waited, and the function that hung went free. Now the oldest job the
    engine had not answered, of any front end, is the one struck (each front end tells the
    supervisor of its oldest), and its request is the 504; ``sin`` is served."""
    url, proc = server
    _settled(client, url, spare=True)
    before = _engine_pid(client, url)
    hung_client, behind_client = _pair(url, same=False)
    with closing(hung_client), closing(behind_client), concurrent.futures.ThreadPoolExecutor(1) as pool:
        hung = pool.submit(_armed, hung_client, url, "hangs_behind_its_board", 0)
        time.sleep(0.5)
        behind = behind_client.post(f"{url}/v1/functions/sin/jacobian", json={"inputs": [X]},
                                    headers={"x-request-timeout": "1"})
        r = hung.result()
    assert_problem(behind, 504, "timeout")
    detail = assert_problem(r, 504, "timeout")["detail"]
    assert detail.startswith("hangs_behind_its_board hung: the engine did not take a cancelled request"), detail
    _replaced(client, url, before, 30, "the hung engine was never replaced")  # (the spare takes over)
    _sin_ok(client, url)
    log = _log_saying(proc, "held a cancelled request of sin", "(in hangs_behind_its_board, the oldest job")
    assert "held a cancelled request of sin" in log and "(in hangs_behind_its_board, the oldest job" in log, log[-3000:]
    assert_problem(_armed(client, url, "hangs_behind_its_board", 0), 503, "function_quarantined")
    assert client.delete(f"{url}/v1/functions/hangs_behind_its_board/quarantine").status_code == 200


def test_the_word_of_one_front_end_names_its_oldest_job_not_the_cancelled_one() -> None:
    """Through one front end alone (``WORKERS=1``) the same hang struck ``sin``: the front
    end's word named the request it cancelled. Now it names its oldest job on that engine
    (its function and tag), cancelled or not, beside the cancelled request's function."""
    from jacobian_service.engine_client import (
        RemoteEngines,
        _Cancelled,
        _client_marks,
        _Pending,
    )
    from jacobian_service.supervision import Channel

    sent: list[bytes] = []
    loop_future = concurrent.futures.Future()  # a pending job: a future not done
    now = time.monotonic()
    front_end = SimpleNamespace(
        settings=SimpleNamespace(hang_grace_s=0.5), channel=Channel("", "", b"k" * 32),
        _control=SimpleNamespace(send=sent.append), _pids={0: 4242}, _told_oldest=set(),
        _socks={0: SimpleNamespace(count=lambda: None)},  # (its count, sent with the word: round 37)
        # the hang: sent 5 s ago with the default deadline, still waited for
        _pending={1: _Pending(loop_future, 0, "fe:1", now - 5.0, True, "hangs_behind_its_board", "client-a")},
        # queued behind it: sent 4 s ago, cancelled at its deadline 3 s ago
        _cancelled={2: _Cancelled(0, 4242, now - 3.0, now - 4.0, "fe:2", "sin", "client-a")},
    )
    RemoteEngines._tell_overdue(front_end, now)  # type: ignore[arg-type]
    words = [front_end.channel.verify(raw) for raw in sent]
    assert words == [{"t": "overdue", "from": os.getpid(), "engine": 0, "pid": 4242, "since": now - 3.0, "function": "sin",
                      "sent": now - 5.0, "tag": "fe:1", "hung": "hangs_behind_its_board", "given_up": ["fe:2"],
                      "clients": _client_marks({"client-a"})}], words


def test_the_supervisor_keeps_the_word_of_new_front_ends_once_old_ones_have_gone() -> None:
    """The supervisor keeps each front end's oldest job per engine, for at most
    ``_MAX_FRONT_ENDS`` front ends (a bound on what signed words make it hold). Front ends
    that were restarted (new pids) stayed counted: after that many, a new front end's word
    was dropped, and a hang whose job came through it was put down to a request queued
    behind. Now those silent for ``_OLDEST_FRESH_S`` make room."""
    import collections

    from jacobian_service import supervisor

    sup = SimpleNamespace(engines=[None], _oldest=collections.defaultdict(dict))
    told = supervisor.Supervisor._told_oldest
    for pid in range(supervisor._MAX_FRONT_ENDS):
        assert told(sup, {"engine": 0, "from": pid, "pid": 7, "sent": 1.0, "tag": "t", "function": "f"})
    new = {"engine": 0, "from": 99_999, "pid": 7, "sent": 2.0, "tag": "u", "function": "g"}
    told(sup, new)  # all still fresh: the bound holds
    assert 99_999 not in sup._oldest[0] and len(sup._oldest[0]) == supervisor._MAX_FRONT_ENDS
    for pid, entry in sup._oldest[0].items():  # ... and then those front ends went silent
        sup._oldest[0][pid] = (*entry[:4], entry[4] - supervisor._OLDEST_FRESH_S, *entry[5:])
    told(sup, new)
    assert list(sup._oldest[0]) == [99_999], len(sup._oldest[0])


# ------------------------------------------------------------ what later functions pay for


def test_a_raised_recursion_limit_is_put_back(server, client) -> None:
    """A function raised the recursion limit to a million and left it so; a later function
    of another user that recursed 100,000 levels through C and caught its RecursionError
    (as code that probes its depth does) overflowed the engine's stack instead: SIGSEGV,
    its request a 500 "the engine process was killed", and that function struck (here
    quarantined). Now the limit is put back after the batch, raised as lowered: the later
    function gets its RecursionError, and answers."""
    url, proc = server
    _settled(client, url, spare=False)
    before = _engine_pid(client, url)
    r = client.post(f"{url}/v1/functions/raises_recursion_limit/evaluate", json={"inputs": [X]})
    assert r.status_code == 200, r.text
    r = _armed(client, url, "recurses", 100_000)
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(r.json()["output"]["data"], np.sin([666.0, 100_000.0, 0.0]), rtol=1e-12)
    assert _engine_pid(client, url) == before
    _sin_ok(client, url)
    assert "raises_recursion_limit changed the recursion limit" in _log_until(proc, 0, re.escape("raises_recursion_limit changed the recursion limit"))  # type: ignore[attr-defined]


def test_address_space_reserved_and_kept_untouched_recycles_the_engine(server, client) -> None:
    """A function reserved all but 64 MiB of its engine's address-space cap
    (``ENGINE_MEMORY_LIMIT_BYTES``) in an untouched ``mmap`` kept in a global: no resident
    size counts it, nothing was said, and every later request of every function that
    needed room, here a 64 MiB ``.npy`` input to ``sin``, was a 507 ``out_of_memory`` in
    that engine until it restarted. Now address space kept reserved and untouched between
    requests past half the cap recycles the engine (no request lost, no one
    struck; the log names the function), and the request is served."""
    url, proc = server
    _settled(client, url, spare=True)
    before = _engine_pid(client, url)
    r = _armed(client, url, "reserves_address_space", 0)
    assert r.status_code == 200, r.text
    _replaced(client, url, before, 15, "the engine holding the reservation was never recycled")
    x = np.linspace(0, 1, 16 << 20, dtype=np.float32)
    body = io.BytesIO()
    np.save(body, x)
    r = client.post(f"{url}/v1/functions/sin/evaluate", content=body.getvalue(),
                    headers={"content-type": "application/x-npy", "accept": "application/x-npy"})
    assert r.status_code == 200, r.text[:500]
    np.testing.assert_allclose(np.load(io.BytesIO(r.content)), np.sin(x), rtol=1e-6)
    log = _log_saying(proc, "of address space reserved and untouched between requests", "grown most by reserves_address_space +")
    assert "of address space reserved and untouched between requests" in log, log[-3000:]
    assert "grown most by reserves_address_space +" in log, log[-3000:]
    r = client.post(f"{url}/v1/functions/reserves_address_space/evaluate", json={"inputs": [X]})
    assert r.status_code == 200, r.text  # not struck


def test_faulthandler_left_pointing_at_a_closed_file_is_turned_off(server, client) -> None:
    """A function enabled faulthandler on a file and closed it: for as long as the engine
    lived, a later function's crash had its traceback written to that descriptor number,
    by then whatever that function had opened (its own output file, a socket). Now
    faulthandler is put back after the batch as the engine started: off."""
    url, proc = server
    _settled(client, url, spare=False)
    detail = assert_problem(_armed(client, url, "reports_faulthandler", 0), 500, "function_error")["detail"]
    assert detail == "RuntimeError: faulthandler enabled: False", detail
    r = client.post(f"{url}/v1/functions/points_faulthandler_away/evaluate", json={"inputs": [X]})
    assert r.status_code == 200, r.text
    detail = assert_problem(_armed(client, url, "reports_faulthandler", 0), 500, "function_error")["detail"]
    assert detail == "RuntimeError: faulthandler enabled: False", detail
    assert "points_faulthandler_away changed faulthandler (enabled)" in _log_until(proc, 0, re.escape("points_faulthandler_away changed faulthandler (enabled)"))  # type: ignore[attr-defined]


# ------------------------------------------------------------ what it returns or raises runs code


# (function, case, endpoint) -> what the client gets: (status, the detail's start) or, for a
# 200, the aux it reads back. None: no aux (the output is checked).
_CASES = {
    ("hostile_aux", 1, "jacobian"): (500, "KeyboardInterrupt: from aux's __len__"),
    ("hostile_aux", 2, "jacobian"): (500, "SystemExit: 3"),
    ("hostile_aux", 3, "jacobian"): (500, "GeneratorExit: "),
    ("hostile_aux", 4, "jacobian"): (200, [1]),  # __index__ / __int__ hang: never called
    ("hostile_aux", 5, "jacobian"): (200, [2.5]),  # __float__ raises: never called
    ("hostile_aux", 6, "jacobian"): (500, "aux holds more than 1,000,000 items; return large data as a tensor"),
    ("hostile_raises", 1, "evaluate"): (500, "_StrExits: (its message could not be made: its __str__ raised)"),
    ("hostile_raises", 2, "evaluate"): (500, "_HugeStr: xxxx"),
    ("hostile_raises", 3, "evaluate"): (500, "ValueError: a"),  # its cause's cause is itself
    ("hostile_raises", 4, "evaluate"): (500, "ValueError: yyyy"),
    ("hostile_raises", 5, "jacobian"): (500, "KeyboardInterrupt: "),
    ("hostile_raises", 6, "jacobian"): (500, "GeneratorExit: "),
    ("hostile_subclass", 0, "evaluate"): (200, None),  # every torch call of it hangs
    ("hostile_subclass", 1, "jacobian"): (200, None),  # ... raises KeyboardInterrupt
    ("hostile_subclass", 2, "evaluate"): (200, None),  # ... ends the process
    ("hostile_subclass", 3, "evaluate"): (500, "KeyboardInterrupt: from __torch_dispatch__"),  # every op, as a wrapper
    ("hostile_subclass", 3, "jacobian"): (500, "KeyboardInterrupt: from __torch_dispatch__"),
    ("hostile_subclass", 4, "jacobian"): (500, "SystemExit: 2"),
}


def test_what_a_function_returns_or_raises_costs_only_its_own_request(server, client) -> None:
    """Aux whose ``__len__``/``__iter__`` raise BaseExceptions (KeyboardInterrupt,
    SystemExit, GeneratorExit) or whose numbers' ``__index__``/``__float__`` hang or raise;
    a 2-million-item list; exceptions whose ``__str__`` raises SystemExit or is 16 MB, whose cause is cyclic, or
    that are BaseExceptions; outputs of a tensor subclass whose every torch call hangs,
    raises or ends the process, or of a wrapper subclass whose every op raises
    KeyboardInterrupt or SystemExit (``__torch_dispatch__``): each is its own request's answer, a 500 whose detail is
    bounded or a 200, the engine the same process (nothing restarted, nothing struck,
    nothing hung), the log not grown by the huge messages, other clients served."""
    url, proc = server
    _settled(client, url, spare=False)
    before, log_before = _engine_pid(client, url), len(proc.read_log())  # type: ignore[attr-defined]
    for (function, case, endpoint), (status, says) in _CASES.items():
        r = _armed(client, url, function, case, endpoint)
        if status == 200:
            assert r.status_code == 200, (function, case, r.text)
            doc = r.json()
            if says is None:
                got = doc["output"]["data"] if endpoint == "evaluate" else np.diag(doc["jacobian"]["data"])
                want = np.sin([666.0, case, 0.0]) if endpoint == "evaluate" else np.cos([666.0, case, 0.0])
                np.testing.assert_allclose(got, want, rtol=1e-12)
            else:
                assert doc["aux"] == says, (function, case, doc)
        else:
            detail = assert_problem(r, 500, "function_error")["detail"]
            assert detail.startswith(says) and len(detail) <= 2000, (function, case, detail[:200])
        assert _engine_pid(client, url) == before, (function, case)
    _sin_ok(client, url)
    assert len(proc.read_log()) - log_before < 64 << 10  # type: ignore[attr-defined]
