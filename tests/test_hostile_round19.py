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
from .test_hostile_round15 import _log_until

FUNCTIONS = "jacobian_service.examples,tests.hostile21_functions"
X = [0.5, 1.0, 2.0]
F64 = {"dtype": "float64", "shape": [3], "data": X}


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[tuple[str, subprocess.Popen]]:
    # QUARANTINE_AFTER=1: a strike on the wrong function shows. No spare: nothing here
    # takes an engine down (each case checks it is the same one).
    text = tmp_path_factory.mktemp("text") / "text.txt"
    text.write_text("é€", encoding="utf-8")  # two characters, five bytes of UTF-8
    os.environ["HOSTILE21_TEXT"] = str(text)
    try:
        with live_server(FUNCTIONS=FUNCTIONS, WORKERS=1, WARMUP="false", ENGINE_STANDBY="false", QUARANTINE_AFTER=1,
                         REQUEST_TIMEOUT_S=20, HANG_GRACE_S=0.5) as served:
            yield served
    finally:
        os.environ.pop("HOSTILE21_TEXT", None)


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=30) as c:
        yield c


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
])
def test_a_module_a_function_plants_for_anothers_first_import_is_taken_away(server, client, case: int, where: str,
                                                                            planted: str) -> None:
    """Left open by round seventeen: a function that planted a module of its own where
    another function's first ``import`` of a module looks, and returned, had that import
    get the impostor: ``imports_lazily`` (``x * SCALE``, 1.0) answered ``x * 2.0`` with a
    200 ([2, 0, 4] for [1, 0, 2]), for the engine's life. Planted as a ``sys.modules``
    entry for a module not yet imported; as a finder of its own cached for the tests
    package's directory in ``sys.path_importer_cache``; as a directory of its own first
    on ``sys.path`` holding a module of the standard library's name (``graphlib``). Now
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
    log = _log_until(proc, 0, f"plants_a_module changed {re.escape(where)}")
    assert f"plants_a_module changed {where} (to {planted}" in log, log[-3000:]
    assert _engine_pid(client, url) == pid


def test_modules_imported_and_aliased_by_a_function_stay(server, client) -> None:
    """What the import system made stays, and what no finder would find (a library's
    alias of its own modules, as ``six.moves``): a function that imports a module at its
    first call and sets an alias keeps both, and is named for nothing."""
    url, proc = server
    x = [1.0, 3.0, 2.0]
    np.testing.assert_allclose(_evaluated(client, url, "imports_lazily", x), x, rtol=1e-12)  # imports, aliases
    np.testing.assert_allclose(_evaluated(client, url, "imports_lazily", x), 2 * np.array(x), rtol=1e-12)  # kept
    assert "imports_lazily changed" not in proc.read_log()
