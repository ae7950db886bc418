"""Red team, round forty-seven: an error's words that lift their own bound, and torch's
tables a function edits in place.

- an error whose ``__str__`` sets its own SIGALRM handler, cancels the timer
  (``signal.alarm(0)``) or catches whatever is raised into it, forever: bounded at 0.5 s
  all the same (made in a child process the engine kills: ``engine/words.py``);
- ``register_kl`` over torch's pairs (or the memo ``kl_divergence`` reads first), and
  ``torch.overrides.get_default_nowrap_functions()`` edited: put back after the batch.

Each case names what a user saw before. One real server for the file (one engine, no
spare); the functions are in tests/hostile47_functions.py, each misbehaving only on the
input 666 (round 11's ``_armed``), the second input picking how.
"""

from __future__ import annotations

import re
import subprocess
import threading
import time
from collections.abc import Iterator

import httpx
import numpy as np
import pytest

from jacobian_service.errors import exception_text

from ._fault_support import _log_until
from .conftest import assert_problem, live_server
from .test_hostile_round11 import _armed, _engine_pid
from .test_hostile_round21 import _evaluated  # an evaluate's 200 output

FUNCTIONS = "tests.hostile47_functions"
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


# ------------------------------------------------------------ an error's words


@pytest.mark.parametrize("case, kind", [
    (0, "_OwnHandlerError"),  # its __str__ sets a SIGALRM handler of its own, then spins
    (1, "_CancelsTimerError"),  # signal.alarm(0), then spins
    (2, "_CatchesAllError"),  # catches BaseException in a loop, forever
])
def test_words_that_lift_their_bound_still_cost_half_a_second(server, http, case: int, kind: str) -> None:
    """The bound on an error's words (round 45) was a SIGALRM timer in the engine: a
    ``__str__`` that set its own SIGALRM handler or cancelled the timer, then spun, ran
    as long as it liked (3.0 s for one spinning 3 s; forever: the request a 504 at its
    deadline, the engine killed as hung and replaced, the next request a 503), and one
    catching the timer's exception forever too. Now the words are made in a child
    process, killed at 0.5 s: the function's 500 naming its error's type, on the same
    engine."""
    url, _ = server
    pid = _engine_pid(http, url)
    began = time.monotonic()
    r = _armed(http, url, "raises47", case)
    took = time.monotonic() - began
    body = assert_problem(r, 500, "function_error")
    assert body["detail"] == f"{kind}: (its message was not made: its __str__ took more than 0.5 s)", body
    assert took < 5, took
    np.testing.assert_allclose(_evaluated(http, url, "raises47", X), np.sin(X), rtol=1e-12)
    assert _engine_pid(http, url) == pid


def test_words_made_apart_change_nothing_in_the_engine(server, http) -> None:
    """Words that come, made by a ``__str__`` that changes a process-wide setting on its
    way (the default dtype): the change was the engine's, put back after the batch and
    logged against the function. Made in a child, it dies with the child: the words as
    they are, and nothing to put back."""
    url, proc = server
    start = len(proc.read_log())
    body = assert_problem(_armed(http, url, "raises47", 3), 500, "function_error")
    assert body["detail"] == "_SlyError: sly words", body
    # (a later request, then the log up to it: a change would be logged before its answer)
    np.testing.assert_allclose(_evaluated(http, url, "kl47", X), np.square(X) / 2, rtol=1e-12)
    log = _log_until(proc, start, r"POST /v1/functions/kl47/evaluate 200")
    assert "raises47 changed torch's default dtype" not in log, log[-3000:]


@pytest.mark.parametrize("case", [4, 5])
def test_a_fork_hook_or_sigchld_handler_of_a_function_is_not_run_for_the_words(server, http, case: int) -> None:
    """The child made for an error's words must run none of the function's code in the
    engine: a ``before`` fork hook it registered (``os.register_at_fork``: 4) would run
    there at the fork, a SIGCHLD handler it set (5) as the child ends; each spins
    forever. Both are set aside until the child is reaped (the handler: blocking the
    signal in the engine's thread let another thread take it, and the handler ran)."""
    url, _ = server
    pid = _engine_pid(http, url)
    began = time.monotonic()
    body = assert_problem(_armed(http, url, "raises47", case), 500, "function_error")
    assert body["detail"] == "_WordyError: wordy", body
    assert time.monotonic() - began < 5
    np.testing.assert_allclose(_evaluated(http, url, "raises47", X), np.sin(X), rtol=1e-12)
    assert _engine_pid(http, url) == pid


def test_words_off_an_engine_process_are_made_in_place() -> None:
    """The in-process layout (engines on threads of the caller's process) forks nothing:
    its words are made where they are asked for, as before."""
    class Wordy(Exception):
        def __str__(self) -> str:
            return "in place"

    found = []
    thread = threading.Thread(target=lambda: found.append(exception_text(Wordy())))
    thread.start()
    thread.join()
    assert found == ["in place"]


# ------------------------------------------------------------ torch's tables


@pytest.mark.parametrize("function, what", [
    ("kl_replaces47", r"\(Normal, Normal\) replaced"),  # register_kl(Normal, Normal) over torch's
    ("kl_plants47", r"\(Normal, Normal\) planted in the memo"),  # the memo kl_divergence reads first
    ("kl_adds47", r"\(Categorical, Normal\) added"),  # a pair torch has none for
])
def test_the_kl_registry_edited_is_put_back(server, http, function: str, what: str) -> None:
    """``register_kl(Normal, Normal)(f)`` in one function (or ``f`` planted in
    ``torch.distributions.kl._KL_MEMOIZE``) had every later function's
    ``kl_divergence`` of two Normals answer ``f``'s zeros, with a 200; one registered for
    a pair torch has none for made another function's ``NotImplementedError`` (its own
    fallback) an answer of ``f``'s (measured). Now torch's entries are put back after
    the batch, the memo emptied, the function named."""
    url, proc = server
    start = len(proc.read_log())
    assert _armed(http, url, function, 0).status_code == 200  # (its own answer: nothing of KL's in it)
    np.testing.assert_allclose(_evaluated(http, url, "kl47", X), np.square(X) / 2, rtol=1e-12)
    np.testing.assert_allclose(_evaluated(http, url, "kl_missing47", X), X, rtol=1e-12)  # (no KL: its fallback)
    log = _log_until(proc, start, function + r" changed torch\.distributions' KL registry")
    assert re.search(function + r" changed torch\.distributions' KL registry \(register_kl\) or its memo \(to "
                     + what, log), log[-3000:]


def test_the_no_wrap_set_edited_is_put_back(server, http) -> None:
    """``torch.overrides.get_default_nowrap_functions().add(torch.Tensor.mul)``: every
    later tensor subclass's ``mul`` answered a plain Tensor, and a function calling its
    subclass's own method on the result failed, 500 ``AttributeError: 'Tensor' object
    has no attribute 'halve'`` (measured). Now the set is put back after the batch."""
    url, proc = server
    start = len(proc.read_log())
    assert _armed(http, url, "nowrap47", 0).status_code == 200
    np.testing.assert_allclose(_evaluated(http, url, "subclass47", X), 1.5 * np.array(X), rtol=1e-12)
    log = _log_until(proc, start, r"nowrap47 changed torch\.overrides' default no-wrap functions")
    assert "(to TensorBase.mul added)" in log, log[-3000:]


# ------------------------------------------------------------ print options, torch.func's permissions


def test_print_options_are_put_back(server, http) -> None:
    """``torch.set_printoptions(threshold=10**9, precision=1)`` (and numpy's alike) in one
    function: every later function's str of a 2,000-element tensor was 8,672 characters
    for 38 (an array's 6,084 for 23), a third printed at one digit, with a 200; a
    million-element tensor's str took 41 s for 1 ms (a victim's request a 504, its
    engine killed as hung). Now both are put back after the batch."""
    url, proc = server
    before = _evaluated(http, url, "printed47", X)
    start = len(proc.read_log())
    assert _armed(http, url, "printopts47", 0).status_code == 200
    np.testing.assert_array_equal(_evaluated(http, url, "printed47", X), before)
    log = _log_until(proc, start, r"printopts47 changed numpy's print options")
    assert "printopts47 changed torch's print options (torch.set_printoptions) (to (1, 1000000000," in log, log[-3000:]
    assert "printopts47 changed numpy's print options (np.set_printoptions)" in log, log[-3000:]


def test_torch_func_permissions_are_put_back(server, http) -> None:
    """``torch._C._functorch.set_inplace_requires_grad_allowed(True)`` (which torch.func
    sets for its own call) left so: another function's ``x.requires_grad_()`` under a
    Jacobian, torch's RuntimeError (500), answered 200 (measured). Now put back."""
    url, _ = server
    body = {"inputs": [{"dtype": "float64", "shape": [3], "data": X}]}
    refused = assert_problem(http.post(f"{url}/v1/functions/requires_grad47/jacobian", json=body), 500,
                             "function_error")
    assert _armed(http, url, "permits47", 0).status_code == 200
    again = assert_problem(http.post(f"{url}/v1/functions/requires_grad47/jacobian", json=body), 500, "function_error")
    assert again["detail"] == refused["detail"]


# ------------------------------------------------------------ torch.distributions' names


def test_torch_distributions_names_rebound_are_put_back(server, http) -> None:
    """``torch.distributions.Normal.log_prob`` rebound in one function made every later
    function's Normal log-density its zeros; ``Distribution.set_default_validate_args(False)``
    made another function's Normal of scale -1 (torch's ValueError, a 500) a 200;
    ``torch.distributions.kl_divergence`` rebound answered every later KL (measured,
    each a 200, for the engine's life: torch.distributions was no guarded namespace).
    Now its names, and its Distribution classes' (with Distribution's own), are put back."""
    url, proc = server
    start = len(proc.read_log())
    for case in (0, 1, 2):
        assert _armed(http, url, "distributions47", case).status_code == 200
    np.testing.assert_allclose(_evaluated(http, url, "log_prob47", X),
                               -np.square(X) / 2 - np.log(2 * np.pi) / 2, rtol=1e-12)
    body = assert_problem(http.post(f"{url}/v1/functions/invalid47/evaluate",
                                    json={"inputs": [{"dtype": "float64", "shape": [3], "data": X}]}),
                          500, "function_error")
    assert body["detail"].startswith("ValueError: Expected parameter scale"), body
    np.testing.assert_allclose(_evaluated(http, url, "kl47", X), np.square(X) / 2, rtol=1e-12)
    log = _log_until(proc, start, r"distributions47 rebound or deleted names in torch\.distributions \(")
    for where, names in (("torch.distributions.Normal", "log_prob"), ("torch.distributions.Distribution",
                                                                      "_validate_args"),
                         ("torch.distributions", "kl_divergence")):
        assert f"distributions47 rebound or deleted names in {where} ({names})" in log, log[-3000:]


def test_warnings_names_rebound_are_put_back(server, http) -> None:
    """``warnings.showwarning`` set to a function that raises: every later function that
    warned on its way failed, 500 ``RuntimeError: a hostile showwarning`` (measured;
    warnings was no guarded namespace). Now its names are put back after the batch."""
    url, proc = server
    start = len(proc.read_log())
    np.testing.assert_allclose(_evaluated(http, url, "warns47", X), X)
    assert _armed(http, url, "showwarning47", 0).status_code == 200  # (only functions call it: its answer stands)
    np.testing.assert_allclose(_evaluated(http, url, "warns47", X), X)
    log = _log_until(proc, start, r"showwarning47 rebound or deleted names in warnings")
    assert "showwarning47 rebound or deleted names in warnings (showwarning)" in log, log[-3000:]
