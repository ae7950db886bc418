"""engine/memory_watch.py on its own: who grew the memory, and when it is over the limit."""

from __future__ import annotations

import numpy as np

from jacobian_service.engine.memory_watch import MemoryWatch
from jacobian_service.procfs import status_bytes


def test_the_function_that_grew_the_memory_is_named_once_over_the_limit():
    import os

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


def test_memory_kept_in_a_memfd_or_a_shm_file_is_counted_and_charged():
    """Written through a descriptor, a memfd's or a /dev/shm file's memory is in no
    resident size (nor under an address-space cap): a function could fill the machine's
    memory past ENGINE_MAX_RSS_BYTES. What the process keeps alive that way is counted,
    and charged to the functions run since the check before."""
    import mmap
    import os
    import tempfile

    from jacobian_service.engine.memory_watch import shared_beyond_resident

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
