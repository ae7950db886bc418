"""A function that changes process-wide settings changes them for its own calls only:
the engine puts them back after each batch (engine/process_settings.py).

Before, ``torch.set_default_dtype(torch.float64)`` in one function made every later
``evaluate`` of another, which builds ``torch.ones``, answer float64 instead of float32;
and ``warnings.simplefilter("error")`` in one function made every other function that
warns on its way (as much user code does) fail with 500, in the same engine process for
as long as it lived.
"""

from __future__ import annotations

import gc
import logging
import sys
import warnings

import httpx
import numpy as np
import pytest
import torch

from .conftest import live_server

FUNCTIONS = "jacobian_service.examples,tests.settings_functions"
X = {"inputs": [[0.5, 1.0, 2.0]]}


def _output_dtype(post) -> str:
    r = post("/v1/functions/scaled_by_ones/evaluate", json=X)
    assert r.status_code == 200, r.text
    return r.json()["output"]["dtype"]


def _sin_ok(post, name: str) -> None:
    r = post(f"/v1/functions/{name}/jacobian", json=X)
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(r.json()["jacobian"]["data"], np.diag(np.cos(X["inputs"][0])), rtol=1e-6)


def _settings() -> tuple:
    return (torch.get_default_dtype(), torch.is_anomaly_enabled(), torch.get_num_threads(),
            torch.get_float32_matmul_precision(), [f for f in warnings.filters if f[0] == "error"], gc.isenabled(),
            np.geterr(), sys.getrecursionlimit())


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def kept():
    """This process's settings as they were, whatever the test leaves (it shares them
    with the in-process engine)."""
    from jacobian_service.engine.process_settings import ProcessSettings

    settings = ProcessSettings()
    yield
    settings.restore("the test")


@pytest.fixture
def engine_log():
    handler = _Lines()
    logger = logging.getLogger("jacobian_service.engine")
    logger.addHandler(handler)
    yield handler.lines
    logger.removeHandler(handler)


CHANGERS = {  # function -> the settings it changes
    "sets_float64_default": 1, "turns_on_anomaly_detection": 1, "sets_threads_and_tf32": 2,
    "sets_warnings_to_errors": 1, "disables_gc_and_raises_on_numpy_errors": 2, "lowers_recursion_limit": 1,
}


def test_settings_a_function_changes_are_put_back_in_process(make_client, engine_log, kept):
    """The in-process layout, whose engine threads share this test's settings."""
    before = _settings()
    c = make_client(functions=FUNCTIONS)
    assert _output_dtype(c.post) == "float32"
    for name in CHANGERS:
        _sin_ok(c.post, name)
        assert _settings() == before, name
        assert _output_dtype(c.post) == "float32"
    _sin_ok(c.post, "sets_float64_default")  # again: logged once per function and setting
    named = [line for line in engine_log if "put back" in line]
    assert len(named) == sum(CHANGERS.values()), named
    assert any(line.startswith("sets_float64_default changed torch's default dtype (to torch.float64)")
               for line in named), named


def test_what_one_function_changes_does_not_reach_others_in_an_engine_process():
    with live_server(FUNCTIONS=FUNCTIONS, WORKERS=1, ENGINE_STANDBY="false") as (url, proc):
        with httpx.Client(base_url=url, timeout=30) as client:
            assert _output_dtype(client.post) == "float32"
            _sin_ok(client.post, "sets_float64_default")
            assert _output_dtype(client.post) == "float32"
            # A function that warns on its way, after another made warnings errors.
            _sin_ok(client.post, "warns_and_works")
            _sin_ok(client.post, "sets_warnings_to_errors")
            _sin_ok(client.post, "warns_and_works")
        log = proc.read_log()
        assert "sets_float64_default changed torch's default dtype" in log
        assert "sets_warnings_to_errors changed the warning filters" in log
