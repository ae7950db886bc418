"""What the engine-fault tests share (tests/test_engine_faults*.py, and the GPU ones):
the fault functions' settings, the checks a test makes of a real server (a function's
answer, the engine back, its restarts and quarantines) and the process helpers.
tests/test_engine_faults.py names what its files hold."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
from typing import Any, Callable, Iterator

import httpx
import numpy as np
import pytest
from jacobian_service.procfs import descendants

from .conftest import Served, assert_problem

FUNCTIONS = "jacobian_service.examples,tests.fault_functions"
ARMED = {"inputs": [[666.0, 1.0]]}
# A request that must succeed gets the server's 30 s: a busy machine (a new spare
# importing torch beside the engine) may stall it past a short deadline. A hang is cut
# at 2 s: the server's own deadline where the test is about it, else the client's
# (HANG below), which the engine and the supervisor keep just the same.
# On the CPU on a GPU host too: issue 9's restart goal (5 s) is the CPU's, and a cold
# start there adds CUDA's; tests/test_gpu_processes.py runs the faults on CUDA.
# HANG_GRACE_S: each hang here waits its deadline plus this before the kill; no request
# that must succeed comes near its deadline, so a short one costs nothing.
SETTINGS = dict(FUNCTIONS=FUNCTIONS, REQUEST_TIMEOUT_S=30, HANG_GRACE_S=0.5, QUARANTINE_AFTER=2, WORKERS=1, DEVICE="cpu")
HANG = {"X-Request-Timeout": "2"}
# For the planned restarts (an engine over a limit, recycled), which strike nobody: one
# strike would quarantine the function, which the test sees.
NOT_STRUCK = {**SETTINGS, "QUARANTINE_AFTER": 1}

def sin_ok(url: str) -> None:
    t0 = time.monotonic()
    r = httpx.post(f"{url}/v1/functions/sin/jacobian", json={"inputs": [[0.5, 1.0]]}, timeout=60)
    assert_sin_jacobian(r, [0.5, 1.0], f"after {time.monotonic() - t0:.2f} s: ")

def assert_sin_jacobian(r: httpx.Response, x: list[float], context: str = "") -> None:
    """200 and sin's Jacobian at ``x`` (every function here serves sin when not armed,
    or when armed only to leave something behind)."""
    assert r.status_code == 200, context + r.text
    np.testing.assert_allclose(r.json()["jacobian"]["data"], np.diag(np.cos(x)), rtol=1e-6)

def wait_spare(url: str, seconds: float = 60.0) -> None:
    """Until the warm spare engine waits beside the engine (the steady state of a
    server with ENGINE_STANDBY): a restart is then a promotion, not a cold start."""
    t0 = time.monotonic()
    while httpx.get(f"{url}/v1/info", timeout=5).json()["spares"] != [True]:
        assert time.monotonic() - t0 < seconds, f"no warm spare within {seconds} s"
        time.sleep(0.1)

def back_within(url: str, seconds: float) -> float:
    """Seconds until /readyz says 200 again (fails past ``seconds``; a connection refused
    or cut meanwhile is one more look)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return time.monotonic() - t0
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    pytest.fail(f"the engine was not back within {seconds} s")

def wait_restarts(url: str, count: int, seconds: float) -> None:
    t0 = time.monotonic()
    while restarts(url) < count:
        assert time.monotonic() - t0 < seconds, f"no engine restart within {seconds} s"
        time.sleep(0.05)

def restarts(url: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("jacobian_service_engine_restarts{"))

def quarantines(url: str) -> float:
    """Functions quarantined since the server started (the supervisor's count)."""
    text = httpx.get(f"{url}/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("jacobian_service_quarantines "))

def _a_crash_costs_only_its_request(served: Served, name: str, standby: bool) -> None:
    """With a spare (promoted) and without (a cold start: a torch import and a warm-up)."""
    url, proc = served.url, served.proc
    before = restarts(url)
    assert httpx.post(f"{url}/v1/functions/{name}/jacobian", json={"inputs": [[0.5, 1.0]]}).status_code == 200
    r = httpx.post(f"{url}/v1/functions/{name}/jacobian", json=ARMED, timeout=30)
    body = assert_problem(r, 500, "function_error")
    assert "Traceback" not in r.text
    assert "while running this request; the engine was restarted" in body["detail"]
    # While it restarts, requests get 503 with the supervisor's estimate of when it is
    # back as Retry-After, so a client's retry lands in time: a warm spare's take-over
    # (a second), or a cold start's measured length (a busy machine's may pass 10 s).
    early = httpx.post(f"{url}/v1/functions/sin/jacobian", json={"inputs": [[0.5, 1.0]]}, timeout=30)
    if early.status_code == 503:
        assert_problem(early, 503, "unavailable")
        assert 1 <= int(early.headers["retry-after"]) <= (2 if standby else 30)
        assert back_within(url, int(early.headers["retry-after"]) + 2.0) >= 0
    assert back_within(url, 5.0) < 5.0
    sin_ok(url)
    assert restarts(url) == before + 1
    assert proc.poll() is None  # the server itself never went down

def _a_process_a_function_detached_stops_when_the_server_is_killed_outright(served: Served, starter: str) -> None:
    """SIGKILL to ``serve`` after a function detached a process (a session of its own;
    the classic double fork): it was ``serve``'s, its subreaper, or its engine's child,
    and went to init with nobody left to kill it, for good. The engine is now the
    subreaper of what its functions start, and kills it as it stops with its parent.
    (Last in its class: it ends the class's server.)"""
    import signal

    with _detached_sleeper(served.url, served.pidfile, starter) as sleeper:
        os.kill(served.proc.pid, signal.SIGKILL)
        _wait_gone(sleeper, 10, "the function's detached process outlived a server killed outright")

def _wait_gone(pid: int, seconds: float, why: str) -> None:
    deadline = time.monotonic() + seconds
    while _alive(pid):
        assert time.monotonic() < deadline, why
        time.sleep(0.05)

def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False

@contextlib.contextmanager
def _detached_sleeper(url: str, pidfile: Any, starter: str = "starts_a_detached_sleeper") -> Iterator[int]:
    """A process the function started in a session of its own (``start_new_session``: a
    helper daemon), out of reach of its engine's group kill; killed here if it outlives
    the test."""
    assert_sin_jacobian(httpx.post(f"{url}/v1/functions/{starter}/jacobian", json=ARMED, timeout=30),
                        ARMED["inputs"][0])
    sleeper = int(pidfile.read_text())
    try:
        assert _alive(sleeper)
        yield sleeper
    finally:
        if _alive(sleeper):
            os.kill(sleeper, 9)

def _sleepers(pid: int) -> list[int]:
    """``pid``'s descendants that run ``sleep`` (a daemon is its engine's child)."""
    found = []
    for kid in descendants(pid):
        try:
            if _cmdline(kid).startswith(b"sleep"):
                found.append(kid)
        except (FileNotFoundError, ProcessLookupError):  # gone just now (ESRCH when it went mid-read)
            continue
    return found

def _cmdline(pid: int) -> bytes:
    with open(f"/proc/{pid}/cmdline", "rb") as fp:
        return fp.read()

def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fp:
        return next(int(l.split()[1]) for l in fp if l.startswith("VmRSS:")) / 1024

def _oom_score_adj(pid: int) -> int:
    with open(f"/proc/{pid}/oom_score_adj") as fp:
        return int(fp.read())

def _established_on(port: int, state: str = "01") -> set[int]:
    """Socket inodes of the TCP sockets on local port ``port`` in ``state`` (01:
    established, 0A: listening)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as fp:
                lines = fp.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == state:
                inodes.add(int(fields[9]))
    return inodes

def _socket_inodes(pid: int) -> set[int]:
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            out.add(int(target[8:-1]))
    return out


def _log_until(proc: Any, start: int, pattern: str | Callable[[str], bool], within: float = 10.0) -> str:
    """Serve's log from ``start`` on, once ``pattern`` (a regular expression or the very
    text, or a test of the log) is in it. The text too: a line passed as it is read,
    ``(sin)`` or ``[0.5]`` in it, matched no line as a regular expression, and each such
    wait ran its whole ``within`` out before the test's own ``in`` found the line."""
    found = pattern if callable(pattern) else lambda log: pattern in log or re.search(pattern, log) is not None
    deadline = time.monotonic() + within
    while True:
        log = proc.read_log()[start:]  # type: ignore[attr-defined]
        if found(log) or time.monotonic() > deadline:
            return log
        time.sleep(0.1)


@contextlib.contextmanager
def supervisor_of_a_dead_engine(tmp_path: Any, **settings: Any) -> Iterator[tuple[Any, Any, subprocess.Popen]]:
    """A real ``Supervisor`` (no fork server, no warm-ups; ``settings`` beside) whose one
    engine's process has exited: its reading of a death (``_died``) and of the front
    ends' signed words, in-process. Yields the supervisor, its engine and that process."""
    from jacobian_service.settings import Settings
    from jacobian_service.supervisor import Supervisor, _Engine

    sup = Supervisor(Settings(engine_fork_server=False, warmup=False, **settings), tmp_path)
    try:
        proc = subprocess.Popen([sys.executable, "-c", "pass"], start_new_session=True)
        proc.wait()
        engine = _Engine(0, "cpu", proc=proc, was_ready=True)
        sup.engines = [engine]
        yield sup, engine, proc
    finally:
        sup.pub.close(linger=0)
        sup.control.close(linger=0)
        if getattr(sup, "held_inbox", None) is not None:
            sup.held_inbox.close()
        sup.ctx.term()


# The module that ``_log_complete`` needs the server to serve beside the test's own.
MARKS = "tests.timing4_functions"
_marks = iter(range(1, 1 << 30))


def _log_complete(proc: Any, url: str, start: int = 0, within: float = 30.0) -> str:
    """Serve's log from ``start`` on, once it holds every line the engine wrote for the
    requests answered before this call (the server serves ``MARKS``): a check that a
    line is NOT in the log, made on one read, passed wrongly when the line was still
    on its way through serve's output relay (a loaded machine's seconds). Here the
    engine writes a mark through its own logger, the same pipe, after all of them,
    and the log is read once the mark is in it."""
    # One per call and per xdist worker, whole and under 2**24 (float32, the input's
    # dtype, holds it exactly), and no warm-up's input.
    mark = float(1_000_000 + next(_marks) * 1000 + os.getpid() % 1000)
    r = httpx.post(f"{url}/v1/functions/logs_a_mark/evaluate", json={"inputs": [[mark]]}, timeout=60)
    assert r.status_code == 200, r.text
    log = _log_until(proc, start, lambda log: f"log mark {mark!r}" in log, within)
    assert f"log mark {mark!r}" in log, f"the engine's mark {mark!r} never reached the log: {log[-3000:]}"
    return log


@contextlib.contextmanager
def engine_lives_through(url: str, within: float = 10.0) -> Iterator[int]:
    """The engine ``/v1/info`` names (its pid, once a live one is named), asserted alive
    when the block ends: that it did not die meanwhile, known at once, where the
    supervisor's "died" line comes at its next tick, on a loaded machine's time (a
    check that "died" is not in the log could come first, and pass wrongly)."""
    deadline = time.monotonic() + within
    while not ((pid := httpx.get(f"{url}/v1/info", timeout=30).json()["engine_pids"][0]) and _alive(pid)):
        assert time.monotonic() < deadline, "no live engine named in /v1/info"
        time.sleep(0.05)
    yield pid
    assert _alive(pid), f"engine {pid} died"


def _log_saying(proc: Any, *lines: str, start: int = 0, times: int = 1, within: float = 10.0) -> str:
    """Serve's log from ``start`` on, once each of ``lines`` is in it ``times`` times: an
    engine's lines reach it through serve's output relay, on their own time (a loaded
    machine's seconds), after what the test saw happen; one ``read_log()`` (at most ~1 s
    for the log to settle) missed them. The caller asserts on what it returns."""
    return _log_until(proc, start, lambda log: all(log.count(line) >= times for line in lines), within)
