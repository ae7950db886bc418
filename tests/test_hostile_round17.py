"""Red team, round seventeen: what a function patches or changes and what the engine's
put-back did not see, what a function's own answer is when it left a patch, and a
function's output across engine restarts.

Each case names what a user saw before. One real server for the module (as round
fifteen); the functions are in tests/hostile17_functions.py, each misbehaving only on
the input 666 (round 11's ``_armed``), the second input picking how.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from jacobian_service.output_relay import OutputRelay

from .conftest import assert_problem, live_server
from .hostile17_functions import B, W
from .test_hostile_round11 import _armed, _engine_pid
from .test_hostile_round13 import _sin_ok
from .test_hostile_round15 import _log_until

FUNCTIONS = "jacobian_service.examples,tests.hostile17_functions"
X = [0.5, 1.0, 2.0]
F64 = {"dtype": "float64", "shape": [3], "data": X}


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, subprocess.Popen]]:
    # QUARANTINE_AFTER=1: a strike on the wrong function shows. No spare: nothing here
    # takes an engine down (each case checks it is the same one).
    with live_server(FUNCTIONS=FUNCTIONS, WORKERS=1, WARMUP="false", ENGINE_STANDBY="false", QUARANTINE_AFTER=1,
                     REQUEST_TIMEOUT_S=20, HANG_GRACE_S=0.5) as served:
        yield served


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=30) as c:
        yield c


# ------------------------------------------------------------ torch.nn's classes


def _linear_served_right(client: httpx.Client, url: str) -> None:
    """Another client's ``tanh(W x + b)`` (torch.nn.Linear, torch.nn.Tanh): its value and
    its Jacobian, ``diag(1 - tanh^2) W``, as computed here."""
    y = np.tanh(np.array(W) @ X + np.array(B))
    r = client.post(f"{url}/v1/functions/uses_linear/jacobian", json={"inputs": [F64], "return_output": True})
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(r.json()["jacobian"]["data"], np.diag(1 - y * y) @ np.array(W), rtol=1e-12)
    np.testing.assert_allclose(r.json()["output"]["data"], y, rtol=1e-12)


@pytest.mark.parametrize("case, where", [(1, "names in torch.nn.Linear (forward)"),
                                         (2, "names in torch.nn.Tanh (__call__)")])
def test_a_torch_nn_class_a_function_patches_is_put_back(server, client, case: int, where: str) -> None:
    """Left open by round fifteen: torch.nn's classes were not guarded, only nn.Module
    itself. A function that set ``torch.nn.Linear.forward`` to double, or a ``__call__``
    of its own on ``torch.nn.Tanh`` (over nn.Module's), and returned had every later
    function's Linear (Tanh) layer, and its Jacobian, changed, with a 200, for the
    engine's life. Each of torch.nn's Module classes is now guarded as nn.Module is (a
    version tag each, read in one gather): put back after the batch, the log naming the
    function; its own request is its 500, naming the patch."""
    url, proc = server
    pid = _engine_pid(client, url)
    _linear_served_right(client, url)
    problem = assert_problem(_armed(client, url, "patches_nn", case), 500, "function_error")
    assert problem["detail"].startswith(f"patches_nn rebound or deleted {where}, which the engine's work"), problem
    _linear_served_right(client, url)
    log = _log_until(proc, 0, f"patches_nn rebound or deleted {re.escape(where)}")
    assert f"patches_nn rebound or deleted {where} and left them so" in log, log[-3000:]
    assert _engine_pid(client, url) == pid  # put back in place, no one struck
    _sin_ok(client, url)




# ------------------------------------------------------------ the import system and randomness


def test_an_import_finder_a_function_puts_ahead_of_pythons_is_put_behind(server, client) -> None:
    """A function that put an import finder of its own first on ``sys.meta_path`` and
    returned answered every later import of every function: another function importing
    a module at its first call got the finder's impostor (``x * 2.0`` for ``x * 1.0``,
    with a 200). The finders are now put back after the batch (one put ahead of Python's
    own goes behind them, where it finds only what nothing else would), the log naming
    the function. A setting of the process, not a name the engine's work goes through:
    the function's own answer stands."""
    url, proc = server
    r = _armed(client, url, "inserts_an_import_finder", 1)
    assert r.status_code == 200, r.text
    r = client.post(f"{url}/v1/functions/uses_a_lazy_import/evaluate", json={"inputs": [F64]})
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(r.json()["output"]["data"], X, rtol=1e-12)  # the real module's SCALE, 1.0
    log = _log_until(proc, 0, "inserts_an_import_finder changed the import system's finders")
    assert "inserts_an_import_finder changed the import system's finders (ahead of Python's own on sys.meta_path, " \
           "sys.path_hooks) (to add _Impostor)" in log, log[-3000:]


def test_a_seed_a_function_sets_is_not_left_for_the_next_functions_draws(server, client) -> None:
    """``torch.manual_seed(0)`` in a function left torch's generator, which every
    function draws from, in a known state after each of its calls: another client's
    ``x + rand`` (a Monte Carlo step) answered the same draws after each of them, the
    ones ``torch.manual_seed(0); torch.rand(3)`` gives anywhere. The engine now draws a
    fresh seed after a batch that set one (the log naming the function): the next draws
    are unknown, and differ at each time."""
    url, proc = server
    torch.manual_seed(0)  # (this process's generator: what anyone can compute)
    known = torch.rand(3, dtype=torch.float64).numpy()
    drawn = []
    for _ in range(2):
        r = _armed(client, url, "seeds_torch", 0)
        assert r.status_code == 200, r.text
        r = client.post(f"{url}/v1/functions/noisy/evaluate",
                        json={"inputs": [{"dtype": "float64", "shape": [3], "data": [0.0, 0.0, 0.0]}]})
        assert r.status_code == 200, r.text
        drawn.append(np.array(r.json()["output"]["data"]))
        assert ((0 <= drawn[-1]) & (drawn[-1] < 1)).all(), drawn
    assert not np.array_equal(drawn[0], known) and not np.array_equal(drawn[1], known), (drawn, known)
    assert not np.array_equal(drawn[0], drawn[1]), drawn
    log = _log_until(proc, 0, "seeds_torch changed torch's random seed")
    assert "seeds_torch changed torch's random seed (torch.manual_seed) (to 0) and left it so; put back to a seed " \
           "drawn afresh" in log, log[-3000:]

# ------------------------------------------------------------ the engine's table of functions


@pytest.mark.parametrize("case, where", [(1, "names in the registry's squares (fn)"),
                                         (2, "names in the registry's squares (__code__)"),
                                         (3, "names in the registry (squares)"),
                                         (4, "names in the registry's scaled (__defaults__)")])
def test_another_functions_code_swapped_in_is_put_back(server, client, case: int, where: str) -> None:
    """A function that reached another function's spec (its module's
    ``__jacobian_functions__``) and set its ``fn`` to one of its own (``object.__setattr__``
    gets past the frozen dataclass), set its ``__code__`` to its own (or another's ``__defaults__``), or put another spec
    under its name in the engine's registry (found up the stack), had every later request
    of that function (another client's ``x * x``) answer its code's (``x^3``: a Jacobian
    diag(3x^2)), with a 200, for the engine's life. The registry, each spec, its inputs
    and its function's code are now guarded as the namespaces are: put back after the
    batch, the log naming the function; its own request is its 500, naming the change."""
    url, proc = server
    pid = _engine_pid(client, url)

    def squares_served_right() -> None:
        r = client.post(f"{url}/v1/functions/squares/jacobian", json={"inputs": [F64], "return_output": True})
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(r.json()["jacobian"]["data"], np.diag(2 * np.array(X)), rtol=1e-12)
        np.testing.assert_allclose(r.json()["output"]["data"], np.square(X), rtol=1e-12)

    def scaled_served_right() -> None:  # (case 4: its default, 2.0, set to 3.0)
        r = client.post(f"{url}/v1/functions/scaled/jacobian", json={"inputs": [F64]})
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(r.json()["jacobian"]["data"], 2 * np.eye(3), rtol=1e-12)

    squares_served_right()
    scaled_served_right()
    problem = assert_problem(_armed(client, url, "swaps_a_function", case), 500, "function_error")
    assert problem["detail"].startswith(f"swaps_a_function rebound or deleted {where}, which the engine's"), problem
    squares_served_right()
    scaled_served_right()
    # (logged once per function and namespace: the spec's, for the first case that changed it)
    log = _log_until(proc, 0, "swaps_a_function rebound or deleted names in the registry")
    assert "swaps_a_function rebound or deleted names in the registry" in log, log[-3000:]
    assert _engine_pid(client, url) == pid


# ------------------------------------------------------------ output across a restart


def test_a_spare_that_takes_a_dead_engines_place_draws_on_what_it_left_of_its_output_budget(tmp_path: Path) -> None:
    """Left open by round fifteen: each engine process had an output budget of its own,
    full as it started, so a function that printed its 16 seconds' worth and then
    crashed its engine had a full budget again in the spare promoted at once, and again
    at the next crash: it printed its way through each restart. The budget is now the
    engine's (its index): the process that takes its place draws on what the dead one
    left; another engine's budget is its own."""
    log_path = tmp_path / "serve.log"
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    relay = OutputRelay(1024, out=log_fd, err=log_fd)  # 1 KiB a second, 16 KiB at once
    relay.start()
    line = b"z" * 63 + b"\n"

    def relayed(key: int, pid: int, lines: int) -> int:
        """Bytes a process of engine ``key`` got into the log of the ``lines`` it wrote."""
        before = log_path.stat().st_size
        read, write = relay.pipe()
        relay.watch(key, f"engine {key} (pid {pid})", [(read, 1)])
        os.write(write, line * lines)
        os.close(write)
        assert relay.flush(10)
        return log_path.stat().st_size - before

    try:
        assert relayed(0, 101, 512) == 16 << 10  # 32 KiB written, its burst passed
        started = time.monotonic()
        passed = relayed(0, 102, 512)  # the spare promoted in its place: no fresh burst
        assert passed <= 1024 * (time.monotonic() - started + 1), passed  # what refilled meanwhile, no more
        assert relayed(1, 103, 128) == 8 << 10  # another engine: its own budget
    finally:
        relay.stop(2.0)
        os.close(log_fd)
