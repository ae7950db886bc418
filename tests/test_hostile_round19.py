"""Red team, round nineteen: what a function plants in the import system for another
function's first import to find, and the state of the standard library and numpy it
leaves for the next function (round seventeen's leftovers).

Each case names what a user saw before. One real server for the module (as round
seventeen); the functions are in tests/hostile21_functions.py, each misbehaving only on
the input 666 (round 11's ``_armed``), the second input picking how.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator

import httpx
import numpy as np
import pytest

from .conftest import live_server
from .test_hostile_round11 import _armed, _engine_pid
from ._fault_support import MARKS, _log_complete
from .test_hostile_round15 import _log_until
from .test_hostile_round17 import X, client  # noqa: F401  (its inputs [0.5, 1, 2]; its module's httpx client)

FUNCTIONS = "jacobian_service.examples,tests.hostile21_functions,tests.hostile21_victims"


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[tuple[str, subprocess.Popen]]:
    # QUARANTINE_AFTER=1: a strike on the wrong function shows. No spare: nothing here
    # takes an engine down (each case checks it is the same one).
    text = tmp_path_factory.mktemp("text") / "text.txt"
    text.write_text("é€", encoding="utf-8")  # two characters, five bytes of UTF-8
    os.environ["HOSTILE21_TEXT"] = str(text)
    try:
        with live_server(FUNCTIONS=f"{FUNCTIONS},{MARKS}", WORKERS=1, WARMUP="false", ENGINE_STANDBY="false", QUARANTINE_AFTER=1,
                         REQUEST_TIMEOUT_S=20, HANG_GRACE_S=0.5) as served:
            yield served
    finally:
        os.environ.pop("HOSTILE21_TEXT", None)


def _evaluated(client: httpx.Client, url: str, function: str, x: list[float]) -> list[float]:
    r = client.post(f"{url}/v1/functions/{function}/evaluate",
                    json={"inputs": [{"dtype": "float64", "shape": [len(x)], "data": x}]})
    assert r.status_code == 200, r.text
    return r.json()["output"]["data"]


# ------------------------------------------------------------ the import system


@pytest.mark.parametrize("case, where, planted", [
    (0, "sys.modules (entries no import made, where a finder finds the module)", "add tests.hostile21_lazy"),
    (1, "sys.path_importer_cache (finders the path hooks did not make)", "add " + os.path.dirname(__file__)),
    (2, "sys.path (entries ahead of those the engine started with)", "put /"),
    (3, "sys.modules (entries no import made, where a finder finds the module)", None),  # (logged at case 0)
])
def test_a_module_a_function_plants_for_anothers_first_import_is_taken_away(server, client, case: int, where: str,
                                                                            planted: str | None) -> None:
    """Left open by round seventeen: a function that planted a module of its own where
    another function's first ``import`` of a module looks, and returned, had that import
    get the impostor: ``imports_lazily`` (``x * SCALE``, 1.0) answered ``x * 2.0`` with a
    200 ([2, 0, 4] for [1, 0, 2]), for the engine's life. Planted as a ``sys.modules``
    entry for a module not yet imported; as a finder of its own cached for the tests
    package's directory in ``sys.path_importer_cache``; as a directory of its own first
    on ``sys.path`` holding a module of the standard library's name (``graphlib``); or
    the entry with a finder cached for its directory that finds nothing. Now
    each is taken away after the batch (the entry no import made, the finder no path hook
    made; the path's own entries first again), the log naming the function, and the
    other function imports the real module. A setting of the process, not a name the
    engine's work goes through: the planter's own answer stands."""
    url, proc = server
    pid = _engine_pid(client, url)
    r = _armed(client, url, "plants_a_module", case)
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(r.json()["output"]["data"], np.sin([666.0, case, 0.0]), rtol=1e-12)
    x = [1.0, float(case), 2.0]  # (x[1] picks the module imported)
    np.testing.assert_allclose(_evaluated(client, url, "imports_lazily", x), x, rtol=1e-12)  # the real SCALE, 1.0
    if planted is not None:
        log = _log_until(proc, 0, f"plants_a_module changed {re.escape(where)}")
        assert f"plants_a_module changed {where} (to {planted}" in log, log[-3000:]
    assert _engine_pid(client, url) == pid


def test_modules_imported_and_aliased_by_a_function_stay(server, client) -> None:
    """What the import system made stays, and what no finder would find (a library's
    alias of its own modules, as ``six.moves``): a function that imports a module at its
    first call and sets an alias keeps both, and is named for nothing."""
    url, proc = server
    x = [1.0, 4.0, 2.0]
    np.testing.assert_allclose(_evaluated(client, url, "imports_lazily", x), x, rtol=1e-12)  # imports, aliases
    np.testing.assert_allclose(_evaluated(client, url, "imports_lazily", x), 2 * np.array(x), rtol=1e-12)  # kept
    assert "imports_lazily changed" not in _log_complete(proc, url)  # (the engine's line would be on its way)


# ------------------------------------------------------------ the standard library's and numpy's state


@pytest.mark.parametrize("case, shown", [(0, "prec=3"), (1, "prec=3, traps=['Inexact'")])
def test_decimals_context_a_function_changes_is_put_back(server, client, case: int, shown: str) -> None:
    """Left open by round seventeen: ``decimal.getcontext().prec = 3`` in a function, and
    another client's ``x * sqrt(2)`` taken in decimal answered 1.41 (``[0.705, 1.41,
    2.82]``) with a 200; a context of its own with a trap on ``Inexact``
    (``decimal.setcontext``) failed it, 500 ``Inexact``, for the engine's life (the
    context is the engine thread's, which runs every function). Now it is put back after
    the batch, the log naming the function and what it set."""
    url, proc = server
    r = _armed(client, url, "changes_a_state", case)
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(_evaluated(client, url, "decimal_scale", X), np.sqrt(2) * np.array(X), rtol=1e-15)
    if case == 0:  # (logged once per function and setting)
        log = _log_until(proc, 0, "changes_a_state changed decimal's context")
        assert f"changes_a_state changed decimal's context (decimal.getcontext, setcontext) (to {shown})" in log, \
            log[-3000:]


@pytest.mark.parametrize("case, victim, what", [
    (2, "python_noise", "the state of Python's random generator"),
    (3, "numpy_noise", "the state of numpy's global random generator"),
])
def test_a_seed_a_function_sets_in_random_or_numpy_is_not_left_for_the_next_draws(server, client, case: int, victim: str,
                                                                                  what: str) -> None:
    """Left open by round seventeen (which did it for ``torch.manual_seed``):
    ``random.seed(0)`` or ``np.random.seed(0)`` in a function left Python's (numpy's)
    global generator in a known state after each of its calls: another client's
    ``x + random()`` answered the same draws after each of them, the ones that seed gives
    anywhere ([0.844, 0.758, 0.421]; numpy's [0.549, 0.715, 0.603]). Now a generator
    whose state a batch moved is re-seeded from the OS's entropy after it: the next draws
    are unknown, and differ each time."""
    url, proc = server
    if case == 2:
        import random

        random.seed(0)  # (this process's generator: what anyone can compute)
        known = np.array([random.random() for _ in range(3)])
    else:
        known = np.random.RandomState(0).rand(3)
    drawn = []
    for _ in range(2):
        r = _armed(client, url, "changes_a_state", case)
        assert r.status_code == 200, r.text
        drawn.append(np.array(_evaluated(client, url, victim, [0.0, 0.0, 0.0])))
        assert ((0 <= drawn[-1]) & (drawn[-1] < 1)).all(), drawn
    assert not np.allclose(drawn[0], known) and not np.allclose(drawn[1], known), (drawn, known)
    assert not np.array_equal(drawn[0], drawn[1]), drawn
    log = _log_until(proc, 0, f"changes_a_state changed {what}")
    assert f"changes_a_state changed {what}" in log and "put back to a seed drawn afresh" in log, log[-3000:]


@pytest.mark.parametrize("case, victim, changed", [
    (4, "reads_text", "the locale (locale.setlocale) (to C)"),
    (5, "runs_python", "environment variables (to other values of PYTHONHOME)"),
    (9, "runs_python", "the environment as programs get it (os.putenv, setenv) (to other values of PYTHONHOME)"),
])
def test_the_locale_or_a_variable_steering_programs_a_function_sets_is_put_back(server, client, case: int, victim: str,
                                                                                changed: str) -> None:
    """Left open by round seventeen: ``locale.setlocale(locale.LC_ALL, "C")`` in a
    function (the engine's is C.UTF-8 here), and every later function reading a UTF-8
    text file with ``open()``'s default encoding (the locale's) failed, 500
    ``UnicodeDecodeError: 'ascii' codec can't decode byte 0xc3``, for the engine's life.
    And only the environment variables the engine started with were put back: one a
    function added stayed, as libraries add theirs, and went to every later program of
    every function that ran one: ``os.environ["PYTHONHOME"] = "/nonexistent"`` made
    another client's function that runs ``python -c 'print(1.0)'`` fail, 500
    ``CalledProcessError`` (the child's "Fatal Python error: init_fs_encoding"); an
    ``LD_PRELOAD`` of its own would have run its library in each; ``os.putenv`` (past
    ``os.environ``, which the engine read) did the same unseen. Now the locale is put
    back after the batch, and the dynamic loader's, the interpreter's and a few more such
    variables (``LD_*``, ``PYTHON*``, ``GLIBC_TUNABLES``...) a function adds are taken
    away, the log naming the function (and the variable, never its value)."""
    url, proc = server
    np.testing.assert_allclose(_evaluated(client, url, victim, X), X, rtol=1e-15)  # x * 1
    start = len(proc.read_log())
    r = _armed(client, url, "changes_a_state", case)
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(_evaluated(client, url, victim, X), X, rtol=1e-15)
    log = _log_until(proc, start, f"changes_a_state changed {re.escape(changed.split(' (')[0])}")
    assert f"changes_a_state changed {changed}" in log, log[-3000:]
    assert "/nonexistent" not in log, log


# ------------------------------------------------------------ another function's module


def test_a_global_of_another_functions_module_a_function_rebinds_is_put_back(server, client) -> None:
    """Left open by round seventeen (README named it a limit): a function that rebound
    a global of another module's functions (``victims.SCALE = 2.0``) had every later
    request of them answer with it: another client's ``x * SCALE`` answered ``x * 2.0``
    with a 200, for the engine's life. Each function's module is now guarded as the
    engine's namespaces are (a version tag each, in the one gather): a name another
    module's function rebinds there is put back after its batch, the log naming it. What
    a module's own functions rebind there stays (a counter of its calls counts on)."""
    url, proc = server
    pid = _engine_pid(client, url)
    np.testing.assert_allclose(_evaluated(client, url, "counts_calls", X), X, rtol=1e-15)
    r = _armed(client, url, "rebinds_a_global", 1)
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(_evaluated(client, url, "module_scaled", X), X, rtol=1e-15)
    np.testing.assert_allclose(_evaluated(client, url, "counts_calls", X), 2 * np.array(X), rtol=1e-15)
    log = _log_until(proc, 0, "rebinds_a_global rebound or deleted")
    assert "rebinds_a_global rebound or deleted names in the module tests.hostile21_victims (SCALE)" in log, log[-3000:]
    assert "counts_calls rebound" not in log, log[-3000:]
    assert _engine_pid(client, url) == pid


# ------------------------------------------------------------ the engine's own log


@pytest.mark.parametrize("case, trigger, line", [
    (1, 6, "changes_a_state changed the umask"),
    (2, 7, "changes_a_state changed the thread switch interval"),
    (3, 8, "changes_a_state changed the digit limit of int-string conversions"),
])
def test_what_a_function_does_to_the_services_log_on_its_way_is_put_back(server, client, case: int, trigger: int,
                                                                         line: str) -> None:
    """The service's loggers' level, handlers and disabled flag were put back after a
    batch, not what a record goes through on its way: a filter dropping every record
    added to the ``jacobian_service`` logger, its handler's stream set to /dev/null
    (``setStream``), or a record factory blanking every message
    (``logging.setLogRecordFactory``), and every later line the engine logged was gone,
    among them those naming the functions that changed its settings (a later function's
    umask). Now those are put back too, the log naming the function."""
    url, proc = server
    start = len(proc.read_log())
    r = _armed(client, url, "silences_the_log", case)
    assert r.status_code == 200, r.text
    r = _armed(client, url, "changes_a_state", trigger)
    assert r.status_code == 200, r.text
    log = _log_until(proc, start, re.escape(line))
    assert line in log, log[-3000:]
    if case == 1:  # (logged once per function and setting)
        assert "silences_the_log changed the service's own loggers" in log, log[-3000:]


def test_a_variable_of_another_functions_closure_a_function_sets_is_put_back(server, client) -> None:
    """As a module's global, a variable of the closure a factory made a function in
    (``make(scale)``): another module's function that set
    ``victim.__closure__[0].cell_contents = 2.0`` had every later request of it answer
    ``x * 2.0`` with a 200, for the engine's life. The functions' closure cells are now
    read in the same gather: put back after the batch, the log naming the function."""
    url, proc = server
    np.testing.assert_allclose(_evaluated(client, url, "closure_scaled", X), X, rtol=1e-15)
    r = _armed(client, url, "rebinds_a_global", 2)
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(_evaluated(client, url, "closure_scaled", X), X, rtol=1e-15)
    log = _log_until(proc, 0, "rebinds_a_global rebound or deleted names in the closure")
    assert "rebinds_a_global rebound or deleted names in the closure of closure_scaled (scale)" in log, log[-3000:]
