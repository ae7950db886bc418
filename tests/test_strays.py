"""``engine.strays``: which function left threads running, using a core (processes: the
real-server test in test_engine_faults_left_behind).

Each case runs in a fresh interpreter: threads other tests left in this one would take
their share of the GIL, hence of the CPU time the detector reads. It loads the module
from its file: the ``engine`` package would import torch first (seconds)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from .conftest import ROOT

SCENARIO = """
import json, threading, time
{load}

stop = threading.Event()
def spin():
    while not stop.is_set():
        pass

threading.Thread(target=spin, daemon=True).start()  # alive when made: never named (a module's, say)
strays = Strays(share=0.2, every_s=0.3)
threading.Thread(target=threading.Event().wait, daemon=True).start()
strays.after_run("waits")
spinning = [threading.Thread(target=spin, daemon=True) for _ in range({spinners})]
for t in spinning:
    t.start()
strays.after_run("spins")
strays.after_run("other")  # seen already: still "spins"'s
named, t0 = [], time.monotonic()
while time.monotonic() - t0 < 10 and not named:  # slow: each read of /proc waits for the spinners' GIL
    if (found := strays.check(time.monotonic())) is not None:
        named.append((round(time.monotonic() - t0, 2), found.thread_function, found.processes))
    time.sleep(0.05)
stop.set()
for t in spinning:
    t.join()
time.sleep(0.35)
after = [strays.check(time.monotonic()) is None, strays.check(time.monotonic() + 1) is None]
print(json.dumps({{"named": named, "after": after}}))
"""


# A function that hands work to a pool of its own and waits for it: the pool's thread
# is busy only while the function runs, back to back under load; then it waits.
POOL = """
import json, threading, time
{load}

strays = Strays(share=0.2, every_s=0.3)
working = threading.Event()
def pool():
    while True:
        working.wait()
        while working.is_set():
            pass

threading.Thread(target=pool, daemon=True).start()
found, t0 = [], time.monotonic()
while time.monotonic() - t0 < 2:  # requests back to back
    working.set()
    time.sleep(0.05)
    working.clear()
    strays.after_run("pooled")
    found.append(strays.check(time.monotonic()))
t0 = time.monotonic()
while time.monotonic() - t0 < 1.5:  # idle
    found.append(strays.check(time.monotonic()))
    time.sleep(0.05)
print(json.dumps([repr(f) for f in found if f is not None]))
"""


LOAD = f"""
import importlib.util, sys
name = "jacobian_service.engine.strays"  # its package's __init__ is never run; procfs is imported as usual
spec = importlib.util.spec_from_file_location(name, {str(ROOT / "service/jacobian_service/engine/strays.py")!r})
strays_module = sys.modules[name] = importlib.util.module_from_spec(spec)  # (dataclasses look it up)
spec.loader.exec_module(strays_module)
Strays = strays_module.Strays
"""


def run(script: str) -> object:
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         check=True).stdout
    return json.loads(out)


def test_spinning_threads_are_named_after_two_windows_and_waiting_ones_never():
    """Three spinners, beside one that is not a stray: each gets a quarter of the GIL,
    added up most of a core. (One alone: the real-server test in test_engine_faults_left_behind.)"""
    result = run(SCENARIO.format(spinners=3, load=LOAD))
    assert result["named"] and {(name, str(processes)) for _, name, processes in result["named"]} == {("spins", "{}")}, result
    assert result["named"][0][0] >= 0.55, result  # a first sample, then two hot windows of 0.3 s
    assert result["after"] == [True, True], result  # ended: forgotten


# A thread started through _thread, which threading never lists: never seen, so one left
# spinning slowed every later request of the engine (sin 12 -> 35 ms) and was never found.
RAW = """
import _thread, json, threading, time
{load}

strays = Strays()
stop = threading.Event()
def wait():
    stop.wait()

_thread.start_new_thread(wait, ())
time.sleep(0.05)  # as the engine answers before it looks: the thread is under way
strays.after_run("starts_a_raw_thread")
alive = strays.left()
stop.set()
time.sleep(0.05)
strays.after_run("other")
print(json.dumps([alive, strays.left()]))
"""


def test_a_thread_started_through_the_thread_module_is_put_down_to_its_function():
    assert run(RAW.replace("{load}", LOAD)) == [["starts_a_raw_thread"], []]


def test_a_raw_thread_stays_seen_with_sys_current_frames_rebound():
    """Round 47: the function also set ``sys._current_frames = lambda: {}`` (the only
    list of such threads, which the watch read through ``sys`` at each look): its thread
    was never seen, nor its function named. The watch holds its own reference now."""
    script = RAW.replace("{load}", LOAD).replace(
        "_thread.start_new_thread(wait, ())", "_thread.start_new_thread(wait, ())\nsys._current_frames = lambda: {}")
    assert run(script) == [["starts_a_raw_thread"], []]


def test_a_pool_busy_only_while_its_function_runs_is_no_stray():
    assert run(POOL.replace("{load}", LOAD)) == []


# A function that starts a thread at each call and never ends it (a new pool per call);
# and one that keeps one pool, started once.
LEAK = """
import json, threading, time
{load}

never = threading.Event()
strays = Strays(every_s={every_s}, max_threads=20)
pool = [threading.Thread(target=never.wait, daemon=True) for _ in range(8)]
for t in pool:
    t.start()
strays.after_run("keeps_a_pool")
checks = []
for call in range(25):
    threading.Thread(target=never.wait, daemon=True).start()
    strays.after_run("leaks_threads")
    strays.after_run("keeps_a_pool")  # runs too, starting nothing
    found = strays.check(time.monotonic() + call)
    checks.append(None if found is None else found.threads_left)
print(json.dumps(checks))
"""


@pytest.mark.parametrize("every_s", [0.0, 3600.0])
def test_threads_of_the_functions_alive_past_the_limit_are_a_leak_whether_or_not_they_spin(every_s):
    """At each window, and between windows too (3600 s: never one): the count is held
    after every batch. Once a second, 20 threads a call (under a 4 GiB cap) passed the
    limit and then what the cap had room for before the next window."""
    checks = run(LEAK.replace("{load}", LOAD).replace("{every_s}", str(every_s)))
    assert checks[:12] == [None] * 12, checks  # 8 + 12 = 20: at the limit, not past it
    assert checks[12] == {"count": 21, "limit": 20, "grown": [["leaks_threads", 13], ["keeps_a_pool", 8]]}, checks


ZOMBIES = """
import json, subprocess, sys, time
{load}

strays = Strays(every_s=0.0, max_processes=20)
kept = []
checks = []
for call in range(25):
    kept.append(subprocess.Popen([sys.executable, "-c", "pass"]))  # never waited for: a zombie once it exits
    strays.after_run("leaks_processes")
    time.sleep(0.05)
    found = strays.check(time.monotonic() + call)
    checks.append(None if found is None else found.processes_left)
print(json.dumps(checks))
"""


def test_child_processes_past_the_limit_are_a_leak_zombies_included():
    checks = run(ZOMBIES.replace("{load}", LOAD))
    first = next(i for i, c in enumerate(checks) if c is not None)
    assert first == 20, checks  # 21 children, zombies all but the newest
    assert checks[first]["count"] > 20 and checks[first]["grown"][0][0] == "leaks_processes", checks


# A child a function forked that has ended but was never waited for (a zombie) stays on
# the engine thread's list of children: it was counted as live, and its function stayed a
# suspect (``left``) at every later death of the engine, which a dead process cannot cause.
ENDED_CHILD = """
import json, os, signal, time
{load}

strays = Strays()
ended = os.fork()
if ended == 0:
    os._exit(0)
alive = os.fork()
if alive == 0:
    time.sleep(30)
    os._exit(0)
# the first has ended (a zombie: not waited for); waited for, not a fixed 0.2 s (under load
# it may not have run yet, and a live child names its function as the other does)
deadline = time.monotonic() + 30
while open(f"/proc/{ended}/stat").read().rpartition(")")[2].split()[0] != "Z":
    assert time.monotonic() < deadline, "the first child never ended"
    time.sleep(0.01)
strays.after_run("leaves_a_zombie")
with_both = strays.left()
os.kill(alive, signal.SIGKILL)
os.waitpid(alive, 0)
strays.after_run("other")
print(json.dumps([with_both, strays.left()]))
os.waitpid(ended, 0)
"""


def test_a_child_that_has_ended_is_no_suspect_a_live_one_is():
    # (both children are the same function's: the live one names it, the zombie alone does not)
    assert run(ENDED_CHILD.replace("{load}", LOAD)) == [["leaves_a_zombie"], []]


# The engine takes the time at the top of its loop, then pumps and runs a batch, then
# looks (``check(now)``): the window that ran the batch was read a batch's length past
# its ``now``. The idle window after it was measured from the ``now``s (1.1 s) over
# counters that had run 0.1 s: a stray spinning a whole core read as 9 %, under the
# share, and was named a window late.
STALE_NOW = """
import json, threading, time
{load}

strays = Strays(share=0.2, every_s=0.1)
spin = threading.Event()
def stray():
    while True:
        spin.wait()
        while spin.is_set():
            pass

threading.Thread(target=stray, daemon=True).start()
strays.after_run("spins")
now = time.monotonic()
time.sleep(1.0)  # a batch, run after the time was taken
strays.after_run("other")
strays.check(now)  # a window in which functions ran: the counters read for the next one
spin.set()
found = []
for _ in range(2):  # two idle windows
    time.sleep(0.12)
    found.append(strays.check(time.monotonic()))
spin.clear()
print(json.dumps([None if f is None else f.thread_function for f in found]))
"""


def test_a_stray_is_named_after_two_idle_windows_though_a_batch_ran_between_the_time_taken_and_the_look():
    assert run(STALE_NOW.replace("{load}", LOAD)) == [None, "spins"]
