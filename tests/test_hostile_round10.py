"""Red team, round ten: what hostile functions did to the server's other processes.

One server for the module (a start costs ~3 s); each case names what a user saw before.
The functions are in tests/hostile10_functions.py; each misbehaves only on the input 666.
"""

from __future__ import annotations

import io
import os
import resource
import signal
import subprocess
import sys
import time
from typing import Iterator

import httpx
import numpy as np
import pytest
from jacobian_service.confinement import confiner, landlock_abi
from jacobian_service.procfs import children, stopped

from ._fault_support import MARKS, _log_complete, _log_saying
from .conftest import assert_problem, live_server

FUNCTIONS = "jacobian_service.examples,tests.hostile10_functions"
X = [0.5, 1.0, 2.0]
# Where the kernel has Landlock's signal scope (Linux 6.12+ with Landlock on), a function
# reaches no process but its engine's own; elsewhere the seccomp filter keeps it off serve.
LANDLOCK = landlock_abi() >= 6


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, subprocess.Popen]]:
    # HANG_GRACE_S: a front end stopped by a signal is resumed after it.
    with live_server(FUNCTIONS=f"{FUNCTIONS},{MARKS}", WORKERS=1, QUARANTINE_AFTER=2, REQUEST_TIMEOUT_S=20,
                     HANG_GRACE_S=1) as served:
        yield served


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    # One client: a new one per request (httpx.post) costs its set-up, ~0.2 s each on a busy machine.
    with httpx.Client(timeout=30) as c:
        yield c


def _attack(client: httpx.Client, url: str, case: int, pid: int = 0) -> httpx.Response:
    body = {"inputs": [{"dtype": "float64", "shape": [3], "data": [666.0, float(case), float(pid)]}]}
    return client.post(f"{url}/v1/functions/signals_the_server/evaluate", json=body)


def _refused(r: httpx.Response) -> None:
    body = assert_problem(r, 500, "function_error")
    assert body["detail"] == "PermissionError: [Errno 1] Operation not permitted", body
    assert "Traceback" not in r.text


def _sin_ok(url: str) -> None:
    r = httpx.post(f"{url}/v1/functions/sin/jacobian", json={"inputs": [X]}, timeout=30)
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(r.json()["jacobian"]["data"], np.diag(np.cos(X)), rtol=1e-6)


def _info(url: str) -> dict:
    return httpx.get(f"{url}/v1/info", timeout=10).json()


def _front_ends(serve: int) -> list[int]:
    return [pid for pid in children(serve) if _sid(pid) == os.getsid(serve) and b"spawn_main" in _cmdline(pid)]


def _sid(pid: int) -> int | None:
    """``pid``'s session, or None once it is gone: serve reaps its children (a front end
    a test killed, an engine that left) between the listing and this (ProcessLookupError
    failed round 37's socket-file test 2 of 9 times, three copies side by side)."""
    try:
        return os.getsid(pid)
    except ProcessLookupError:
        return None


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fp:
            return fp.read()
    except OSError:
        return b""


def _metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def test_a_function_cannot_signal_renice_pin_or_limit_serve(server, client) -> None:
    """``os.kill(os.getppid(), signal.SIGKILL)`` in a function killed ``serve``: the front
    ends stopped with it and every client lost the service (SIGTERM or SIGINT drained
    it, SIGSTOP froze its supervision; ``os.killpg`` of its group reached the front ends,
    and under pytest pytest itself; ``os.kill(-1, ...)`` every process of the user; a
    signal to any thread of serve ends serve as well). Renicing it, pinning it to one
    core or lowering its open-file limit slowed or broke every client. Now each is
    refused (EPERM, seccomp or Landlock): the function's own request is a 500 naming
    it, no engine restarts (the function raised, it did not crash), nothing changed."""
    url, proc = server
    serve = proc.pid
    pids, restarts = _info(url)["engine_pids"], _metric(url, "jacobian_service_engine_restarts{")
    nice, affinity = os.getpriority(os.PRIO_PROCESS, serve), os.sched_getaffinity(serve)
    files = resource.prlimit(serve, resource.RLIMIT_NOFILE)
    thread = max(int(t) for t in os.listdir(f"/proc/{serve}/task") if int(t) != serve)  # one serve had at start
    for case in range(11):
        _refused(_attack(client, url, case, thread))
        assert proc.poll() is None and not stopped(serve), f"case {case}"
    _sin_ok(url)
    assert os.getpriority(os.PRIO_PROCESS, serve) == nice
    assert os.sched_getaffinity(serve) == affinity
    assert resource.prlimit(serve, resource.RLIMIT_NOFILE) == files
    assert _info(url)["engine_pids"] == pids
    assert _metric(url, "jacobian_service_engine_restarts{") == restarts
    assert httpx.get(f"{url}/readyz", timeout=5).status_code == 200


@pytest.mark.skipif(not LANDLOCK, reason="Landlock's signal scope needs Linux 6.12+ with Landlock on")
def test_with_landlock_a_function_reaches_no_process_but_its_engines_own(server, client, tmp_path) -> None:
    """The front end, found in /proc as serve's child, killed by a function: the request
    itself and every other on that front end failed with a dropped connection; the spare
    killed: the next crash waited for a cold start; any other process of the user
    signalled (here a canary that notes a SIGURG). Now refused, as any process outside
    the engine and its own children."""
    url, proc = server
    mark = tmp_path / "canary"
    canary = subprocess.Popen([sys.executable, "-c", "import signal, sys, time\n"
                               "signal.signal(signal.SIGURG, lambda *a: open(sys.argv[1], 'w').close())\n"
                               "time.sleep(60)", str(mark)])
    try:
        front_ends = _front_ends(proc.pid)
        assert len(front_ends) == 1
        spare = [p for p in children(proc.pid) if b"--standby" in _cmdline(p)]
        for case in (11, 12, 13):
            _refused(_attack(client, url, case, canary.pid))
        time.sleep(0.2)
        assert not mark.exists(), "the canary was signalled"
        assert _front_ends(proc.pid) == front_ends
        assert [p for p in children(proc.pid) if b"--standby" in _cmdline(p)] == spare
        said = "its functions reach no process but its own (Landlock)"
        assert said in _log_saying(proc, said)
    finally:
        canary.kill()
        canary.wait()


@pytest.mark.skipif(not LANDLOCK, reason="only a Landlock domain keeps an engine from /proc/PID/fd")
def test_a_confined_engine_maps_the_front_ends_shared_memory(server) -> None:
    """Confined by Landlock, an engine may not open a front end's ``/proc/PID/fd``,
    where it mapped the front end's shared memory for inputs: every input of 16 KiB
    and more went through the socket instead (logged once per connection). The
    descriptor now comes with the offer."""
    url, proc = server
    x = np.linspace(0, 1, 50_000, dtype=np.float32)
    buf = io.BytesIO()
    np.save(buf, x)
    r = httpx.post(f"{url}/v1/functions/sin/evaluate", content=buf.getvalue(),
                   headers={"content-type": "application/x-npy", "accept": "application/x-npy"}, timeout=30)
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(np.load(io.BytesIO(r.content)), np.sin(x), rtol=1e-6)
    assert "cannot map the other side's shared memory" not in _log_complete(proc, url)  # (the engine's, on its way)


def test_a_front_end_stopped_by_a_signal_is_resumed(server) -> None:
    """Where a function can still reach a front end (no Landlock) and stops it
    (SIGSTOP), serve saw it alive and left it so: the connections the kernel gave its
    socket waited for ever. Now a front end stopped longer than HANG_GRACE_S is resumed."""
    url, proc = server
    (front_end,) = _front_ends(proc.pid)
    os.kill(front_end, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        _sin_ok(url)  # answered once it is resumed
        assert time.monotonic() - t0 < 15
        assert not stopped(front_end)
    finally:
        os.kill(front_end, signal.SIGCONT)
    assert "was stopped by a signal" in _log_saying(proc, "was stopped by a signal")


def test_metrics_files_a_function_wrote_over_leave_metrics_answering(server, client) -> None:
    """A function that wrote junk over files of the metrics directory (every process's
    samples, ``PROMETHEUS_MULTIPROC_DIR``: here its engine's, and one of its own) made
    every later scrape of ``/metrics`` a 500 ``internal_error`` for as long as the
    server lived (an autoscaler on queue depth went blind). Now the files that do not
    read are left out, named once in the log, and the others are served. (Last here:
    the engine's counts are gone from now on.)"""
    url, proc = server
    r = client.post(f"{url}/v1/functions/misbehaves/evaluate",
                    json={"inputs": [{"dtype": "float64", "shape": [3], "data": [666.0, 20.0, 0.0]}]})
    assert r.status_code == 200, r.text
    for _ in range(2):
        r = client.get(f"{url}/metrics")
        assert r.status_code == 200, r.text
        assert "jacobian_service_requests_total{" in r.text
    log = _log_saying(proc, "does not read (", "left out of /metrics")
    assert "does not read (" in log and "left out of /metrics" in log, log[-3000:]
    assert "unhandled error on GET /metrics" not in log


_PROBE = r"""
import ctypes, os, resource, signal, sys
serve, sibling = os.getppid(), int(sys.argv[1])
def tried(what, call):
    try:
        call()
        print(what, "ok")
    except PermissionError:
        print(what, "refused")
tried("kill serve", lambda: os.kill(serve, 0))
tried("kill serve's group", lambda: os.killpg(os.getpgid(serve), 0))
tried("kill everyone", lambda: os.kill(-1, 0))
libc = ctypes.CDLL(None, use_errno=True)
def tgkill(tgid, tid):
    if libc.tgkill(tgid, tid, 0) != 0:
        raise OSError(ctypes.get_errno(), "tgkill")
tried("tgkill serve", lambda: tgkill(serve, serve))
tried("pidfd serve", lambda: os.close(os.pidfd_open(serve)))
tried("nice serve", lambda: os.setpriority(os.PRIO_PROCESS, serve, os.getpriority(os.PRIO_PROCESS, serve)))
tried("nice serve's group", lambda: os.setpriority(os.PRIO_PGRP, os.getpgid(serve), os.getpriority(os.PRIO_PGRP, os.getpgid(serve))))
tried("affinity serve", lambda: os.sched_setaffinity(serve, os.sched_getaffinity(serve)))
tried("limit serve", lambda: resource.prlimit(serve, resource.RLIMIT_NOFILE, resource.prlimit(serve, resource.RLIMIT_NOFILE)))
tried("kill own group", lambda: os.killpg(0, 0))
tried("nice self", lambda: os.setpriority(os.PRIO_PROCESS, 0, os.getpriority(os.PRIO_PROCESS, 0)))
tried("kill sibling", lambda: os.kill(sibling, 0))
child = os.fork()
if child == 0:
    signal.pause()
tried("kill own child", lambda: os.kill(child, signal.SIGKILL))
os.waitpid(child, 0)
"""


def test_the_seccomp_filter_alone_keeps_an_engine_off_serve() -> None:
    """Where the kernel has no Landlock signal scope (before Linux 6.12), the seccomp
    filter is what stands between a function and ``serve``: this process plays serve,
    and a process confined as the supervisor confines an engine (without Landlock)
    tries each call on it. Its own group and children stay its own; a process outside
    that is not serve (here a sibling: the front ends, the spare) is the documented limit."""
    sibling = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], start_new_session=True)
    try:
        out = subprocess.run([sys.executable, "-c", _PROBE, str(sibling.pid)], capture_output=True, text=True,
                             timeout=30, start_new_session=True, preexec_fn=confiner(landlock=False))
    finally:
        sibling.kill()
        sibling.wait()
    said = dict(line.rsplit(" ", 1) for line in out.stdout.splitlines())
    assert said == {
        "kill serve": "refused", "kill serve's group": "refused", "kill everyone": "refused", "tgkill serve": "refused",
        "pidfd serve": "refused", "nice serve": "refused", "nice serve's group": "refused",
        "affinity serve": "refused", "limit serve": "refused",
        "kill own group": "ok", "nice self": "ok", "kill sibling": "ok", "kill own child": "ok",
    }, out.stdout + out.stderr


def test_control_messages_no_front_end_sends_do_not_stop_the_supervision(tmp_path) -> None:
    """The supervisor's control socket (front ends: "release this function") was a file
    in the run directory, which a function in an engine could reach too (pyzmq is
    there; without Landlock it still can, see test_hostile_round11). A message that was
    not JSON raised out of the supervisor's tick before it looked at the engines, and a
    stream of them kept every crash and hang from being seen (and every front end from
    hearing of one). Now such a message is dropped (and one not signed with the front
    ends' key), and a tick takes at most 64 of them before it watches the engines."""
    import orjson
    import zmq

    from jacobian_service.settings import Settings
    from jacobian_service.supervisor import Supervisor

    sup = Supervisor(Settings(), tmp_path)
    push = sup.ctx.socket(zmq.PUSH)
    try:
        push.connect(sup.channel.control)
        sup.quarantined["f"] = time.time() + 600
        for junk in (b"not json", b"[1]", b'{"t": "release"}', b'{"t": "release", "fn": 3}'):
            push.send(junk)
            push.send(sup.channel.sign(orjson.loads(junk)) if junk.startswith(b"{") else sup.channel.key + junk)
        push.send(sup.channel.sign({"t": "release", "fn": "f"}))
        deadline = time.monotonic() + 10
        while "f" in sup.quarantined:  # a tick raised JSONDecodeError at the first junk
            sup.tick()
            assert time.monotonic() < deadline, "the release never landed"
        # Each tick's take counted (every message read goes to _control) until the
        # flood's last word, a signed release, has landed: no tick took more than 64.
        # Not one tick after a fixed 0.2 s for the flood to arrive: a loaded machine's
        # zmq I/O thread could have brought fewer than 65 by then (the one tick took
        # them all, rightly), and the flood comes in a burst that an uncapped tick takes
        # whole (checked: with no cap, one tick took 201).
        taken: list[bytes] = []
        sup._control = lambda raw, control=sup._control: (taken.append(raw), control(raw))[-1]
        sup.quarantined["g"] = time.time() + 600
        for _ in range(200):
            push.send(b"x")
        push.send(sup.channel.sign({"t": "release", "fn": "g"}))
        while not sup.control.poll(100):
            pass
        per_tick = []
        deadline = time.monotonic() + 10
        while "g" in sup.quarantined:
            before = len(taken)
            sup.tick()
            per_tick.append(len(taken) - before)
            assert time.monotonic() < deadline, ("the flood's last word never landed", per_tick)
        per_tick = [n for n in per_tick if n]  # (ticks before more of it arrived took nothing)
        assert sum(per_tick) == 201 and max(per_tick) <= 64, per_tick  # one tick took the whole flood
    finally:
        push.close(linger=0)
        sup.pub.close(linger=0)
        sup.control.close(linger=0)
        sup.ctx.term()
