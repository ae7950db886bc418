"""``engine.strays`` on a loaded host: a process or thread a function left spinning is
found though it runs only its turn of a core.

Before, a stray counted only the CPU time it used: at a load of ~20 on two cores a
spinning process ran a tenth of a core, under the share (a fifth), and was never killed
(test_engine_faults_left_behind: "still running after 10 s"). Here the scenario pins
itself, with nine CPU burners, to one core: a spinner gets ~a tenth of it. Each case runs
in a fresh interpreter (test_strays.run), the module loaded from its file.

What the watch can promise of a task that sleeps: it is no stray while its sleeps
outlast the run-queue waits of its wake-ups (it then wants under half a core). A 100 Hz
poller (10 ms sleeps) on this core, with the host at a load of ~27 besides, waited
longer than that at each wake-up and was named beside the spinner: by the time it spent
runnable it was one. (A task's turn length, or its voluntary switches, would tell them
apart for a process, not for a thread that spins beside the engine's own: the GIL cuts
its turns short and makes it wait voluntarily.) The poller here sleeps 50 ms: named only
past 50 ms of waiting a wake-up, where 10 ms sleeps were crossed at a load of ~27."""

from __future__ import annotations

from .test_strays import LOAD, run

LOADED = """
import json, os, subprocess, sys, threading, time
{load}

os.sched_setaffinity(0, {{min(os.sched_getaffinity(0))}})  # one core, shared with the burners below
spin = [sys.executable, "-c", "while True: pass"]
burners = [subprocess.Popen(spin) for _ in range(9)]  # started before the watch: never named
try:
    strays = Strays(share=0.2, every_s=0.3)
    spinner = subprocess.Popen(spin)
    poller = subprocess.Popen([sys.executable, "-c", "import time\\nprint(flush=True)\\nwhile True: time.sleep(0.05)"],
                              stdout=subprocess.PIPE)
    poller.stdout.readline()  # started (its start-up, at a tenth of a core, is work of its own)
    stop = threading.Event()
    def spin_here():
        while not stop.is_set():
            pass
    threading.Thread(target=spin_here, daemon=True).start()
    strays.after_run("spins")
    # Every process named while it looks (the poller must never be), and the first
    # thread: the two are found in windows of their own. (Each window's run-queue wait is
    # read as the kernel has accounted it, at the task's last turn: a spinner that runs
    # a few ms in 0.1 s reads under half a core in some windows and over it in the next,
    # so the thread is often named a window or two before the process. Kept from the
    # first Found alone, that named no process, and the test failed under load.)
    processes, thread, t0 = {{}}, None, time.monotonic()
    while time.monotonic() - t0 < 8 and not (spinner.pid in processes and thread):
        time.sleep(0.05)
        if (found := strays.check(time.monotonic())) is not None:
            processes.update(found.processes)
            thread = thread or found.thread_function
    stop.set()
    print(json.dumps({{"processes": {{str(p): f for p, f in processes.items()}},
                      "thread": thread, "spinner": spinner.pid, "poller": poller.pid}}))
    spinner.kill(); poller.kill()
finally:
    for b in burners:
        b.kill()
"""


def test_a_stray_that_spins_on_a_loaded_core_is_named_and_one_that_polls_is_not():
    result = run(LOADED.format(load=LOAD))
    assert result["processes"] == {str(result["spinner"]): "spins"}, result  # not the poller
    assert result["thread"] == "spins", result
