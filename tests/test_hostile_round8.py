"""Red team, round eight: what hostile functions still did to a real server.

One server for the module (a start costs ~3 s); each case names what a user saw before.
The functions are in tests/hostile8_functions.py; each misbehaves only on the input 666.
"""

from __future__ import annotations

import io
import subprocess
import time
from typing import Iterator

import httpx
import numpy as np
import pytest
from numpy.lib import format as npy_format

from jacobian_client import wire

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


# ----------------------------------------------------------------- rows of no elements


def _npy_head(shape: tuple[int, ...]) -> bytes:
    """An .npy body of no elements: its header alone."""
    buf = io.BytesIO()
    npy_format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": shape})
    return buf.getvalue()


@pytest.mark.parametrize("endpoint", ["evaluate", "jacobian"])
def test_rows_of_no_elements_are_counted_as_the_json_that_writes_them(server, endpoint: str) -> None:
    """A (2^28, 0) input holds nothing, and so does the output of ``sin`` of it (and its
    Jacobian, (2^28, 0, 2^28, 0)): counted 0 bytes, they passed the result limit, and
    their 2^28 empty lists, 805 MB of JSON text, were encoded on the front end's event
    loop: no answer in 90 s, every other client's request waiting with it, until the
    front end was killed (-9). Now JSON's lists count: 413 at once, the front end free."""
    url, _ = server
    started = time.monotonic()
    r = _post(url, f"/v1/functions/matrix_sin/{endpoint}", content=_npy_head((1 << 28, 0)),
              headers={"content-type": wire.NPY, "accept": wire.JSON})
    problem = assert_problem(r, 413, "result_too_large")
    assert "805306" in problem["detail"], problem  # the JSON it would have written
    # a (0, 2^28) input writes one empty list: answered, as before
    r = _post(url, f"/v1/functions/matrix_sin/{endpoint}", content=_npy_head((0, 1 << 28)),
              headers={"content-type": wire.NPY, "accept": wire.JSON})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["aux"] == [0, 1 << 28]
    expected = [0, 1 << 28] if endpoint == "evaluate" else [0, 1 << 28, 0, 1 << 28]
    assert body["output" if endpoint == "evaluate" else "jacobian"]["shape"] == expected
    r = _post(url, "/v1/functions/sin/jacobian", json={"inputs": [X]})
    assert r.status_code == 200, r.text
    assert time.monotonic() - started < 20  # minutes before; seconds of margin on a loaded machine


# ----------------------------------------------------------------- torch's kernels (last: the engine is replaced)


def _sin_served(url: str, seconds: float = 60.0) -> None:
    """Until sin's values are served right (an engine replaced: a spare promoted, or a
    cold one started)."""
    deadline = time.monotonic() + seconds
    while (r := _post(url, "/v1/functions/sin/evaluate", json={"inputs": [X]})).status_code == 503:
        assert time.monotonic() < deadline, r.text
        time.sleep(0.1)
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(r.json()["output"]["data"], np.sin(X), rtol=1e-6)


def test_a_kernel_a_function_registers_over_torchs_own_operator_replaces_the_engine(server) -> None:
    """``torch.library.Library("aten", "IMPL").impl("sin", cos, "CPU")`` in a function
    replaced torch's sin for the whole engine: every later evaluate of ``sin`` answered
    cos(x), silently, with 200s. torch cannot take such a kernel back, so the engine
    leaves after that batch for one whose operators are torch's, the function is named
    (and, one offence here, quarantined). An operator a function defines in its own
    namespace is its own business: served, the engine kept."""
    url, proc = server
    r = _post(url, "/v1/functions/own_operator/evaluate", json={"inputs": [X]})
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(r.json()["output"]["data"], np.sin(X), rtol=1e-6)
    pids = _engine_pids(url)
    _sin_served(url)
    assert _engine_pids(url) == pids  # its own operator: no engine lost
    r = _post(url, "/v1/functions/overrides_a_torch_kernel/evaluate", json=ARMED)
    assert r.status_code == 200, r.text  # its own answer, computed under its kernel
    _sin_served(url)
    assert _engine_pids(url) != pids
    _logged(proc, "overrides_a_torch_kernel changed kernels of torch's own operators (torch.library)")
    deadline = time.monotonic() + 10  # the word reaches front ends twice a second
    while (r := _post(url, "/v1/functions/overrides_a_torch_kernel/evaluate", json={"inputs": [X]})).status_code != 503:
        assert time.monotonic() < deadline, r.text
        time.sleep(0.1)
    assert_problem(r, 503, "function_quarantined")
