"""Hostile round 46: today's new paths.

- An error's words (errors._timed_words): a function's exception whose __str__ sets its own
  SIGALRM handler, or cancels the timer (signal.setitimer(..., 0) / signal.alarm(0)), ran
  as long as it liked: the 0.5 s bound was the user's to lift. Where a SIGALRM handler was
  set before (the function's own, the in-process host's) or the words were made off the
  main thread, they were never bounded. A watchdog thread now raises into the thread.
- The SDK's sparse reader: a float16 sparse answer (JSON or .npz) raised scipy's own
  ValueError (coo) or gave a csr/csc matrix whose toarray() raised: scipy.sparse holds no
  float16. It is read as float32 (exact), the dtype the service sends for it.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest

from jacobian_client.wire import decode_tree, read_sparse_npz, write_sparse_npz
from jacobian_service.errors import exception_text

_NOT_MADE = "(its message was not made: its __str__ took more than 0.5 s)"


class _Hostile(Exception):
    """Its __str__ defeats the SIGALRM timer one way, then spins for 3 s (not forever: a
    test without the fix fails on the time, it does not hang)."""

    def __str__(self) -> str:
        how = self.args[0]
        if how == "own_handler":
            signal.signal(signal.SIGALRM, lambda signum, frame: None)
        elif how == "cancel_itimer":
            signal.setitimer(signal.ITIMER_REAL, 0)
        elif how == "alarm_zero":
            signal.alarm(0)
        start = time.monotonic()
        while time.monotonic() - start < 3:
            pass
        return "finally"


def _timed(exc: BaseException) -> tuple[str, float]:
    start = time.monotonic()
    text = exception_text(exc)
    return text, time.monotonic() - start


@pytest.fixture
def sigalrm_free() -> Iterator[None]:
    """SIGALRM as an engine has it (pytest-timeout's handler and timer set aside), where
    the words' own timer is used: the case the __str__ above defeats."""
    handler = signal.signal(signal.SIGALRM, signal.SIG_DFL)
    timer = signal.setitimer(signal.ITIMER_REAL, 0)
    try:
        yield
    finally:
        signal.signal(signal.SIGALRM, handler)
        if any(timer):
            signal.setitimer(signal.ITIMER_REAL, *timer)


@pytest.mark.parametrize("how", ["own_handler", "cancel_itimer", "alarm_zero"])
def test_a_str_that_lifts_the_timer_is_still_cut(how: str, sigalrm_free: None) -> None:
    threads = threading.active_count()
    text, took = _timed(_Hostile(how))
    assert text == _NOT_MADE
    assert took < 2.0
    assert signal.getsignal(signal.SIGALRM) is signal.SIG_DFL  # its handler not left behind
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    assert threading.active_count() == threads  # the watch is gone


def test_words_are_cut_where_sigalrm_is_someone_elses(sigalrm_free: None) -> None:
    def host(signum, frame):  # a host (or the function) holding SIGALRM
        pass

    previous = signal.signal(signal.SIGALRM, host)
    try:
        text, took = _timed(_Hostile("spin"))
        assert signal.getsignal(signal.SIGALRM) is host  # theirs, untouched
    finally:
        signal.signal(signal.SIGALRM, previous)
    assert (text, took < 2.0) == (_NOT_MADE, True)


def test_words_are_cut_off_the_main_thread() -> None:
    got: list[tuple[str, float]] = []
    worker = threading.Thread(target=lambda: got.append(_timed(_Hostile("spin"))))
    worker.start()
    worker.join(10)
    assert got and got[0][0] == _NOT_MADE and got[0][1] < 2.0


def test_quick_words_are_the_words_and_no_late_cut_follows() -> None:
    class Quick(Exception):
        def __str__(self) -> str:
            return "quick"

    assert exception_text(Quick()) == "quick"
    time.sleep(0.6)  # past the bound: nothing is raised into this thread afterwards


_F16 = np.array([0.5, -1.25, 65504.0], np.float16)
_SPARSE = {
    "coo": {"row": [0, 1, 2], "col": [2, 0, 1]},
    "csr": {"indptr": [0, 1, 2, 3], "indices": [2, 0, 1]},
    "csc": {"indptr": [0, 1, 2, 3], "indices": [1, 2, 0]},
}


@pytest.mark.parametrize("fmt", sorted(_SPARSE))
def test_a_float16_sparse_answer_reads_as_float32(fmt: str) -> None:
    obj = {"format": fmt, "shape": [3, 3], "dtype": "float16", "data": _F16.tolist(), **_SPARSE[fmt]}
    matrix = decode_tree(obj)
    dense = matrix.toarray()
    assert dense.dtype == np.float32
    expected = np.zeros((3, 3), np.float32)
    if fmt == "coo":
        expected[[0, 1, 2], [2, 0, 1]] = _F16
    elif fmt == "csr":
        expected[[0, 1, 2], [2, 0, 1]] = _F16
    else:
        expected[[1, 2, 0], [0, 1, 2]] = _F16
    np.testing.assert_array_equal(dense, expected)


def test_a_float16_sparse_npz_reads_as_float32() -> None:
    from jacobian_client.wire import SparseCOO

    body = write_sparse_npz(SparseCOO(np.array([0, 1, 2]), np.array([2, 0, 1]), _F16, (3, 3)))
    matrix, _ = read_sparse_npz(body)
    assert matrix.dtype == np.float32
    np.testing.assert_array_equal(matrix.toarray()[[0, 1, 2], [2, 0, 1]], _F16.astype(np.float32))
