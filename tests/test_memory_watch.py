"""engine/memory_watch.py on its own: who grew the memory, and when it is over the limit.

The cases that read this process's own memory (its resident size, its shared memory)
run in a fresh interpreter (``_alone``): in the test run's process, what other tests
left (their threads, their cyclic garbage, collected at any allocation) may give back
memory meanwhile. The named-function case failed so in a full run beside other
sessions (``check`` found nothing over the limit: 160 MiB written, yet the resident
size ended under the 96 MiB margin above where it began), and passed alone in 20 of 20;
a thread that freed 80 MiB of its own meanwhile failed it every time."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys

import numpy as np

# (the cases run alone, below, find these names in their fresh interpreter: ``_LOAD``)
from jacobian_service.engine.memory_watch import MemoryWatch, shared_beyond_resident
from jacobian_service.procfs import status_bytes

from .conftest import ROOT

_LOAD = f"""
import importlib.util, os, sys
import numpy as np
name = "jacobian_service.engine.memory_watch"  # its package's __init__ would import torch (seconds)
spec = importlib.util.spec_from_file_location(name, {str(ROOT / "service/jacobian_service/engine/memory_watch.py")!r})
module = sys.modules[name] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
MemoryWatch, shared_beyond_resident = module.MemoryWatch, module.shared_beyond_resident
from jacobian_service.procfs import status_bytes
"""


def _alone(case) -> None:
    """``case``'s body run in a fresh interpreter, alone with its memory; its failure,
    with its traceback, is this test's."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT / "service"),
                                                                    os.environ.get("PYTHONPATH")) if p)}
    script = _LOAD + inspect.getsource(case) + f"\n{case.__name__}()\n"
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr


def _named_once_over_the_limit():
    watch = MemoryWatch(status_bytes(os.getpid(), "VmRSS") + (96 << 20), every_s=0.0)
    watch.start()
    assert watch.check(1.0) is None
    watch.after_run("small")  # holds no more: nothing charged
    held = np.ones(160 << 17)  # 160 MiB, written: resident
    watch.after_run("grows")
    over = watch.check(2.0)
    assert over is not None and over["held"] > over["limit"], over
    assert over["grown"][0][0] == "grows" and over["grown"][0][1] >= 96 << 20, over
    assert dict(over["grown"]).get("small", 0) < 1 << 20  # a page or two of the test's own, at most
    del held


def test_the_function_that_grew_the_memory_is_named_once_over_the_limit():
    _alone(_named_once_over_the_limit)


def test_memory_kept_in_a_memfd_or_a_shm_file_is_counted_and_charged():
    _alone(_kept_in_a_memfd_or_a_shm_file)


def _kept_in_a_memfd_or_a_shm_file():
    """Written through a descriptor, a memfd's or a /dev/shm file's memory is in no
    resident size (nor under an address-space cap): a function could fill the machine's
    memory past ENGINE_MAX_RSS_BYTES. What the process keeps alive that way is counted,
    and charged to the functions run since the check before."""
    import mmap
    import tempfile

    watch = MemoryWatch(status_bytes(os.getpid(), "VmRSS") + shared_beyond_resident() + (96 << 20), every_s=0.0,
                        beyond=shared_beyond_resident)
    watch.start()
    assert watch.check(1.0) is None
    chunk = b"\1" * (1 << 20)
    memfd = os.memfd_create("kept")
    shm = tempfile.TemporaryFile(dir="/dev/shm")
    try:
        before = shared_beyond_resident()
        for _ in range(64):
            os.write(memfd, chunk)
            shm.write(chunk)
        shm.flush()
        assert shared_beyond_resident() - before >= 128 << 20
        watch.after_run("keeps_shared")  # its resident size hardly grew
        watch.after_run("sin")
        over = watch.check(2.0)
        assert over is not None and over["held"] > over["limit"], over
        assert over["grown"][0][0] == "keeps_shared or sin" and over["grown"][0][1] >= 128 << 20, over
        # Mapped, touched and its descriptor closed: counted once (its pages are resident).
        mapped = mmap.mmap(memfd, 64 << 20)
        mapped[:] = b"\2" * (64 << 20)
        os.close(memfd)
        memfd = -1
        assert abs(shared_beyond_resident() - before - (64 << 20)) < 8 << 20  # the shm file alone
        mapped.close()
    finally:
        shm.close()
        if memfd >= 0:
            os.close(memfd)
    assert shared_beyond_resident() - before < 8 << 20  # all given back


def test_a_limit_below_what_the_engine_holds_once_started_is_not_enforced():
    watch = MemoryWatch(1 << 26, every_s=0.0)  # 64 MiB: less than this process holds
    watch.start()
    assert watch.limit is None and watch.check(1.0) is None


def test_the_device_watch_reads_what_it_is_given_and_names_its_setting(caplog):
    """The same watch over a GPU's allocated bytes (devices.device_memory_watch gives it
    torch.cuda.memory_allocated): here a reader we set by hand."""
    held = [100 << 20]
    watch = MemoryWatch(1 << 30, every_s=0.0, read=lambda: held[0], setting="ENGINE_MAX_DEVICE_BYTES")
    watch.start()
    held[0] += 512 << 20
    watch.after_run("keeps")
    held[0] -= 64 << 20  # a stream that ended gave some back: nobody is charged for a fall
    watch.after_run("streams")
    assert watch.check(1.0) is None
    held[0] += 600 << 20
    watch.after_run("keeps")
    assert watch.check(2.0) == {"held": 1148 << 20, "limit": 1 << 30, "setting": "ENGINE_MAX_DEVICE_BYTES",
                                "grown": [["keeps", 1112 << 20]]}
    low = MemoryWatch(64 << 20, every_s=0.0, read=lambda: held[0], setting="ENGINE_MAX_DEVICE_BYTES")
    low.start()
    assert low.limit is None and "ENGINE_MAX_DEVICE_BYTES (64 MiB) is below what this engine holds" in caplog.text


def test_there_is_no_device_watch_on_the_cpu_or_when_turned_off():
    import torch

    from jacobian_service.engine.devices import device_memory_watch

    assert device_memory_watch(torch.device("cpu"), None) is None
    assert device_memory_watch(torch.device("cuda", 0), 0) is None
