"""engine/descriptor_watch.py on its own: who kept the descriptors, and when there are
too many. The limit is set through ``share``, just above what this process holds."""

from __future__ import annotations

import os
import resource

import pytest

from jacobian_service.engine.descriptor_watch import DescriptorWatch

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="Linux only")


def _watch(headroom: int, every_s: float = 60.0) -> DescriptorWatch:
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    watch = DescriptorWatch(share=(len(os.listdir("/proc/self/fd")) + headroom) / soft, every_s=every_s)
    watch.start()
    assert watch.limit is not None
    return watch


def test_the_function_that_kept_descriptors_is_named_as_soon_as_they_pass_the_limit():
    watch = _watch(100)
    kept = []
    try:
        with open(os.devnull) as f:  # opened and closed: nothing kept
            f.read()
        watch.after_run("opens_and_closes")
        watch.after_run("sin")
        assert watch.check(1.0) is None  # the first count
        kept.extend(open(os.devnull) for _ in range(150))
        watch.after_run("leaks")
        # Within the same second (every_s is 60): the lowest free descriptor passed the
        # limit, so the count is read at once.
        over = watch.check(2.0)
        assert over is not None and over["open"] > over["limit"], over
        assert over["grown"] == [["leaks", over["grown"][0][1]]] and over["grown"][0][1] >= 150, over
    finally:
        for f in kept:
            f.close()


def test_growth_no_batch_is_seen_to_keep_is_charged_to_every_function_of_that_second():
    """Descriptors a batch did not keep by the time it returned (a thread of its opened
    them later): the lowest free one never moved after a batch, so the second's
    functions share the growth."""
    watch = _watch(1000, every_s=0.0)
    assert watch.check(1.0) is None
    watch.after_run("a")
    watch.after_run("b")
    kept = [open(os.devnull) for _ in range(4)]  # after both batches
    try:
        assert watch.check(2.0) is None  # far under the limit
        assert watch._grown == {"a": 2, "b": 2}, watch._grown
    finally:
        for f in kept:
            f.close()


def test_a_limit_already_passed_once_started_is_not_enforced():
    watch = DescriptorWatch(share=1e-9)  # a limit of 0: less than any process holds
    watch.start()
    assert watch.limit is None and watch.check(1.0) is None
