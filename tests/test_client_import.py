"""The SDK's import surface: no torch, ever, and a tidy public namespace."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import jacobian_client

ROOT = Path(__file__).resolve().parents[1]


def test_import_does_not_import_torch() -> None:
    code = (
        "import sys, jacobian_client, jacobian_client.split, jacobian_client._cli_call, jacobian_client.wire\n"
        "from jacobian_client import Client, AsyncClient\n"
        "Client('http://127.0.0.1:1').close()\n"
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "print(','.join(bad))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == ""


def test_base_install_does_not_depend_on_torch() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not any(dep.lower().startswith("torch") for dep in project["dependencies"])


def test_public_names_sorted_and_present() -> None:
    names = jacobian_client.__all__
    assert names == sorted(names)
    for name in names:
        assert hasattr(jacobian_client, name), name
    for needed in ("Client", "AsyncClient", "FunctionInfo", "InputInfo", "JacobianServiceError", "APIError",
                   "TransportError", "FunctionNotFound", "InvalidInput", "Overloaded", "OutOfMemory"):
        assert needed in names


def test_error_tree() -> None:
    from jacobian_client import APIError, IncompleteResponse, JacobianServiceError, TransportError

    assert issubclass(TransportError, JacobianServiceError)
    assert issubclass(IncompleteResponse, TransportError)
    for name in ("MalformedBody", "Unauthorized", "Forbidden", "FunctionNotFound", "NotAcceptable",
                 "PayloadTooLarge", "ResultTooLarge", "UnsupportedMediaType", "InvalidInput", "Overloaded",
                 "FunctionError", "Unavailable", "Timeout", "OutOfMemory"):
        assert issubclass(getattr(jacobian_client, name), APIError), name
