"""Review, round two: what this session's changes broke for legitimate users, found by
reading them as an outside tester would. Each case names what a user saw before."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from jacobian_service.confinement import confiner

# An engine's function whose torch runs OpenMP with its threads pinned (OMP_PROC_BIND, the
# usual tuning on a many-core host), and which then tries to pin a process outside it (a
# front end, here the test's sibling) to one core.
_PINNED = r"""
import os, sys, threading
import torch
torch.set_num_threads(2)
x = torch.arange(4.0 * 512 * 512, dtype=torch.float64).reshape(4, 512, 512) / 1e6
print("sum", float((x @ x).sum()))
me = threading.get_native_id()
os.sched_setaffinity(me, os.sched_getaffinity(0))  # its own thread, by id: glibc's pthread_setaffinity_np
print("thread", "ok")
sibling = int(sys.argv[1])
os.sched_setaffinity(sibling, {min(os.sched_getaffinity(sibling))})
os.sched_setscheduler(sibling, os.SCHED_IDLE, os.sched_param(0))
print("sibling", "done")
"""


def test_an_engine_whose_openmp_pins_its_threads_still_computes() -> None:
    """The filter that keeps an engine's scheduling calls to itself refused
    ``sched_setaffinity`` on any thread id but the engine's own pid: glibc creates a
    pinned thread (``pthread_attr_setaffinity_np``, what libgomp does under OMP_PROC_BIND,
    OMP_PLACES or GOMP_CPU_AFFINITY) with that call on the new thread's id, so every
    engine ended at its first parallel region ("libgomp: Thread creation failed:
    Operation not permitted", exit 1): the service never answered again. Now a scheduling
    call on another id is answered as done and changes nothing (the filter cannot tell
    the engine's threads from other processes): the engine computes what an unconfined
    process does, and a process outside it keeps its affinity and policy."""
    sibling = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        before = os.sched_getaffinity(sibling.pid), os.sched_getscheduler(sibling.pid)
        confined = subprocess.run([sys.executable, "-c", _PINNED, str(sibling.pid)], capture_output=True, text=True,
                                  timeout=60, env={**os.environ, "OMP_PROC_BIND": "true"}, start_new_session=True,
                                  preexec_fn=confiner(landlock=False))
        assert confined.returncode == 0, confined.stderr[-2000:]
        x = torch.arange(4.0 * 512 * 512, dtype=torch.float64).reshape(4, 512, 512) / 1e6
        assert float(confined.stdout.split()[1]) == pytest.approx(float((x @ x).sum()), rel=1e-12)
        assert confined.stdout.splitlines()[1:] == ["thread ok", "sibling done"]
        assert (os.sched_getaffinity(sibling.pid), os.sched_getscheduler(sibling.pid)) == before
    finally:
        sibling.kill()
        sibling.wait()
