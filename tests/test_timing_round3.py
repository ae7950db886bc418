"""Timing, round three: a front end that a busy machine (or its own work) keeps from
saying what it holds must not have the supervisor blame the wrong function.
"""

from __future__ import annotations

import collections
import os
import subprocess
import sys
import time
from types import SimpleNamespace

from jacobian_service import supervisor


def _hung_in(reports: dict[int, tuple[int, float, str, str, float]], word: dict) -> dict:
    # (each report as the supervisor keeps it: with the marks of no client)
    sup = SimpleNamespace(_oldest=collections.defaultdict(dict, {0: {k: (*v, frozenset()) for k, v in reports.items()}}))
    return supervisor.Supervisor._hung_in(sup, 0, 4242, word)  # type: ignore[arg-type]


def test_a_hang_told_of_by_a_front_end_silent_since_is_not_put_on_the_job_behind_it() -> None:
    """Front end A sent the hang's job (the default 60 s deadline) and told of it as its
    oldest; then its loop was starved (a loaded machine, its own work) past
    ``_OLDEST_FRESH_S``, and front end B, whose 1 s request queued behind the hang was
    cancelled, said the engine was overdue, naming its own oldest job, ``sin``'s. A's
    word was dropped as stale and ``sin`` was struck for the hang (quarantined the third
    time) while the hang went free. Now such a word, older than the named job, has no
    one blamed; a fresh one still names the hang, and a stale one of a later job changes
    nothing."""
    now = time.monotonic()
    word = {"t": "overdue", "engine": 0, "pid": 4242, "since": now - 2.0, "function": "sin",
            "sent": now - 3.0, "tag": "b:2", "hung": "sin"}
    silent = now - supervisor._OLDEST_FRESH_S - 0.5  # A's last word
    hang = (4242, now - 6.0, "a:1", "hangs", silent)
    assert _hung_in({111: hang}, word) == {"function": "", "tags": []}
    assert _hung_in({111: (*hang[:4], now - 0.5)}, word) == {"function": "hangs", "tags": ["a:1"]}
    later = (4242, now - 1.0, "a:3", "other", silent)  # sent after sin's job: not the hang
    assert _hung_in({111: later}, word) == {"function": "sin", "tags": ["b:2"]}
    # another engine's (the one before a restart) is not this one's, stale or not
    assert _hung_in({111: (4241, *hang[1:])}, word) == {"function": "sin", "tags": ["b:2"]}
    # a fresh word of an older job still wins over a stale one of a job between
    assert _hung_in({111: (4242, now - 5.0, "a:1", "mid", silent),
                     222: (4242, now - 6.0, "c:1", "hangs", now - 0.5)}, word) == {"function": "hangs", "tags": ["c:1"]}


def test_a_hang_is_not_put_on_a_job_the_word_s_own_front_end_had_answered_since() -> None:
    """Front end B told of its oldest job on the engine, a slow one (``slow``), which was
    then answered; the engine took a hang (A's ``hangs``) and B's short request behind
    it was cancelled. At B's next tick the cancel was overdue: its word named its oldest
    job now, but B's own ``oldest`` of a second before, still fresh, named the answered
    job, older than the hang, and ``slow`` was struck for the hang. B's word is newer
    news than B's last ``oldest``: A's job is the one it hangs in."""
    now = time.monotonic()
    word = {"t": "overdue", "from": 222, "engine": 0, "pid": 4242, "since": now - 1.2, "function": "sin",
            "sent": now - 2.5, "tag": "b:2", "hung": "sin"}
    reports = {222: (4242, now - 4.0, "b:1", "slow", now - 0.9),  # B's, a tick ago: answered since
               111: (4242, now - 3.0, "a:1", "hangs", now - 0.5)}
    assert _hung_in(reports, word) == {"function": "hangs", "tags": ["a:1"]}
    assert _hung_in({222: reports[222]}, word) == {"function": "sin", "tags": ["b:2"]}  # B's alone: its word


def test_a_crash_whose_front_ends_word_trails_by_a_loaded_machines_second_is_still_its_functions(tmp_path) -> None:
    """A front end's ``held`` word goes out through its zmq I/O thread while the job goes
    straight to the engine (round 29): the supervisor waited 0.5 s for the word before
    taking the board's true name for a lie, and a loaded machine can leave that thread
    unscheduled longer: the crashing function went unstruck, its caller a retryable 503
    for its 500. It waits 2 s now, and not at all for an engine that never said it was
    ready (no front end sent it a job): a warm-up's crash is not slowed."""
    import subprocess
    import sys
    import threading

    import zmq

    from jacobian_service.settings import Settings

    sup = supervisor.Supervisor(Settings(engine_fork_server=False, warmup=False, quarantine_after=3), tmp_path)
    push = sup.ctx.socket(zmq.PUSH)
    waits: list[float] = []
    await_held = sup._await_held
    sup._await_held = lambda index, named, wait: waits.append(wait) or await_held(index, named, wait)  # type: ignore[method-assign]
    try:
        push.connect(sup.channel.control)
        for was_ready in (True, False):
            proc = subprocess.Popen([sys.executable, "-c", "pass"], start_new_session=True)
            proc.wait()
            engine = supervisor._Engine(0, "cpu", proc=proc, was_ready=was_ready)
            sup.engines = [engine]
            word = sup.channel.sign({"t": "held", "from": 1, "engine": 0, "functions": ["crashes"]})
            late = threading.Timer(1.0, push.send, (word,)) if was_ready else None  # the word trails the crash by 1 s
            if late:
                late.start()
            sup._died(engine, 5, {"beat": 1.0, "ready": True, "deadline": 0.0, "function": "crashes", "tags": ["t1"]})
            if late:
                late.join()
                assert len(sup.strikes.get("crashes", ())) == 1, sup.strikes  # its own crash: struck
        assert waits == [supervisor._HELD_WAIT_S, 0.0]
    finally:
        push.close(linger=0)
        sup.pub.close(linger=0)
        sup.control.close(linger=0)
        sup.ctx.term()


def _dies_before_the_word(tmp_path, board: dict, late: list[str], stale: str = "sin", grace: bool = False) -> object:
    """An engine that ran ``stale`` a moment before (the front end's ``held`` told, and
    the supervisor's last look at the board saw it running: ``engine.running``) and then
    the job of ``late``, whose ``held`` word reaches the supervisor 0.3 s after the death
    (a loaded machine's zmq I/O thread); ``grace``: ``stale``'s answer told, and within
    ``_HELD_GRACE_S``. The supervisor, once it has read the death (``board``)."""
    import threading

    import zmq

    from ._fault_support import supervisor_of_a_dead_engine

    with supervisor_of_a_dead_engine(tmp_path, quarantine_after=3) as (sup, engine, _):
        push = sup.ctx.socket(zmq.PUSH)
        try:
            push.connect(sup.channel.control)
            sup._control(sup.channel.sign({"t": "held", "from": 1, "engine": 0, "functions": [stale]}))
            if grace:
                sup._control(sup.channel.sign({"t": "held", "from": 1, "engine": 0, "functions": []}))
            engine.running = {"function": stale, "tags": ["fe:1"], "deadline": 1.0}
            word = sup.channel.sign({"t": "held", "from": 1, "engine": 0, "functions": late})
            timer = threading.Timer(0.3, push.send, (word,))
            timer.start()
            sup._died(engine, 75 if "stray" in board else 5, {"beat": 1.0, "ready": True, "deadline": 0.0, **board})
            timer.join()
        finally:
            push.close(linger=0)
    return sup


def test_a_leave_whose_word_trails_is_its_functions_though_another_named_was_told(tmp_path, caplog) -> None:
    """The supervisor waited for the front ends' word of the functions a death's board
    names until ANY of them was told: the names include what it last saw the engine run
    (``engine.running``), stale where the engine ran a job and left between two of its
    looks. A function that removed its engine's socket file (round 37), sent just after
    ``sin``, left the engine before its ``held`` word came: ``sin``'s word (told a moment
    before) ended the wait at once, the board's true "stray" was read as a lie ("no front
    end had sent it a job of unlinks_its_socket: ... not believed"), and the function
    went unnamed and unstruck (round 37's socket-file test, 2 of 5 full runs). Now the
    wait is for every name, as long as before (``_HELD_WAIT_S``) at most."""
    caplog.set_level("INFO", logger="jacobian_service.supervisor")
    sup = _dies_before_the_word(tmp_path, {"stray": "unlinks_its_socket",
                                           "left": "the engine's socket file removed or replaced"},
                                ["sin", "unlinks_its_socket"])
    assert set(sup.strikes) == {"unlinks_its_socket"}, caplog.text
    assert "engine 0 died: unlinks_its_socket left the engine's socket file removed or replaced" in caplog.text
    assert "not believed" not in caplog.text


def test_a_crash_whose_word_trails_is_not_put_on_the_function_answered_before_it(tmp_path, caplog) -> None:
    """The same early end of the wait, for a crash: ``sin``, answered a moment before
    (still held, within ``_HELD_GRACE_S``), was the one function the front ends held, and
    was struck for ``crashes``' crash (its caller a retryable 503, not its 500) until the
    front ends' ``held_at_death`` came to set it right. Now ``crashes``' word is waited
    for and ``crashes`` is struck at once."""
    caplog.set_level("INFO", logger="jacobian_service.supervisor")
    sup = _dies_before_the_word(tmp_path, {"function": "crashes", "tags": ["fe:2"]}, ["crashes"], grace=True)
    assert set(sup.strikes) == {"crashes"}, caplog.text
    assert "engine 0 died: the engine process exited with status 5 (running crashes for 1 requests)" in caplog.text


_ENGINE = """import os, socket, sys, time
path = sys.argv[1]
if os.path.exists(path):
    os.unlink(path)  # (the dead one's socket file: an engine taking over binds afresh)
s = socket.socket(socket.AF_UNIX)
s.bind(path)
s.listen()
print("up", flush=True)
conn, _ = s.accept()
time.sleep(60)
"""


def test_a_front_end_tells_again_what_it_sends_to_the_engine_that_took_over(tmp_path) -> None:
    """The supervisor forgets what a front end told it was held on an engine as it reads
    of that engine's death (``held``: once per function since the engine restarted), the
    front end only as it reads the supervisor's word of it, a moment later. A request of
    a function told of for the dead engine (``crashes``, answered there) that came in
    between was never told of again: it waited for the next engine and ran there, and
    that engine's death in it (a crash, a stray thread, its socket file removed) was read
    as its board's lie, the function unnamed and unstruck. Now the front end tells the
    functions queued for an engine as its connection reaches a new process (engines here:
    a process that listens at the engine's path; the supervisor's word never read)."""
    import asyncio
    import concurrent.futures

    from jacobian_service import ipc
    from jacobian_service.engine_client import RemoteEngines, _Pending
    from jacobian_service.settings import Settings
    from jacobian_service.supervision import Channel

    sent: list[bytes] = []
    path = ipc.engine_path(tmp_path, 0)

    def engine() -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", _ENGINE, str(path)], stdout=subprocess.PIPE)
        assert proc.stdout.readline() == b"up\n"  # type: ignore[union-attr]
        proc.stdout.close()  # type: ignore[union-attr]
        return proc

    async def reached(front_end: RemoteEngines, pid: int | None) -> None:
        """Connected to process ``pid``; None: not connected."""
        deadline = time.monotonic() + 10
        sock = front_end._socks[0]
        while (sock._transport is None) != (pid is None) or pid is not None and sock.peer_pid != pid:
            assert time.monotonic() < deadline, "the connection did not change"
            await asyncio.sleep(0.01)

    async def main(first: subprocess.Popen) -> subprocess.Popen:
        front_end = RemoteEngines(Settings(), tmp_path, Channel("", "", b"k" * 32), registry={"functions": [], "devices": ["cpu"]})
        front_end._control = SimpleNamespace(send=sent.append)
        front_end._socks = [front_end._connection(0)]
        try:
            await reached(front_end, first.pid)
            front_end._tell_held((0, "crashes"))  # its job, answered (the front end's next look yet to come)
            first.kill()
            first.wait()
            await reached(front_end, None)  # the engine died (and the supervisor forgot what was held there)
            front_end._tell_held((0, "crashes"))  # another job of it, before the supervisor's word is read
            front_end._pending[1] = _Pending(concurrent.futures.Future(), 0, "fe:1", time.monotonic(), True, "crashes", None)
            second = engine()  # the spare takes over
            await reached(front_end, second.pid)
            return second
        finally:
            front_end._socks[0].close()

    first = engine()
    second = asyncio.run(main(first))
    second.kill()
    second.wait()
    words = [Channel("", "", b"k" * 32).verify(raw) for raw in sent]
    word = {"t": "held", "from": os.getpid(), "engine": 0, "functions": ["crashes"]}
    assert words == [word, word], words
