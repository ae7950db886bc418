"""Red team, round forty-five: what the engine does with a function's error, the child
processes it leaves, and torch's registries it edits in place.

- an error whose words are user code that never returns (its own ``__str__``, its
  argument's ``__str__`` or ``__repr__``, a cause's in forward mode): bounded in time;
- a zombie a function leaves (a ``Popen`` never waited for) is no suspect at a death;
- ``torch.utils._pytree.SUPPORTED_NODES`` edited in place: put back; a kernel over an
  aten operator registered through ``torch._C._dispatch_library``: the engine replaced.

Each case names what a user saw before. One real server for the file (one engine, no
spare); the functions are in tests/hostile45_functions.py, each misbehaving only on the
input 666 (round 11's ``_armed``), the second input picking how.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator

import httpx
import numpy as np
import pytest

from jacobian_service.errors import exception_text

from ._fault_support import _log_until
from .conftest import assert_problem, live_server
from .test_hostile_round11 import _armed, _engine_pid, _replaced
from .test_hostile_round21 import _evaluated  # an evaluate's 200 output

FUNCTIONS = "tests.hostile45_functions"
X = [0.1, 0.2, 0.3]


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, subprocess.Popen]]:
    with live_server(FUNCTIONS=FUNCTIONS, WORKERS=1, WARMUP="false", ENGINE_STANDBY="false", QUARANTINE_AFTER=50,
                     REQUEST_TIMEOUT_S=10, HANG_GRACE_S=1) as served:
        yield served


@pytest.fixture(scope="module")
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=30) as c:
        yield c


def _died_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if " died: " in line]


# ------------------------------------------------------------ an error's words


@pytest.mark.parametrize("case, kind", [
    (0, "_HangingError"),  # its own __str__ sleeps
    (1, "ValueError"),  # ValueError(obj): obj's __str__
    (2, "KeyError"),  # KeyError(obj): obj's __repr__
    (3, "ValueError"),  # ValueError("two", obj): the arguments' reprs
])
def test_an_error_whose_words_never_come_costs_half_a_second(server, http, case: int, kind: str) -> None:
    """A function that raised an error whose words are user code that never returns (its
    own ``__str__``, or Python's own ``__str__`` calling its argument's ``__str__`` or
    ``__repr__``) had the engine make them for the problem's detail and wait: the request
    a 504 at its deadline (10 s here), the engine killed as hung and replaced, the next
    request a 503 (measured). Now user code making the words runs for 0.5 s at most: the
    function's 500 naming its error's type, on the same engine."""
    url, _ = server
    pid = _engine_pid(http, url)
    began = time.monotonic()
    r = _armed(http, url, "raises45", case)
    took = time.monotonic() - began
    body = assert_problem(r, 500, "function_error")
    assert body["detail"] == f"{kind}: (its message was not made: its __str__ took more than 0.5 s)", body
    assert took < 5, took
    np.testing.assert_allclose(_evaluated(http, url, "slow45", X), 2 * np.sin(X), rtol=1e-12)
    assert _engine_pid(http, url) == pid


def test_a_forward_mode_failure_caused_by_such_an_error(server, http) -> None:
    """A forward-mode failure (a jvp) has its causes read for torch's words that the
    function lacks forward-mode AD: a cause whose ``str`` never returned held the engine
    as above, though the error itself had plain words (and, each cut at 0.5 s, a chain
    of 12 would still cost 6 s). Torch's words need no user code: such a cause is not
    read, and the request is the function's 500 at once."""
    url, _ = server
    pid = _engine_pid(http, url)
    vector = {"dtype": "float64", "shape": [3]}
    began = time.monotonic()
    r = http.post(f"{url}/v1/functions/cause_hangs45/jvp", json={
        "inputs": [{**vector, "data": [666.0, 0.0, 0.0]}], "tangents": [{**vector, "data": [1.0, 0.0, 0.0]}]})
    body = assert_problem(r, 500, "function_error")
    assert body["detail"] == "RuntimeError: no jvp here", body
    assert "unsupported" not in body
    assert time.monotonic() - began < 5  # (each cause's words cut at 0.5 s would be 6 s: a chain of 12)
    assert _engine_pid(http, url) == pid


def test_exception_text_is_cut_and_calls_no_str_subclass_method() -> None:
    """A __str__ of 64 MB on one line was split, re-encoded and copied whole (the detail
    shows 2,000 characters); a __str__ returning a str subclass had the subclass's own
    ``encode`` called (one that raised: our 500 ``internal_error``)."""
    class Huge(Exception):
        def __str__(self) -> str:
            return "x" * (64 << 20)

    class Sly(str):
        def encode(self, *args, **kwargs):  # noqa: ANN002, ANN003
            raise RuntimeError("not ours to call")

    class Slyly(Exception):
        def __str__(self) -> str:
            return Sly("plain words")

    assert exception_text(Huge()) == "x" * 8192
    assert exception_text(Slyly()) == "plain words"
    assert exception_text(ValueError("plain", 3)) == "('plain', 3)"  # Python's own words: no timer
    assert exception_text(ValueError(object()), user_code=False) == ""


# ------------------------------------------------------------ torch's registries


def test_a_pytree_node_edited_in_place_is_put_back(server, http) -> None:
    """``torch.utils._pytree.SUPPORTED_NODES[tuple]`` replaced in place by a node that
    flattens a tuple in reverse (no name rebound: the namespaces' guard never saw it):
    every later Jacobian of a function of two outputs, ``(sin x, x * x)``, answered each
    output's derivative under the other's name, with a 200, for the engine's life
    (measured). Now each type's node as the engine started is put back after the batch,
    the function named, and its own answer (computed under it) refused."""
    url, proc = server
    pid, start = _engine_pid(http, url), len(proc.read_log())
    r = _armed(http, url, "edits_registry45", 0)
    body = assert_problem(r, 500, "function_error")
    assert "entries of torch.utils._pytree.SUPPORTED_NODES (tuple)" in body["detail"], body
    r = http.post(f"{url}/v1/functions/pair45/jacobian",
                  json={"inputs": [{"dtype": "float64", "shape": [3], "data": X}]})
    assert r.status_code == 200, r.text
    first, second = (np.diag(np.array(j["data"]).reshape(3, 3)) for j in r.json()["jacobian"])
    np.testing.assert_allclose(first, np.cos(X), rtol=1e-12)  # d sin x
    np.testing.assert_allclose(second, 2 * np.array(X), rtol=1e-12)  # d x*x
    assert _engine_pid(http, url) == pid
    log = _log_until(proc, start, r"edits_registry45 rebound or deleted entries of torch\.utils\._pytree")
    assert re.search(r"edits_registry45 rebound or deleted entries of torch\.utils\._pytree\.SUPPORTED_NODES "
                     r"\(tuple\) and left them so", log), log[-3000:]


def test_a_kernel_registered_past_torch_library_replaces_the_engine(server, http) -> None:
    """A kernel over ``aten::sin`` on the CPU registered through
    ``torch._C._dispatch_library`` (what ``torch.library.Library`` wraps; its ``_impls``,
    which the engine's check reads, never heard of it): every later function's ``sin``
    answered 7.0, with a 200, for the engine's life, no line in any log (measured). Now
    the engine's ``_dispatch_library`` notes each ``impl`` of torch's namespaces, and the
    engine leaves as for a ``Library``'s (torch cannot take a kernel back), for one whose
    ``sin`` is torch's."""
    url, proc = server
    pid, start = _engine_pid(http, url), len(proc.read_log())
    assert _armed(http, url, "edits_registry45", 2).status_code == 200  # (its own answer, under its kernel)
    _replaced(http, url, pid, 60, "the engine was not replaced")
    r = http.post(f"{url}/v1/functions/pair45/evaluate",
                  json={"inputs": [{"dtype": "float64", "shape": [3], "data": X}]})
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(r.json()["output"][0]["data"], np.sin(X), rtol=1e-12)
    log = _log_until(proc, start, r"edits_registry45 left kernels of torch's own operators")
    assert "edits_registry45 left kernels of torch's own operators" in log, log[-3000:]
    assert "aten/sin/CPU registered from outside torch" in log, log[-3000:]


# ------------------------------------------------------------ a zombie left (last: engines die)


def test_a_zombie_a_function_left_is_no_suspect(server, http) -> None:
    """A function that started ``true`` and never waited for it left a zombie, which was
    counted among the engine's live children: a suspect at its death (round 44). Another
    function's crash (``os.kill(getpid(), SIGKILL)``) was then read as possibly the
    zombie's ("no one is struck the first time"), its request run again on a second
    engine to crash it too; an idle engine's death (a SIGSEGV) was put down to the
    zombie's function, struck ("zombie45 left threads running, which are blamed";
    measured). A zombie can kill nothing: now it is no suspect."""
    url, proc = server
    for crash in (True, False):
        assert _armed(http, url, "zombie45", 0).status_code == 200
        pid, start = _engine_pid(http, url), len(proc.read_log())
        if crash:
            r = _armed(http, url, "crashes45", 0)
            assert_problem(r, 500, "function_error")
        else:
            os.kill(pid, signal.SIGSEGV)  # (as a crash of the engine's own while idle)
        _replaced(http, url, pid, 60, "the engine was not replaced")
        log = _log_until(proc, start, r" died: ")
        died = _died_lines(log)
        assert len(died) == 1, log[-3000:]  # one death: the crash was crashes45's own at once
        assert "zombie45" not in died[0] and "no one is struck" not in died[0], died
    np.testing.assert_allclose(_evaluated(http, url, "zombie45", X), np.sin(X), rtol=1e-12)
