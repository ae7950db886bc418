"""The supervisor's account of an engine that has gone (``Supervisor._died``), without
engines: a process stands in for one, and a SUB socket reads what the front ends read."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
import zmq

from jacobian_service import ipc
from jacobian_service.fork_server import spare_stdin
from jacobian_service.settings import Settings
from jacobian_service.supervisor import Supervisor, _Engine


@pytest.fixture
def supervisor(tmp_path: Path):
    # (engines exec'd: the zygote's own tests are test_fork_server's; one started here
    # beside each test's engines would cost its imports again, and outlive the test)
    sup = Supervisor(Settings(engine_fork_server=False), tmp_path)
    sub = sup.ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(sup.channel.events)
    subscribed(sup, sub)
    yield sup, sub
    sub.close(linger=0)
    sup.pub.close(linger=0)
    sup.control.close(linger=0)
    sup.ctx.term()


def subscribed(sup: Supervisor, sub: zmq.Socket, within: float = 60.0) -> None:
    """Once ``sub`` (connected to ``sup``'s events, all subscribed) gets what ``sup``
    publishes: a subscription reaches the publisher a moment after the connection
    (ZeroMQ's slow joiner), and a PUB socket drops what it sends before. A fixed 0.2 s
    for that lost a test's first word on a loaded machine. Probes, which no test reads
    (each asks for its own ``t``), are sent until one comes back, then a last one is
    read up to: none is left for the test. (``sup`` not started: its socket is ours.)"""
    deadline = time.monotonic() + within
    while not sub.poll(20):
        assert time.monotonic() < deadline, "the subscription never reached the supervisor's publisher"
        sup.pub.send(orjson.dumps({"t": "probe"}))
    sup.pub.send(orjson.dumps({"t": "probe", "last": True}))
    while not orjson.loads(sub.recv()).get("last"):
        pass


def _died_message(sub: zmq.Socket) -> dict:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if sub.poll(100):
            msg = orjson.loads(sub.recv())
            if msg["t"] == "died":
                return msg
    raise AssertionError("no died message")


@pytest.mark.parametrize("status", [
    {"stray": "leaves_a_thread"},
    {"memory": {"held": 1 << 30, "limit": 1 << 29}},
    {"device_memory": {"held": 3 << 30, "limit": 2 << 30, "device": "cuda:0", "grown": [["keeps", 3 << 30]]}},
])
def test_an_engine_that_left_as_planned_names_none_of_the_requests_it_was_last_seen_running(supervisor, status):
    """It left between batches. What the supervisor last saw it run (a batch of two sin
    requests) is stale: those requests may be answered already, their replies not yet
    read by the front end when the supervisor's word comes. Named as running, they were
    failed with 503 (or 500 alone) instead of being sent on; and a stray thread's strike
    went to the stale batch's function."""
    sup, sub = supervisor
    proc = subprocess.Popen([sys.executable, "-c", "pass"], start_new_session=True)
    proc.wait()
    engine = _Engine(0, "cpu", proc=proc, running={"function": "sin", "tags": ["a", "b"]})
    sup.engines = [engine]
    sup._died(engine, 75, status)
    msg = _died_message(sub)
    assert msg["planned"] is True
    assert msg["tags"] == []
    assert msg["function"] == status.get("stray", "")
    assert "sin" not in sup.strikes
    assert ("leaves_a_thread" in sup.strikes) == ("stray" in status)
    if "device_memory" in status:
        assert msg["reason"] == ("its tensors on cuda:0 held 3072 MiB between requests, over ENGINE_MAX_DEVICE_BYTES "
                                 "(2048 MiB); grown most by keeps +3072 MiB")


@pytest.mark.parametrize("status", [
    {"stray": "closes_its_sockets", "left": "descriptors 0-2 changed, which cannot be put back"},
    {"memory": {"held": 1 << 30, "limit": 1 << 29}},
    # (read off its connection while several functions ran: the board's word was dropped
    # as no field it writes, and the leave taken for a crash, "exited with status 75")
    {"robbed": {"messages": 2, "ran": ["reads_a", "reads_b"]}},
])
def test_an_engine_that_left_names_the_requests_whose_answers_it_could_not_send(supervisor, status):
    """Its connection to a front end closed under it (a function closed its sockets), the
    batch's answers went nowhere: it names those requests as it leaves (engine.process
    ``_unanswered``). Not named (the leave said a setting changed, or a leak), the front
    end took the culprit's request for one never started and sent it on to the next
    engine, to close that one's sockets too."""
    sup, sub = supervisor
    proc = subprocess.Popen([sys.executable, "-c", "pass"], start_new_session=True)
    proc.wait()
    engine = _Engine(0, "cpu", proc=proc)
    sup.engines = [engine]
    board = ipc.StatusBoard(sup.run_dir / "left.status", create=True)  # (read as the supervisor reads it)
    board.leave(1.0, {**status, "tags": ["t1"]})
    sup._died(engine, ipc.EXIT_LEAVING, board.read())
    board.close()
    msg = _died_message(sub)
    assert (msg["planned"], msg["tags"], msg["function"]) == (True, ["t1"], status.get("stray", ""))
    if "robbed" in status:
        assert msg["reason"] == ("2 message(s) a front end sent to it were read off its connection by another reader "
                                 "(a function: one of reads_a, reads_b, which ran then)")


@pytest.mark.parametrize("code", [-11, -9, 3])
def test_a_leave_on_the_board_of_an_engine_that_ended_otherwise_is_not_believed(supervisor, caplog, code):
    """A function that wrote what a leaving engine writes (naming itself: a front end did
    send it that job) and then crashed, or was killed as hung, was taken for an engine
    that left between batches: its own request, named by no one, went on to the next
    engine, to do the same there, and the next. Only an engine that exits as a leaving
    one does (``ipc.EXIT_LEAVING``) is believed; otherwise it is a crash, put down to
    the function the front ends held there, and no request goes on."""
    sup, sub = supervisor
    proc = subprocess.Popen([sys.executable, "-c", "pass"], start_new_session=True)
    proc.wait()
    engine = _Engine(0, "cpu", proc=proc, was_ready=True)
    sup.engines = [engine]
    sup._control(sup.channel.sign({"t": "held", "from": 1, "engine": 0, "functions": ["forges_a_leave"]}))
    sup._died(engine, code, {"beat": 1.0, "ready": True, "deadline": 0.0, "stray": "forges_a_leave",
                             "left": "a thread running after it returned"})
    msg = _died_message(sub)
    assert (msg["planned"], msg["function"]) == (False, "forges_a_leave")
    assert "status board said it was leaving on its own, but it ended otherwise" in caplog.text
    assert "forges_a_leave" in sup.strikes


def test_an_engine_that_crashed_names_what_it_was_running(supervisor):
    sup, sub = supervisor
    proc = subprocess.Popen([sys.executable, "-c", "pass"], start_new_session=True)
    proc.wait()
    engine = _Engine(0, "cpu", proc=proc)
    sup.engines = [engine]
    # (a front end sent it a job of segfaults, unanswered: the board's word is believed)
    sup._control(sup.channel.sign({"t": "held", "from": 1, "engine": 0, "functions": ["segfaults"]}))
    sup._died(engine, -11, {"beat": 1.0, "ready": True, "deadline": time.monotonic() + 30, "function": "segfaults",
                            "tags": ["a"]})
    msg = _died_message(sub)
    assert (msg["planned"], msg["tags"], msg["function"]) == (False, ["a"], "segfaults")
    assert "SIGSEGV" in msg["reason"]
    assert "segfaults" in sup.strikes


def test_an_engine_that_died_idle_names_none_of_the_requests_it_was_last_seen_running(supervisor):
    """Its board said idle when it went (SIGALRM from a timer, a thread's ``os._exit``):
    the batch the supervisor last saw it run was over, its answers sent."""
    sup, sub = supervisor
    proc = subprocess.Popen([sys.executable, "-c", "pass"], start_new_session=True)
    proc.wait()
    engine = _Engine(0, "cpu", proc=proc, running={"function": "sin", "tags": ["a", "b"]})
    sup.engines = [engine]
    sup._died(engine, -14, {"beat": 1.0, "ready": True, "deadline": 0.0})
    msg = _died_message(sub)
    assert (msg["planned"], msg["tags"], msg["function"]) == (False, [], "")
    assert "sin" not in sup.strikes


def _ended_while_warming_up(sup: Supervisor, function: str) -> subprocess.Popen:
    """A process that wrote the warm-up note an engine writes before a function's warm-up
    and ended there (a crash leaves the note behind)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.2)"], start_new_session=True)
    ipc.warming_path(sup.run_dir, proc.pid).write_text(f"{time.monotonic()} {function}")
    proc.wait()
    return proc


def test_an_engine_that_died_in_a_warm_up_names_the_function_whose_warm_up_it_was(supervisor):
    """Else each new engine dies on the same warm-up and none is ever ready."""
    sup, sub = supervisor
    engine = _Engine(0, "cpu")
    engine.proc = _ended_while_warming_up(sup, "segfaults_below_one")
    sup.engines = [engine]
    sup._died(engine, -11, {"beat": 0.0, "ready": False, "deadline": 0.0})
    msg = _died_message(sub)
    assert (msg["function"], msg["tags"], msg["planned"]) == ("segfaults_below_one", [], True)  # nothing was started
    assert msg["reason"].startswith("the warm-up of segfaults_below_one ended the engine (the engine process was "
                                    "killed by SIGSEGV)"), msg
    assert "segfaults_below_one" in sup.skip_warmup and "segfaults_below_one" in sup.strikes
    assert engine.restart_at <= time.monotonic()  # at once: progress, not a crash loop


def test_a_spare_that_died_in_a_warm_up_has_the_next_spare_skip_it(supervisor):
    """A spare's warm-up is told on its stdin (``ipc.say_warming``), read after its death."""
    sup, _ = supervisor
    sup.settings = Settings(engine_standby=True, engine_fork_server=False)
    engine = _Engine(0, "cpu", spare_at=0.0)
    theirs, ours = spare_stdin()
    spare = subprocess.Popen([sys.executable, "-c", "import os; os.write(0, b'w exits_below_one\\n')"], stdin=theirs,
                             start_new_session=True)
    os.close(theirs)
    spare.stdin = ours
    spare.wait()
    engine.spare = spare
    sup._tend_spare(engine, time.monotonic())
    assert "exits_below_one" in sup.skip_warmup and "exits_below_one" in sup.strikes
    assert engine.spare is None and engine.spare_at <= time.monotonic()  # (no new one: the engine is not up)


@pytest.mark.parametrize("warm", [True, False])
def test_a_promoted_spare_is_expected_as_soon_as_it_is_ready(supervisor, warm):
    """What a 503 says while the spare takes over (its Retry-After, which the SDK waits
    out). It said a cold start's length (the 20 s measured here) from the promotion on,
    though a warm spare serves within milliseconds: an SDK client waited 18 s for an
    engine that was back in one. A spare still warming up takes what its warm-up has left."""
    sup, _ = supervisor
    theirs, ours = spare_stdin()  # (as the supervisor starts a spare: its word that it is warm comes on it)
    say = "import os; os.write(0, b'warm\\n'); " if warm else ""
    spare = subprocess.Popen([sys.executable, "-c", say + "import sys; sys.stdin.readline(); sys.stdin.readline()"],
                             stdin=theirs, start_new_session=True)
    os.close(theirs)
    spare.stdin = ours
    try:
        if warm:
            deadline = time.monotonic() + 30
            while not sup._is_warm(spare):  # (its word, once it has started)
                assert time.monotonic() < deadline, "the spare never said it was warm"
                time.sleep(0.01)
        engine = _Engine(0, "cpu", spare=spare, startup_s=20.0, spare_started=time.monotonic() - 5.0)
        sup.engines = [engine]
        sup._spawn(engine)
        assert engine.proc is spare and engine.promoted
        ready_in = engine.ready_in(time.monotonic())
        assert ready_in <= 1.0 if warm else 14.0 <= ready_in <= 15.0, ready_in
    finally:
        spare.kill()
        spare.wait()
        spare.stdin.close()  # type: ignore[union-attr]



# A stand-in engine process (no imports: a start costs milliseconds, even on a busy
# machine): it ends (status 1) after its life; with --standby it is a spare, warm at
# once (its word on stdin, as ipc.say_warm), promoted by a line on stdin. What a real
# engine says on its board (ready; a batch run to its end) the test says for it
# (``fake_engines``).
_FAKE_ENGINE = """
import os, sys, time
if "--standby" in sys.argv:
    os.write(0, b"warm\\n")
    if not sys.stdin.readline().strip():
        sys.exit(0)
time.sleep(float(sys.argv[2]))
sys.exit(1)
"""


@pytest.fixture
def fake_engines(supervisor):
    """The supervisor, spares on, its engines stand-ins (``_FAKE_ENGINE``) that live
    ``life[0]`` s once engines, each ready as it starts and, with ``serves[0]``, having
    run a batch to its end; the command lines it started, in order."""
    sup, _ = supervisor
    sup.settings = Settings(engine_standby=True, engine_fork_server=False)
    started: list[list[str]] = []
    life, serves = [600.0], [False]

    def command(engine: _Engine) -> list[str]:
        started.append([sys.executable, "-S", "-c", _FAKE_ENGINE, str(sup.run_dir), str(life[0])])
        return started[-1]

    spawn = sup._spawn

    def spawn_and_say_ready(engine: _Engine) -> None:
        spawn(engine)
        if engine.proc is not None:  # the engine's side of its board
            board = ipc.StatusBoard(sup.run_dir / f"engine-{engine.index}.status")
            board.set_ready(time.monotonic())
            if serves[0]:
                board.running(time.monotonic(), time.monotonic() + 30, "sin", ["a"])
                board.idle(time.monotonic())
            board.close()

    sup._command, sup._spawn = command, spawn_and_say_ready
    yield sup, started, life, serves
    for engine in sup.engines:
        for proc in (engine.proc, engine.spare):
            if proc is not None and proc.poll() is None:
                proc.kill()
            if proc is not None:
                proc.wait()
                if proc.stdin is not None:
                    proc.stdin.close()


def _tick_until(sup: Supervisor, done, seconds: float) -> float:
    """Ticks as the supervisor's loop does, until ``done()``; the seconds it took."""
    t0 = time.monotonic()
    while not done():
        assert time.monotonic() - t0 < seconds, f"not within {seconds} s"
        sup.tick()
        time.sleep(0.02)
    return time.monotonic() - t0


@pytest.mark.parametrize("serves", [False, True])
def test_a_warm_spare_takes_over_at_once_after_deaths_in_a_row(fake_engines, serves):
    """A warm spare waited out the restart backoff before it took over (0.5 s after the
    second death within a minute, doubling to 10 s): the server answered 503 all that
    while, beside a spare ready to serve. It is promoted at once; the backoff holds back
    the next spare's start instead (the process start a crash loop repeats), until the
    promoted engine has run a batch to its end (it works: the backoff is reset)."""
    sup, started, _, serving = fake_engines
    engine = _Engine(0, "cpu")
    sup.engines = [engine]
    sup._spawn(engine)
    _tick_until(sup, lambda: sup.spare_warm(engine), 30)
    engine.backoff_s = 4.0  # as after four deaths in a row
    engine.spare_at = 0.0  # (spares start 5 s apart at most: as if this one had started long ago)
    serving[0] = serves  # the spare, once promoted, runs a batch
    spare = engine.spare
    engine.proc.kill()  # type: ignore[union-attr]
    _tick_until(sup, lambda: engine.proc is spare, 30)
    # At the tick after the death, not after the 4 s backoff (asserted on the supervisor's
    # times, not the test's wall time: a loaded machine may take that long to reap it).
    assert engine.started < engine.restart_at, (engine.started, engine.restart_at)
    assert engine.restarts == 1 and engine.promoted and len(started) == 2
    _tick_until(sup, lambda: engine.ready, 5)
    if serves:  # a new spare starts, the promoted engine having served
        _tick_until(sup, lambda: engine.spare is not None, 5)
        assert engine.backoff_s == 0.0 and len(started) == 3
    else:  # the backoff, doubled, holds it back: no process starts before
        assert engine.backoff_s == 8.0 and engine.restart_at - time.monotonic() > 2.0
        for _ in range(20):
            sup.tick()
            time.sleep(0.02)
        assert engine.spare is None and len(started) == 2


def test_engines_that_die_as_they_come_up_back_off(fake_engines):
    """A crash loop: each engine dies a moment after it is ready, having served nothing.
    Each restart is a process start (a torch import and a warm-up for a real one): they
    back off (0, 0.5, 1 s ...), where without the backoff there was one per death, 11 or
    more in 2 s. Asserted on what the supervisor did, not on a count within 2 s of wall
    time: on a loaded machine each fake engine's own start took longer, and only 2 had
    died by then (seen with two busy loops beside the tests)."""
    sup, started, life, _ = fake_engines
    life[0] = 0.05
    engine = _Engine(0, "cpu")
    sup.engines = [engine]
    deaths: list[tuple[float, float]] = []  # (when, the restart_at it set)
    starts: list[float] = []
    died, command = sup._died, sup._command

    def noting_died(engine: _Engine, code: int, status: dict) -> None:
        at = time.monotonic()
        died(engine, code, status)
        deaths.append((at, engine.restart_at))

    def noting_command(engine: _Engine) -> list[str]:
        starts.append(time.monotonic())
        return command(engine)

    sup._died, sup._command = noting_died, noting_command
    sup._spawn(engine)
    _tick_until(sup, lambda: engine.restarts >= 3, 60)
    # The backoff after each death in a row: 0, then 0.5 s, then doubling.
    assert [at - when >= backoff for (when, at), backoff in zip(deaths, (0.0, 0.5, 1.0))] == [True] * 3, deaths
    for start in starts:  # no process started (engine or spare) before the backoff of the death before it
        before = [at for when, at in deaths if when < start]
        assert not before or start >= before[-1], (start, deaths)
    assert len(started) == len(starts), [len(started), len(starts)]
