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


_BLOCK = (
    "import sys\n"
    "for name in ('torch', 'jax', 'jaxlib', 'scipy'):\n"
    "    sys.modules[name] = None  # any import of them raises ImportError\n"
)


def test_sdk_installs_and_imports_without_torch_jax_or_scipy() -> None:
    """The adapters are extras: the SDK (and the numpy-only SciPy helpers) import with
    torch, jax and scipy all unavailable; the torch and jax adapters say what is missing."""
    code = _BLOCK + (
        "import jacobian_client, jacobian_client.scipy, jacobian_client._remote\n"
        "from jacobian_client import Client\n"
        "from jacobian_client.scipy import remote_objective\n"
        "remote_objective(Client('http://127.0.0.1:1'), 'rosenbrock')\n"
        "for mod in ('jacobian_client.torch', 'jacobian_client.jax'):\n"
        "    try:\n"
        "        __import__(mod)\n"
        "    except ImportError as exc:\n"
        "        print(mod, 'ImportError', exc.name)\n"
        "    else:\n"
        "        print(mod, 'imported')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["jacobian_client.torch ImportError torch", "jacobian_client.jax ImportError jax"]


def test_extras_declare_the_adapters() -> None:
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    for extra, package in (("torch", "torch"), ("jax", "jax"), ("scipy", "scipy")):
        assert any(dep.startswith(package + ">=") for dep in extras[extra]), extras[extra]
    assert not any(dep.lower().startswith(("jax", "scipy")) for dep in project["dependencies"])
