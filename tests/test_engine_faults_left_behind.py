"""Functions that leave something running when they return (a process, a thread, a
forked child, daemons, zombies), put down by the engine or ``serve``; the front ends
beside the engine (no torch, a socket each, started again). tests/test_engine_faults.py
says how the fault tests are laid out."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from typing import Any, ClassVar

import httpx
import pytest

from jacobian_service.procfs import children

from .conftest import CHILD_PYTHONPATH, assert_problem
from ._fault_support import (
    ARMED, FUNCTIONS, HANG, SETTINGS, _alive, _cmdline, _detached_sleeper, _established_on, _oom_score_adj, _rss_mib,
    _log_saying, _sleepers, _socket_inodes, _wait_gone, assert_sin_jacobian, back_within, engine_lives_through, restarts,
    sin_ok, wait_restarts,
)


class TestLeftBehind:
    """SETTINGS, with $FAULT_FORK_PIDFILE (``served.pidfile``): functions that leave
    something behind (a process or thread running, a forked child, daemons, zombies)
    that the engine or ``serve`` puts down, with a restart or without."""

    SERVER: ClassVar[dict[str, Any]] = {**SETTINGS, "QUARANTINE_AFTER": 1000}

    def test_a_process_left_spinning_is_killed_and_the_engine_goes_on(self, served):
        """A function that returns but leaves a process running took a core for good (one
        more at each call). Unlike a thread, a process can be stopped: the engine kills it,
        even out of its process group, and serves on without a restart.

        First in its class: the process is put down to the functions run in the second
        before it was found, and on a server that has served nothing yet that is this one
        alone."""
        url = served.url
        before = restarts(url)
        r = httpx.post(f"{url}/v1/functions/leaves_a_spinning_process/jacobian", json=ARMED, timeout=30)
        assert_sin_jacobian(r, [666.0, 1.0])
        child = int(served.pidfile.read_text())
        try:
            _wait_gone(child, 10, "the process left spinning still runs")
            assert (f"a process (pid {child}) that leaves_a_spinning_process left running after it returned used a "
                    "core; killed") in served.log()
            sin_ok(url)
            assert restarts(url) == before
        finally:
            if _alive(child):
                os.kill(child, 9)

    def test_a_thread_left_spinning_costs_its_engine_a_restart_not_every_later_request(self, served):
        """A function that returns but leaves a thread running Python took the GIL from the
        engine's thread for as long as the engine lived: every later request, of every
        function, ran about 6x slower. Such a thread cannot be stopped, so the engine,
        which names the function, restarts (a promotion); a thread left waiting is let be."""
        url, start = served.url, len(served.proc.read_log())
        before = restarts(url)
        for name in ("leaves_a_waiting_thread", "leaves_a_spinning_thread"):
            r = httpx.post(f"{url}/v1/functions/{name}/jacobian", json=ARMED, timeout=30)
            assert_sin_jacobian(r, [666.0, 1.0])
        wait_restarts(url, before + 1, 10)  # two windows of 1 s, then the queue drained
        back_within(url, 5.0)
        sin_ok(url)
        # Waited for: the engine said so before it left, through serve's output relay, on
        # its own time. Its line on the waiting thread, had there been one, came before
        # (its request ran first): in the log by then.
        spinning = "leaves_a_spinning_thread left a thread running after it returned, using a core"
        log = _log_saying(served.proc, spinning, start=start)
        assert spinning in log
        assert "leaves_a_waiting_thread left" not in log
        time.sleep(3)  # the promoted engine has no stray: it stays
        assert restarts(url) == before + 1

    def test_requests_queued_behind_a_hang_are_retryable_and_later_ones_succeed(self, served):
        url = served.url
        before = restarts(url)
        # A thread another function left (waiting, as one holding a lock the hung
        # function needs would): named beside the blamed function, which it may have hung.
        r = httpx.post(f"{url}/v1/functions/leaves_a_waiting_thread/jacobian", json=ARMED, timeout=30)
        assert r.status_code == 200, r.text
        results: list[httpx.Response] = []

        def other() -> None:
            results.append(httpx.post(f"{url}/v1/functions/sin/jacobian", json={"inputs": [[0.5, 1.0]]}, headers=HANG,
                                      timeout=30))

        crash = threading.Thread(target=lambda: httpx.post(f"{url}/v1/functions/sleeps/jacobian", json=ARMED,
                                                           headers=HANG, timeout=30))
        crash.start()
        time.sleep(0.3)
        others = [threading.Thread(target=other) for _ in range(8)]
        for t in others:
            t.start()
        for t in [crash, *others]:
            t.join()
        for r in results:  # never a 500: each ran, timed out in the queue, or was told to retry
            if r.status_code == 503:
                assert_problem(r, 503, "unavailable")
                assert r.headers["retry-after"]
            elif r.status_code != 200:
                assert_problem(r, 504, "timeout")
        wait_restarts(url, before + 1, 5)
        assert ("(running sleeps for 1 requests; threads left running by leaves_a_waiting_thread were alive)"
                in served.log()), served.log()[-3000:]
        back_within(url, 5.0)
        sin_ok(url)

    @pytest.mark.parametrize("layout", ["engine process", "in-process"])
    def test_a_forked_child_that_returns_into_the_engine_exits_there(self, layout, tmp_path, monkeypatch, make_client,
                                                                    request):
        """A function forked and both processes returned. The child went on running the
        engine's own code with copies of its sockets: in an engine process, a second engine
        reading the front ends' connections beside the first (a message read half by each
        breaks the connection) and answering their jobs; in-process, a copy of the server
        holding its port. The child now exits where it comes back into the engine."""
        x = [666.0, 1.0]
        with contextlib.ExitStack() as stack:
            if layout == "in-process":
                pidfile = tmp_path / "child.pid"
                monkeypatch.setenv("FAULT_FORK_PIDFILE", str(pidfile))
                post, served = make_client(functions=FUNCTIONS).post, None
            else:
                served = request.getfixturevalue("served_up")
                pidfile = served.pidfile
                post = stack.enter_context(httpx.Client(base_url=served.url, timeout=30)).post
            lives = engine_lives_through(served.url) if served is not None else contextlib.nullcontext()
            engine = stack.enter_context(lives)
            assert_sin_jacobian(post("/v1/functions/forks_and_returns/jacobian", json={"inputs": [x]}), x)
            deadline = time.monotonic() + 10
            while not pidfile.exists() or not pidfile.read_text():
                assert time.monotonic() < deadline
                time.sleep(0.05)
            child = int(pidfile.read_text())
            try:
                _wait_gone(child, 5, "the forked child lives on in the engine's code")
                for i in range(20):  # the one engine answers, whole and right
                    assert_sin_jacobian(post("/v1/functions/sin/jacobian", json={"inputs": [[0.5, float(i)]]}),
                                        [0.5, float(i)])
                if served is not None:  # (its death a fact at once, where the "died" line may be on its way)
                    assert _alive(engine), f"engine {engine} died"
                    assert "died" not in served.log()
            finally:
                if _alive(child):
                    os.kill(child, 9)

    def test_daemons_left_running_past_the_limit_are_killed_and_the_engine_goes_on(self, served_up):
        """A function that starts a daemon at every call (here 600 at once) left them to
        the server for as long as the engine lived, each holding a pid: enough of them use up
        a container's pids, and no process of the server can start again. Their parents
        exited; the engine, their subreaper, kills them past 512, and serves on."""
        url, proc = served_up.url, served_up.proc
        before = restarts(url)
        try:
            r = httpx.post(f"{url}/v1/functions/daemonizes_many/jacobian", json=ARMED, timeout=30)
            assert_sin_jacobian(r, ARMED["inputs"][0])
            deadline = time.monotonic() + 10
            while sleepers := _sleepers(proc.pid):
                assert time.monotonic() < deadline, f"{len(sleepers)} daemons still running"
                time.sleep(0.1)
            sin_ok(url)
            assert restarts(url) == before
            assert "over 512: " in served_up.log()
        finally:
            for pid in _sleepers(proc.pid):
                os.kill(pid, 9)

    def test_an_engine_whose_functions_leave_too_many_processes_is_recycled(self, served):
        """A function that starts 40 processes at each call and never waits for them: each
        stays a zombie, holding a pid, for as long as the engine lives. Past 512 the engine
        is recycled (its group killed, the zombies reaped), every request answered 200. A
        process another function started in a session of its own goes with the engine,
        instead of living on orphaned."""
        url = served.url
        before = restarts(url)
        with httpx.Client(base_url=url, timeout=30) as client:
            assert_sin_jacobian(client.post("/v1/functions/starts_a_detached_sleeper/jacobian", json=ARMED),
                                ARMED["inputs"][0])
            sleeper = int(served.pidfile.read_text())
            for call in range(16):  # 640 in all: past 512 by the 13th call
                for name, body in (("leaks_processes", ARMED), ("sin", {"inputs": [[0.5, 1.0]]})):
                    assert_sin_jacobian(client.post(f"/v1/functions/{name}/jacobian", json=body), body["inputs"][0],
                                        f"call {call + 1}, {name}: ")
        wait_restarts(url, before + 1, 10)
        try:
            _wait_gone(sleeper, 5, "a detached process outlived its recycled engine")
        finally:
            if _alive(sleeper):
                os.kill(sleeper, 9)
        log = served.log()
        assert "processes that functions started were alive or unreaped, over 512; started while these ran: " \
               "leaks_processes" in log, log[-3000:]  # (or sin: they ran in the same seconds)

    def test_a_process_a_function_started_in_its_own_session_stops_with_the_server(self, served_up):
        """The engines' group kill at shutdown cannot reach it: it outlived the server, for
        good. Orphaned as its engine stops, it now comes to ``serve``, a child subreaper,
        which kills what it has taken in once every engine has stopped. (Last in its
        class: it stops the class's server.)"""
        import signal

        with _detached_sleeper(served_up.url, served_up.pidfile) as sleeper:
            served_up.proc.send_signal(signal.SIGTERM)
            served_up.proc.wait(timeout=30)
            _wait_gone(sleeper, 5, "the function's detached process outlived the server")

class TestTwoFrontEnds:
    """Two front ends, one engine, no spare: for the tests that look at the front ends."""

    SERVER: ClassVar[dict[str, Any]] = {"FUNCTIONS": FUNCTIONS, "WORKERS": 2, "ENGINE_STANDBY": "false"}

    def test_running_front_ends_have_no_torch_loaded_and_stay_small(self, served, capsys):
        url, proc = served.url, served.proc
        sin_ok(url)
        kids = children(proc.pid)
        fronts = [p for p in kids if b"spawn_main" in _cmdline(p)]
        engines = [p for p in kids if b"engine.process" in _cmdline(p) and b"--standby" not in _cmdline(p)]
        assert len(fronts) == 2 and len(engines) == 1
        for pid in fronts:
            with open(f"/proc/{pid}/maps") as fp:
                maps = fp.read()
            assert "libtorch" not in maps and "/torch/" not in maps, "a front end has torch loaded"
        with open(f"/proc/{engines[0]}/maps") as fp:
            assert "libtorch" in fp.read()  # the check can see torch where it is
        rss = {"front end": [_rss_mib(p) for p in fronts], "engine": _rss_mib(engines[0])}
        with capsys.disabled():
            print(f"\nRSS MiB: front ends {[round(r) for r in rss['front end']]}, engine {rss['engine']:.0f}")
        assert max(rss["front end"]) < 200  # no torch: ~60-80 MiB; torch alone is ~300
        # Without ENGINE_MEMORY_LIMIT_BYTES the kernel's out-of-memory killer ends a
        # function that allocates without end: the engine is its first choice, the
        # processes that are not restarted keep what they inherited.
        adj = {pid: _oom_score_adj(pid) for pid in [proc.pid, *fronts, *engines]}
        inherited = _oom_score_adj(os.getpid())
        assert adj[engines[0]] == max(500, inherited)  # raised, never lowered
        assert {adj[p] for p in [proc.pid, *fronts]} == {inherited}

    def test_a_burst_of_keep_alive_connections_spreads_over_the_front_ends(self, served):
        """Each front end listens on its own socket (SO_REUSEPORT), so the kernel spreads
        new connections over them. With one shared socket, the front end that woke first
        accepted a whole burst and served it alone while the other idled."""
        import socket

        url, proc = served.url, served.proc
        port = int(url.rsplit(":", 1)[1])
        conns = [socket.create_connection(("127.0.0.1", port)) for _ in range(64)]  # the burst, all at once
        try:
            for c in conns:  # then a request on each, so every connection is accepted and served
                c.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
            for c in conns:
                c.settimeout(30)
                assert c.recv(4096).startswith(b"HTTP/1.1 200")
            fronts = [p for p in children(proc.pid) if b"spawn_main" in _cmdline(p)]
            listening = _established_on(port, state="0A")
            own = [_socket_inodes(p) & listening for p in fronts]
            # A listening socket each, none shared (the supervisor keeps them all for restarts).
            assert len(listening) == 2 and all(len(o) == 1 for o in own) and own[0] != own[1], (listening, own)
            established = _established_on(port)
            held = [len(_socket_inodes(p) & established) for p in fronts]
            assert sum(held) == 64, held
            assert min(held) >= 16, f"connections per front end: {held}"  # ~32 each; 16 is 4 sd off
        finally:
            for c in conns:
                c.close()

    def test_a_killed_front_end_is_started_again_on_its_socket(self, served):
        """A front end that dies is replaced on the same listening socket: connections the
        kernel hashed to it wait in its queue for the new one, none is refused."""
        import signal

        url, proc = served.url, served.proc
        port = int(url.rsplit(":", 1)[1])
        listening = _established_on(port, state="0A")
        fronts = [p for p in children(proc.pid) if b"spawn_main" in _cmdline(p)]
        victim = fronts[0]
        its_socket = _socket_inodes(victim) & listening
        os.kill(victim, signal.SIGKILL)
        codes = []
        for i in range(24):  # fresh connections: about half are hashed to the dead one's socket
            r = httpx.post(f"{url}/v1/functions/sin/jacobian", json={"inputs": [[0.1 * i]]}, timeout=60)
            codes.append(r.status_code)
        assert codes == [200] * 24
        fronts = [p for p in children(proc.pid) if b"spawn_main" in _cmdline(p)]
        assert len(fronts) == 2 and victim not in fronts
        assert any(_socket_inodes(p) & listening == its_socket for p in fronts)  # the same socket, taken over

# The torch side: modules only engines import (engine/, sparsity/ but the patterns the
# registry declares, the built-in examples). Every other module is the front end's or the
# supervisor's, imported at start-up or later (a lazy import inside a handler: docs_ui,
# drain, output_relay...), so each is checked, a new one included.
TORCH_SIDE = ("jacobian_service.engine", "jacobian_service.sparsity.", "jacobian_service.examples")
FRONT_END_SPARSITY = ("jacobian_service.sparsity.patterns",)


def test_the_front_end_never_imports_torch():
    """No module the front end or the supervisor can import loads torch, not only those
    loaded at start-up: each is imported in one fresh process, and torch must be absent."""
    import pkgutil
    import subprocess

    import jacobian_service

    modules = [m.name for m in pkgutil.walk_packages(jacobian_service.__path__, "jacobian_service.")
               if not m.name.startswith(TORCH_SIDE)]
    modules += FRONT_END_SPARSITY
    assert "jacobian_service.docs_ui" in modules and "jacobian_service.app" in modules
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "    assert 'torch' not in sys.modules, f'{name} imported torch'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr

def test_a_process_that_ignores_sigterm_still_stops_after_its_parent():
    """``orphans.stop_with_parent``: the SIGTERM it sends can be ignored (a user
    function's handler in an engine, or a front end not yet listening for it); the
    process exits anyway, ``grace_s`` later."""
    import signal
    import subprocess

    orphan = (
        "import signal, time\n"
        "from jacobian_service.orphans import stop_with_parent\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "stop_with_parent(grace_s=0.5, every_s=0.05)\n"
        "print('ready', flush=True)\n"
        "time.sleep(120)\n"
    )
    parent = (
        "import subprocess, sys, time\n"
        f"child = subprocess.Popen([sys.executable, '-c', {orphan!r}], stdout=subprocess.PIPE, text=True)\n"
        "assert child.stdout.readline() == 'ready\\n'\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    with subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True) as proc:
        child = int(proc.stdout.readline())  # type: ignore[union-attr]
        os.kill(proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while _alive(child):
            assert time.monotonic() < deadline, "the orphan that ignores SIGTERM is still running"
            time.sleep(0.05)

def test_a_port_already_served_is_refused_not_shared():
    """SO_REUSEPORT lets sockets of one user share a port: a second server started on a
    port someone already serves (with SO_REUSEPORT too) must fail, not split the traffic."""
    import socket
    import subprocess

    other = socket.socket()
    other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    other.bind(("127.0.0.1", 0))
    other.listen()
    port = other.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": CHILD_PYTHONPATH, "JACOBIAN_SERVICE_FUNCTIONS": "jacobian_service.examples",
           "JACOBIAN_SERVICE_WORKERS": "2", "JACOBIAN_SERVICE_ENGINE_STANDBY": "false", "JACOBIAN_SERVICE_WARMUP": "false"}
    try:
        done = subprocess.run([sys.executable, "-m", "jacobian_service.cli", "serve", "--host", "127.0.0.1",
                               "--port", str(port)], env=env, capture_output=True, text=True, timeout=120)
    finally:
        other.close()
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    # Said before any engine starts: a second `make serve` waited for torch to load first.
    assert "engine 0" not in done.stdout + done.stderr
