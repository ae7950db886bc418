"""``engine.strays``: which function left threads running, using a core.

Each case runs in a fresh interpreter: threads other tests left in this one would take
their share of the GIL, hence of the CPU time the detector reads."""

from __future__ import annotations

import json
import subprocess
import sys

from .conftest import ROOT

SCENARIO = """
import json, threading, time
from jacobian_service.engine.strays import Strays

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
while time.monotonic() - t0 < 1.5:
    if (name := strays.check(time.monotonic())) is not None:
        named.append((round(time.monotonic() - t0, 2), name))
    time.sleep(0.05)
stop.set()
for t in spinning:
    t.join()
time.sleep(0.35)
after = [strays.check(time.monotonic()), strays.check(time.monotonic() + 1)]
print(json.dumps({{"named": named, "after": after}}))
"""


def run(spinners: int) -> dict:
    out = subprocess.run([sys.executable, "-c", SCENARIO.format(spinners=spinners)], cwd=ROOT, capture_output=True,
                         text=True, timeout=60, check=True).stdout
    return json.loads(out)


def test_spinning_threads_are_named_after_two_windows_and_waiting_ones_never():
    """Three spinners, beside one that is not a stray: each gets a quarter of the GIL,
    added up most of a core. (One alone: the real-server test in test_engine_faults.)"""
    result = run(spinners=3)
    assert result["named"] and {name for _, name in result["named"]} == {"spins"}, result
    assert result["named"][0][0] >= 0.55, result  # a first sample, then two hot windows of 0.3 s
    assert result["after"] == [None, None], result  # ended: forgotten
