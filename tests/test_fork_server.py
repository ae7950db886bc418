"""Engines forked from a zygote (``fork_server``): what an exec'd engine is, for ~0.3 s of
CPU in place of ~3 s of imports.

One server for the class (its engines and spare forked); the setting's ``false`` is
checked on an in-process supervisor (an exec'd engine, killed as it starts).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest

from jacobian_service import fork_server
from jacobian_service.fork_server import Forked
from jacobian_service.orphans import become_subreaper
from jacobian_service.procfs import children
from jacobian_service.settings import FRONT_END_ONLY, Settings
from jacobian_service.supervisor import Supervisor, _Engine, _signal_group

from ._fault_support import SETTINGS, _cmdline, _log_saying, restarts, sin_ok, wait_restarts, wait_spare
from .test_hostile_round10 import LANDLOCK, _attack, _refused

FUNCTIONS = "jacobian_service.examples,tests.fault_functions,tests.hostile10_functions"


def _cpu_s(pid: int) -> float:
    """utime + stime of ``pid`` so far."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _zygote(serve: int) -> int:
    found = [p for p in children(serve) if b"jacobian_service.fork_server" in _cmdline(p)]
    assert len(found) == 1, found
    return found[0]


def _engine(url: str) -> int:
    return httpx.get(f"{url}/v1/info", timeout=5).json()["engine_pids"][0]


def _spare(served: Any) -> int:
    """The spare waiting (a promoted one, the engine now, keeps its command line)."""
    engine = _engine(served.url)
    found = [p for p in children(served.proc.pid) if b"--standby" in _cmdline(p) and p != engine]
    assert len(found) == 1, found
    return found[0]


def _parent_and_session(pid: int) -> tuple[int, int]:
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return int(fields[1]), int(fields[3])


def _descriptors(pid: int) -> dict[int, str]:
    found = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            found[int(fd)] = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:  # closed just now
            pass
    return found


def _seqpacket_sockets() -> set[str]:
    """Inodes of the Unix sockets of type SOCK_SEQPACKET (5) on this host."""
    with open("/proc/net/unix") as f:
        rows = [line.split() for line in f.readlines()[1:]]
    return {row[6] for row in rows if len(row) > 6 and int(row[4], 16) == socket.SOCK_SEQPACKET}


class TestForkServer:
    SERVER: ClassVar[dict[str, Any]] = {**SETTINGS, "FUNCTIONS": FUNCTIONS}

    def test_engines_and_spares_are_forked_from_the_zygote(self, served):
        """Each engine and spare cost ~3 s of CPU (imports, ~2.7 s of it) before its
        first line. Forked, each costs a fraction of what the zygote spent importing,
        is ``serve``'s own child (its exit status is serve's to collect) leading a
        session of its own, and shows the engine's command line."""
        serve, url = served.proc.pid, served.url
        zygote, engine, spare = _zygote(serve), _engine(served.url), _spare(served)
        imports = _cpu_s(zygote)
        for pid in (engine, spare):
            assert _cpu_s(pid) < imports / 2, (pid, _cpu_s(pid), imports)
            assert _parent_and_session(pid) == (serve, pid)
            assert b"jacobian_service.engine.process" in _cmdline(pid)
        assert b"--standby" in _cmdline(spare) and b"--standby" not in _cmdline(engine)
        said = f"engine 0 (cpu) started (forked), generation 1, pid {engine}"
        assert said in _log_saying(served.proc, said)
        sin_ok(url)

    def test_an_engine_holds_only_its_own_descriptors(self, served):
        """What the zygote held (its socket to serve, the only SOCK_SEQPACKET socket of
        the service; the pipes of each fork) is closed in the engine: its only pipes are
        the four serve gave it, at 0-3 (stdin, a spare's; stdout, stderr; its own log)."""
        seqpacket = _seqpacket_sockets()
        assert seqpacket  # serve's and the zygote's ends
        for pid in (_engine(served.url), _spare(served)):
            held = _descriptors(pid)
            given = {held[fd] for fd in (1, 2, 3)} | ({held[0]} if held[0].startswith("pipe:") else set())
            assert {t for t in held.values() if t.startswith("pipe:")} == given, held
            sockets = {t[len("socket:["):-1] for t in held.values() if t.startswith("socket:[")}
            assert not sockets & seqpacket, held

    def test_a_forked_engine_is_confined(self, served):
        """As an exec'd engine: a function that kills serve, or the zygote, is refused
        (seccomp names both; Landlock's scope reaches neither), and neither goes."""
        serve, url = served.proc.pid, served.url
        zygote = _zygote(serve)
        with httpx.Client(timeout=30) as client:
            _refused(_attack(client, url, 0))  # os.kill(os.getppid(), SIGKILL)
            _refused(_attack(client, url, 10, zygote))  # os.kill(zygote, SIGKILL)
        assert served.proc.poll() is None and _zygote(serve) == zygote
        said = ("its functions reach no process but its own (Landlock)" if LANDLOCK else
                "its functions cannot signal serve (seccomp")
        assert said in _log_saying(served.proc, said)
        sin_ok(url)

    def test_a_zygote_killed_is_replaced_and_engines_still_start(self, served):
        """The zygote killed (here from outside; the OOM killer, say): another is started,
        and the engine's next spare is forked from it."""
        serve, url = served.proc.pid, served.url
        old, mark = _zygote(serve), len(served.proc.read_log())
        os.kill(old, signal.SIGKILL)
        # Waited for while the new zygote makes progress, not a fixed minute: on a loaded
        # machine its imports alone took 59 s of wall time, and a 60 s deadline failed a
        # start that was on its way (it said ready a second later).
        began = moved = time.monotonic()
        cpu = 0.0
        while "fork server ready" not in (since := served.proc.read_log()[mark:]):
            now = time.monotonic()
            assert now - moved < 30 and now - began < 600, since
            for pid in children(serve):
                try:
                    if pid != old and b"jacobian_service.fork_server" in _cmdline(pid) and _cpu_s(pid) > cpu:
                        cpu, moved = _cpu_s(pid), now
                except OSError:
                    pass
            time.sleep(0.1)
        deadline = time.monotonic() + 60
        zygote = _zygote(serve)
        assert zygote != old
        assert f"fork server (pid {old}): it exited with status -9" in since
        count, promoted = restarts(url), _spare(served)
        os.kill(_engine(url), signal.SIGKILL)
        wait_restarts(url, count + 1, 30)  # (a request sent before the front end learns of it: 503, retry)
        while not (spares := [p for p in children(serve) if b"--standby" in _cmdline(p) and p != promoted]):
            assert time.monotonic() < deadline, "no new spare"  # (the front ends' word of a warm one may be the old one's)
            time.sleep(0.1)
        wait_spare(url)
        sin_ok(url)
        spare = spares[0]
        assert _cpu_s(spare) < _cpu_s(zygote) / 2
        assert _parent_and_session(spare) == (serve, spare)


def test_with_the_setting_off_engines_are_execd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``ENGINE_FORK_SERVER=false``: no zygote, and an engine is ``python -m`` exec'd by
    Popen, as before."""
    monkeypatch.setenv("JACOBIAN_SERVICE_ENGINE_FORK_SERVER", "false")
    sup = Supervisor(Settings(), tmp_path)
    try:
        proc = sup._start(_Engine(0, "cpu"), standby=True)
        try:
            assert sup.forks is None
            assert isinstance(proc, subprocess.Popen) and not isinstance(proc, Forked)
            assert proc.args[1:3] == ["-m", "jacobian_service.engine.process"]
        finally:
            _signal_group(proc, signal.SIGKILL)
            proc.wait()
            proc.stdin.close()  # type: ignore[union-attr]
    finally:  # (not sup.stop(): it kills every process this one adopted, pytest's own included)
        sup.output.stop(1.0)
        sup.pub.close(linger=0)
        sup.control.close(linger=0)
        sup.ctx.term()


def test_a_stuck_zygote_is_replaced_and_the_engine_execd(monkeypatch: pytest.MonkeyPatch) -> None:
    """A zygote that does not answer a start (stopped here; a function could not: it is
    out of every engine's reach) held serve's supervisor thread for as long: killed
    after ``_REPLY_S``, and that engine is exec'd (never worse than before)."""
    monkeypatch.setattr(fork_server, "_REPLY_S", 0.5)
    assert become_subreaper()
    forks = fork_server.ForkServer({k: v for k, v in os.environ.items() if k.upper() not in FRONT_END_ONLY})
    try:
        assert forks.ready(wait_s=120)
        zygote = forks.pid
        os.kill(zygote, signal.SIGSTOP)  # type: ignore[arg-type]
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            argv = [sys.executable, "-m", "jacobian_service.no_such_module"]
            proc = fork_server.start_engine(forks, argv, dict(forks.env), null, null, null, standby=False,
                                            confine=False)
        finally:
            os.close(null)
        assert isinstance(proc, subprocess.Popen) and proc.wait(30) == 1  # exec'd: python -m says no such module
        assert forks.pid is None and not os.path.exists(f"/proc/{zygote}")  # killed, collected
    finally:
        forks.stop()
