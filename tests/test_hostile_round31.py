"""Red team, round thirty-one: hostile functions against the server's other processes
by the calls no Landlock scope covers (limits, priorities, scheduling, affinity), and
against the front end through the engine's own connection to it.

Each case names what a user saw before. One real server for the file (one front end,
a spare); the functions are in tests/hostile36_functions.py, each misbehaving only on
the input 666 (round 11's ``_armed``), the second input picking how.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import resource
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from jacobian_service import ipc
from jacobian_service.engine_client import RemoteEngines
from jacobian_service.procfs import children
from jacobian_service.registry import FunctionSpec, Input
from jacobian_service.settings import Settings
from jacobian_service.supervision import Channel
from jacobian_service.types import Call, JobInfo, Result

from ._fault_support import _log_saying, back_within, wait_spare
from .conftest import assert_problem, live_server
from .test_engine_client import _Connection
from .test_hostile_round10 import _cmdline, _front_ends

FUNCTIONS = "jacobian_service.examples,tests.hostile36_functions"
X = [0.25, -1.0, 2.0]


@pytest.fixture(scope="module")
def small_fs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path | None]:
    """A file system of 96 MiB (a tmpfs, where this user may mount one; else None) for
    the server's temporary directory, its run directory's and its functions', for a
    function to fill."""
    where = tmp_path_factory.mktemp("small-fs")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96m", "tmpfs", str(where)],
                             capture_output=True).returncode == 0
    yield where if mounted else None
    if mounted:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


@pytest.fixture(scope="module")
def server(small_fs: Path | None) -> Iterator[tuple[str, subprocess.Popen]]:
    with contextlib.ExitStack() as stack:
        with pytest.MonkeyPatch.context() as mp:  # only while it starts: the server keeps its environment
            if small_fs is not None:
                mp.setenv("TMPDIR", str(small_fs))
            # HANG_GRACE_S: an engine holding a cancelled request past it is replaced.
            # ENGINE_MAX_TMP_BYTES past the file system's size: the disk watch (round 52)
            # recycles an engine whose TMPDIR fills it, and the space came back within 0.1 s;
            # here the disk stays full, as when a function fills it from a file the watch
            # does not count (outside its own TMPDIR), and the rest of the service is tested.
            served = stack.enter_context(live_server(FUNCTIONS=FUNCTIONS, WORKERS=1, WARMUP="false",
                                                     QUARANTINE_AFTER=100, REQUEST_TIMEOUT_S=20, HANG_GRACE_S=1,
                                                     ENGINE_MAX_TMP_BYTES=1 << 40))
        yield served


def _attack(url: str, function: str, case: int) -> httpx.Response:
    body = {"inputs": [{"dtype": "float64", "shape": [3], "data": [666.0, float(case), 0.0]}]}
    return httpx.post(f"{url}/v1/functions/{function}/evaluate", json=body, timeout=30)


def _honest(url: str) -> None:
    """Another client's Jacobian, on a connection of its own (a new one: the front end
    must still accept), compared with cos's."""
    r = httpx.post(f"{url}/v1/functions/sin/jacobian", timeout=30,
                   json={"inputs": [{"dtype": "float64", "shape": [3], "data": X}]})
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(r.json()["jacobian"]["data"], np.diag(np.cos(X)), rtol=1e-12)


def _standing(pid: int) -> tuple:
    """What the attacks would change of a process: its limits, nice, policy, affinity."""
    limits = tuple(resource.prlimit(pid, r) for r in (resource.RLIMIT_NOFILE, resource.RLIMIT_CPU, resource.RLIMIT_AS))
    return limits, os.getpriority(os.PRIO_PROCESS, pid), os.sched_getscheduler(pid), os.sched_getaffinity(pid)


def test_a_function_cannot_limit_renice_or_pin_a_front_end_or_the_spare(server) -> None:
    """Landlock's scope keeps a function's signals off the front ends and the spare, and
    the seccomp filter its limits and priorities off serve; nothing kept them off the
    others. A function that found the front end in /proc (serve's child) and lowered its
    open-file limit to 12 (``resource.prlimit``) left it accepting no connection: every
    client hung, for good, with nothing in the log; a CPU limit of 1 s ended it (its
    clients' connections dropped), an address-space limit failed its allocations,
    SCHED_IDLE, nice 19 or one core starved it; the spare's limits and priority went to
    the engine it became. Now only the engine itself is their target: each attack is the
    culprit's 500 ``function_error`` (EPERM), or for the scheduler's calls (SCHED_IDLE,
    affinity) a success that did nothing (tests/test_review_round2.py: why), the targets
    are as they were, and a client
    calling meanwhile, and after, gets its answer."""
    url, proc = server
    (front_end,) = _front_ends(proc.pid)
    wait_spare(url)  # (ready before its spare is: the first test of the module looked too soon)
    spare = next(p for p in children(proc.pid) if b"--standby" in _cmdline(p))
    before = _standing(front_end), _standing(spare)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        for case in range(8):
            honest = pool.submit(_honest, url)
            r = _attack(url, "limits_the_server", case)
            if case in (3, 5):  # the scheduler's calls on another thread: answered as done, nothing done
                assert r.status_code == 200, (case, r.text)
                np.testing.assert_allclose(r.json()["output"]["data"], np.sin([666.0, case, 0.0]), rtol=1e-12)
            else:
                body = assert_problem(r, 500, "function_error")
                assert body["detail"] == "PermissionError: [Errno 1] Operation not permitted", (case, body)
            honest.result()
    assert (_standing(front_end), _standing(spare)) == before
    assert _front_ends(proc.pid) == [front_end]


def _peak_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fp:
        return next(int(line.split()[1]) << 10 for line in fp if line.startswith("VmHWM:"))


def test_a_frame_size_a_function_writes_on_its_connection_costs_the_front_end_no_memory(server) -> None:
    """A function that wrote on its engine's connection to the front end (its socket is
    in /proc/self/fd) the start of a message whose one frame is 1 GiB had the front end
    fill 1 GiB with zeros at once, for bytes that never came (16 GiB took the machine's
    memory; every client of that front end with it). Now the frame's pages are taken as
    its bytes arrive: the front end's peak memory stays where it was. The replies that
    follow on that connection are lost to the claim: the culprit's request gets its 504,
    the engine is replaced as hung, put down to the culprit, and the next client is
    answered."""
    url, proc = server
    (front_end,) = _front_ends(proc.pid)
    start, peak = len(proc.read_log()), _peak_rss(front_end)  # type: ignore[attr-defined]
    body = {"inputs": [{"dtype": "float64", "shape": [3], "data": [666.0, 30.0, 0.0]}]}
    r = httpx.post(f"{url}/v1/functions/claims_a_frame/evaluate", json=body, headers={"x-request-timeout": "1"},
                   timeout=30)
    assert_problem(r, 504, "timeout")
    assert _peak_rss(front_end) - peak < 256 << 20
    said = "engine 0 died: claims_a_frame hung"
    assert said in _log_saying(proc, said, start=start)
    _honest(url)
    assert _peak_rss(front_end) - peak < 256 << 20


@pytest.mark.asyncio
async def test_only_the_engine_a_request_went_to_answers_it() -> None:
    """Message ids count up per front end over all its engines (one per GPU). A function
    on engine 1 that wrote a reply on its own connection to the front end (its socket in
    /proc/self/fd) under the next ids had requests waiting on engine 0, other clients'
    and other functions', answered with what it wrote: a 200 with its numbers. Now a
    reply is taken only from the engine the request was sent to; the request waits for
    its own engine's answer. (Front end's bookkeeping with stand-in connections, as in
    tests/test_engine_client.py: this machine has no two GPUs for two engines.)"""
    spec = FunctionSpec("sin", None, (Input("x", shape=(2,)),))
    registry = {"functions": [spec.describe()], "devices": ["cuda:0", "cuda:1"]}
    front_end = RemoteEngines(Settings(), Path("."), Channel("", "", b"k" * 32), registry=registry)
    front_end._socks = [_Connection(), _Connection()]  # type: ignore[list-item]
    front_end._event({"t": "state", "quarantined": {}, "quarantines": 0, "engines": [
        {"index": i, "device": f"cuda:{i}", "generation": 1, "up": True, "ready": True, "restarts": 0, "spare": False,
         "pid": 100 + i, "ready_in": 0.1} for i in (0, 1)]})
    call = Call(spec, [np.zeros(2, np.float32)], ["float32"], deadline=time.monotonic() + 10)
    request = asyncio.create_task(front_end.run("evaluate", call, engine=0))
    msg_id = await front_end._socks[0].next_job(1)  # type: ignore[attr-defined]

    def reply(engine: int, value: np.ndarray) -> None:
        front_end._reply_handler(engine)(ipc.encode_reply(msg_id, Result(value=value), JobInfo(device=f"cuda:{engine}")))

    reply(1, np.full(2, 666.0, np.float32))
    await asyncio.sleep(0)
    assert not request.done(), request.result()
    reply(0, np.sin(np.zeros(2, np.float32)))
    result, _ = await asyncio.wait_for(request, 5)
    np.testing.assert_array_equal(result.value, np.zeros(2, np.float32))


def test_a_function_that_truncates_its_status_board_leaves_serve_serving(server) -> None:
    """The engine's status board is a file in the run directory, mapped by the engine
    and read through a map by the supervisor. A function that truncated it to nothing
    (``os.truncate``; the path is in /proc/self/maps) took ``serve`` down: its next
    read of the board was a SIGBUS, and every front end went with it. Now the
    supervisor reads the file (``pread``): the engine, which writes through its map,
    dies of the SIGBUS (its own function's doing, its request a retryable 503), is
    replaced, and the next client is answered by the same front end."""
    url, proc = server
    (front_end,) = _front_ends(proc.pid)
    start = len(proc.read_log())  # type: ignore[attr-defined]
    body = {"inputs": [{"dtype": "float64", "shape": [3], "data": [666.0, 0.0, 0.0]}]}
    r = httpx.post(f"{url}/v1/functions/truncates_its_board/evaluate", json=body, timeout=30)
    assert_problem(r, 503, "unavailable")
    said = "the engine process was killed by SIGBUS"
    assert said in _log_saying(proc, said, start=start)
    assert proc.poll() is None
    back_within(url, 15)
    _honest(url)
    assert _front_ends(proc.pid) == [front_end]


def _fill(url: str, case: int) -> httpx.Response:
    body = {"inputs": [{"dtype": "float64", "shape": [3], "data": [666.0, float(case), 0.0]}]}
    return httpx.post(f"{url}/v1/functions/fills_the_disk/evaluate", json=body, timeout=30)


def test_a_function_that_fills_the_disk_costs_no_front_end_or_engine_start(server, small_fs) -> None:
    """A function that filled the file system of its temporary directory (the run
    directory's: ``serve`` makes it there) ended the front end at its next request
    (SIGBUS: prometheus_client's sample files grow as holes, written through a map),
    and every front end started again the same way: the service down until the space
    came back. An engine started then (after a crash) died writing its memory budget
    and the registry there for the front ends to read (ENOSPC), and so did the next.
    Now the sample files' blocks are reserved before they are written (on a full disk
    the samples stay in memory, said in the log), and an engine that cannot write those
    files says so and serves: the front end answers every kind of request, the engine
    the function then crashes is replaced, and the next client is answered. (Last here:
    it fills the file system.)"""
    if small_fs is None:
        pytest.skip("no tmpfs could be mounted here for a function to fill")
    url, proc = server
    (front_end,) = _front_ends(proc.pid)
    try:
        r = _fill(url, 0)
        assert r.status_code == 200, r.text
        assert os.statvfs(small_fs).f_bavail == 0
        _honest(url)
        for function, endpoint in (("sum_sin", "hessian"), ("softmax", "evaluate"), ("softmax", "jvp")):
            body = {"inputs": [X]} if endpoint != "jvp" else {"inputs": [X], "tangents": X}
            r = httpx.post(f"{url}/v1/functions/{function}/{endpoint}", json=body, timeout=30)
            assert r.status_code == 200, (function, endpoint, r.text)
        assert httpx.get(f"{url}/metrics", timeout=30).status_code == 200
        assert "its samples are kept in memory from now on" in proc.read_log()  # type: ignore[attr-defined]
        start = len(proc.read_log())  # type: ignore[attr-defined]
        body = assert_problem(_fill(url, 1), 500, "function_error")
        assert "while running this request; the engine was restarted" in body["detail"], body
        back_within(url, 15)
        _honest(url)
        assert _front_ends(proc.pid) == [front_end]
        assert "SIGBUS" not in proc.read_log()[start:]  # type: ignore[attr-defined]
    finally:
        for name in os.listdir(small_fs):
            if name.startswith("filler-"):
                os.unlink(small_fs / name)
