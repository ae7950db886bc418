"""The supervisor's account of an engine that has gone (``Supervisor._died``), without
engines: a process stands in for one, and a SUB socket reads what the front ends read."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
import zmq

from jacobian_service import ipc
from jacobian_service.settings import Settings
from jacobian_service.supervisor import Supervisor, _Engine


@pytest.fixture
def supervisor(tmp_path: Path):
    sup = Supervisor(Settings(), tmp_path)
    sub = sup.ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(ipc.events_address(tmp_path))
    time.sleep(0.2)  # the subscription reaches the publisher (ZeroMQ's slow joiner)
    yield sup, sub
    sub.close(linger=0)
    sup.pub.close(linger=0)
    sup.control.close(linger=0)
    sup.ctx.term()


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


def test_an_engine_that_crashed_names_what_it_was_running(supervisor):
    sup, sub = supervisor
    proc = subprocess.Popen([sys.executable, "-c", "pass"], start_new_session=True)
    proc.wait()
    engine = _Engine(0, "cpu", proc=proc)
    sup.engines = [engine]
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
    sup, _ = supervisor
    sup.settings = Settings(engine_standby=True)
    engine = _Engine(0, "cpu", spare_at=0.0)
    engine.spare = _ended_while_warming_up(sup, "exits_below_one")
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
    spare = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.readline(); sys.stdin.readline()"],
                             stdin=subprocess.PIPE, start_new_session=True)
    try:
        if warm:
            sup._spare_flag(spare).touch()
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
