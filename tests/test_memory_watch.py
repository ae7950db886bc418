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
    assert over is not None and over["rss"] > over["limit"], over
    assert over["grown"][0][0] == "grows" and over["grown"][0][1] >= 96 << 20, over
    assert dict(over["grown"]).get("small", 0) < 1 << 20  # a page or two of the test's own, at most
    del held


def test_a_limit_below_what_the_engine_holds_once_started_is_not_enforced():
    watch = MemoryWatch(1 << 26, every_s=0.0)  # 64 MiB: less than this process holds
    watch.start()
    assert watch.limit is None and watch.check(1.0) is None
