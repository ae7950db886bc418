"""What the warm-up and spare rounds' tests share (tests/test_hostile_round39.py, 40, 41):
their functions misbehave on the input 666 (round 11's ``_armed``) by ending their engine,
and arm the warm-ups that follow through a file in the run directory; a test then waits
for a marker the misbehaving warm-up leaves there, for the supervisor's line in the log,
and (``_fault_support.back_within``) for the service to be ready again and serve ``sin``
as ``torch.func.jacrev`` does."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import numpy as np
import torch


def body(*data: float) -> dict:
    """A JSON request body: one float64 vector."""
    return {"inputs": [{"dtype": "float64", "shape": [len(data)], "data": list(data)}]}


def ends_its_engine(url: str, function: str, case: float = 0.0) -> None:
    """``function`` armed (666, ``case`` second): it ends its engine in the request,
    which is answered 500 ``function_error`` (and arms the warm-ups that follow)."""
    r = httpx.post(f"{url}/v1/functions/{function}/evaluate", json=body(666.0, case, 0.0), timeout=60)
    assert r.status_code == 500 and r.json()["code"] == "function_error", r.text


def run_dir(url: str) -> Path:
    """The run directory of the server's engine (its ``--run-dir``)."""
    (engine,) = httpx.get(f"{url}/v1/info", timeout=30).json()["engine_pids"]
    argv = Path(f"/proc/{engine}/cmdline").read_bytes().split(b"\0")
    return Path(argv[argv.index(b"--run-dir") + 1].decode())


def wait_for_file(path: Path, within: float = 60.0) -> None:
    """Until ``path`` exists: the marker an armed warm-up (a new spare's) leaves as it
    begins to misbehave."""
    deadline = time.monotonic() + within
    while not path.exists():
        assert time.monotonic() < deadline, f"the new spare's warm-up never began ({path.name})"
        time.sleep(0.1)


def serves_sin(url: str, function: str) -> None:
    """``function``'s Jacobian is 200 and ``torch.func.jacrev(torch.sin)``'s."""
    x = [0.3, -1.2, 2.0]
    r = httpx.post(f"{url}/v1/functions/{function}/jacobian", json=body(*x), timeout=60)
    assert r.status_code == 200, r.text
    expected = torch.func.jacrev(torch.sin)(torch.tensor(x, dtype=torch.float64)).numpy()
    np.testing.assert_allclose(np.asarray(r.json()["jacobian"]["data"]).reshape(3, 3), expected, rtol=1e-12)
