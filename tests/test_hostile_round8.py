"""Red team, round eight: what hostile functions still did to a real server.

One server for the module (a start costs ~3 s); each case names what a user saw before.
The functions are in tests/hostile8_functions.py; each misbehaves only on the input 666.
"""

from __future__ import annotations

import subprocess
import time
from typing import Iterator

import httpx
import numpy as np
import pytest

from .conftest import assert_problem, live_server

FUNCTIONS = "jacobian_service.examples,tests.hostile8_functions"
ARMED = {"inputs": [[666.0, 1.0, 2.0]]}
X = [0.5, 1.0, 2.0]


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, subprocess.Popen]]:
    # One offence quarantines: a case whose function is put right must not be quarantined.
    with live_server(FUNCTIONS=FUNCTIONS, WORKERS=1, QUARANTINE_AFTER=1, REQUEST_TIMEOUT_S=20) as served:
        yield served


def _post(url: str, path: str, **kw) -> httpx.Response:
    return httpx.post(f"{url}{path}", timeout=30, **kw)


def _engine_pids(url: str) -> list:
    return httpx.get(f"{url}/v1/info", timeout=10).json()["engine_pids"]


def _logged(proc: subprocess.Popen, text: str, seconds: float = 5.0) -> str:
    deadline = time.monotonic() + seconds
    while text not in (log := proc.read_log()):  # type: ignore[attr-defined]
        assert time.monotonic() < deadline, log[-4000:]
        time.sleep(0.05)
    return log


# ----------------------------------------------------------------- shared namespaces


def test_names_a_function_rebinds_in_torch_and_sys_modules_are_put_back(server) -> None:
    """A function that rebound names the engine and every function share was answered,
    and so was everything after it, for as long as the engine lived: ``torch.autograd.grad``
    or ``torch.func.vmap`` patched made every later Jacobian of every function a 500
    carrying the patch's error ("RuntimeError: patched ...") with ``/readyz`` 200;
    ``torch.sin = torch.cos`` and a ``torch.Tensor.sin`` of its own made every later
    ``evaluate`` of ``sin`` answer cos(x), silently. Now each name is put back after the
    function's batch, in the same engine (no restart), and the log names the function."""
    url, proc = server
    pids = _engine_pids(url)
    r = _post(url, "/v1/functions/rebinds_shared_names/jacobian", json=ARMED)
    if r.status_code != 200:  # its own request may meet its own patches
        assert_problem(r, 500, "function_error")
    for _ in range(2):  # the first answered by the engine as restored, and again
        r = _post(url, "/v1/functions/sin/jacobian", json={"inputs": [X]})
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(r.json()["jacobian"]["data"], np.diag(np.cos(X)), rtol=1e-6)
        for name in ("sin", "rebinds_shared_names"):  # torch.sin(x), x.sin()
            r = _post(url, f"/v1/functions/{name}/evaluate", json={"inputs": [X]})
            assert r.status_code == 200, r.text
            np.testing.assert_allclose(r.json()["output"]["data"], np.sin(X), rtol=1e-6)
    # a batch keyed for sizing (``from .engine.profile import``) and a Hessian (vmap, grad)
    r = _post(url, "/v1/functions/sum_sin/hessian", json={"inputs": [X]})
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(r.json()["hessian"]["data"], np.diag(-np.sin(X)), rtol=1e-6, atol=1e-7)
    assert _engine_pids(url) == pids  # put back in place: no engine was lost to it
    log = _logged(proc, "rebinds_shared_names rebound or deleted names in torch.autograd (grad)")
    for where in ("names in torch (sin)", "names in torch.func (vmap)", "names in torch.Tensor (sin)",
                  "sys.modules entries (jacobian_service.engine.profile, orjson)"):
        assert f"rebinds_shared_names rebound or deleted {where}" in log, log[-4000:]
    assert "Traceback" not in log
