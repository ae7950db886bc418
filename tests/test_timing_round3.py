"""Timing, round three: a front end that a busy machine (or its own work) keeps from
saying what it holds must not have the supervisor blame the wrong function.
"""

from __future__ import annotations

import collections
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
