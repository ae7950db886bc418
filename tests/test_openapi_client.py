"""The OpenAPI document as other languages' tooling sees it (issue 10, item 24).

* it validates as OpenAPI 3.1 (openapi-spec-validator);
* openapi-python-client, a widely used generator, makes a client from the served
  ``/openapi.json`` with every derivative endpoint in it, named by the short
  ``operationId``s and typed by the named components; and that generated client,
  imported as a user would, calls every derivative endpoint of a real server, each
  result compared with the same ``torch.func`` call in-process.

Both tools are pinned in the ``dev`` extra, so CI runs these; the skips below only say
what is missing on a machine installed without it.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import httpx
import numpy as np
import pytest
import torch
from torch.func import hessian, jacrev, jvp, vjp

from jacobian_client import wire
from jacobian_service.registry import Registry

from .conftest import assert_tree_close, live_server

DERIVATIVES = ("jacobian", "hessian", "evaluate", "vjp", "jvp", "hvp")
PACKAGE = "jacobian_service_generated_client"


def _generator() -> str:
    """The generator's console script from this interpreter's environment."""
    here = Path(sys.executable).parent / "openapi-python-client"
    found = str(here) if here.exists() else shutil.which("openapi-python-client")
    if found is None:
        pytest.skip("openapi-python-client is not installed (pip install -e '.[dev]' installs it)")
    return found


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with live_server(WORKERS=1, WARMUP="false", ENGINE_STANDBY="false") as (url, _proc):
        yield url


@pytest.fixture(scope="module")
def document(server: str) -> dict[str, Any]:
    return httpx.get(f"{server}/openapi.json", timeout=30).json()


def test_document_validates_as_openapi_3_1(document: dict[str, Any]) -> None:
    validator = pytest.importorskip("openapi_spec_validator", reason="openapi-spec-validator is not installed")
    validator.validate(document)  # raises on the first error
    # The named components the generators type their models from, and short operationIds.
    schemas = document["components"]["schemas"]
    for name in ("Array", "ArrayData", "ArrayBase64", "Problem", *(f"{k.capitalize()}{r}" for k in DERIVATIVES for r in ("Request", "Response"))):
        assert name in schemas, name
    for kind in DERIVATIVES:
        op = document["paths"][f"/v1/functions/{{name}}/{kind}"]["post"]
        assert op["operationId"] == kind
        assert set(op["requestBody"]["content"]) == {wire.JSON, wire.NPY, wire.NPZ}  # binary types kept


@pytest.fixture(scope="module")
def generated(document: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The generated package, importable: generated into a temporary folder, put on
    sys.path for this module's tests and taken off again."""
    tool = _generator()
    folder = tmp_path_factory.mktemp("generated")
    spec = folder / "openapi.json"
    spec.write_text(json.dumps(document))
    out = folder / PACKAGE
    # The generator formats its output with ruff when it finds it on PATH (ruff is one of
    # its dependencies, installed beside it); without it, it still writes the package.
    env = {**os.environ, "PATH": f"{Path(tool).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    run = subprocess.run(
        [tool, "generate", "--path", str(spec), "--output-path", str(out), "--meta", "none", "--overwrite"],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    # The generator warns about the .npy/.npz request bodies (it has no model for binary
    # bodies besides multipart), and about nothing it had to leave out.
    said = run.stdout + run.stderr
    assert "will not be generated" not in said and "Invalid" not in said, said
    sys.path.insert(0, str(folder))
    try:
        yield importlib.import_module(PACKAGE)
    finally:
        sys.path.remove(str(folder))
        for name in [m for m in sys.modules if m == PACKAGE or m.startswith(PACKAGE + ".")]:
            del sys.modules[name]


def test_generated_client_has_every_derivative_endpoint(generated: Any) -> None:
    for kind in DERIVATIVES:
        module = importlib.import_module(f"{PACKAGE}.api.derivatives.{kind}")
        assert callable(module.sync_detailed) and callable(module.asyncio)
        model = importlib.import_module(f"{PACKAGE}.models")
        assert hasattr(model, f"{kind.capitalize()}Request") and hasattr(model, f"{kind.capitalize()}Response")


def _array(obj: Any) -> np.ndarray:
    """A generated ArrayData model (or the raw JSON) -> numpy, through the wire module."""
    raw = obj.to_dict() if hasattr(obj, "to_dict") else obj
    return wire.decode_tree(raw)


def test_generated_client_calls_every_derivative_endpoint(server: str, generated: Any) -> None:
    models = importlib.import_module(f"{PACKAGE}.models")
    with importlib.import_module(PACKAGE).Client(base_url=server, timeout=httpx.Timeout(60)) as client:
        _call_every_endpoint(client, models)


def _call_every_endpoint(client: Any, models: Any) -> None:
    registry = Registry.from_modules()
    softmax, rosenbrock = registry.get("softmax").fn, registry.get("rosenbrock").fn

    x = [0.3, -1.2, 0.7, 2.0]
    v = [1.0, -0.5, 0.25, 2.0]
    xt, vt = torch.tensor(x), torch.tensor(v)
    cases = {
        # kind: (function, request fields, result attribute, what torch.func says)
        "jacobian": ("softmax", {}, "jacobian", jacrev(softmax)(xt)),
        "hessian": ("rosenbrock", {}, "hessian", hessian(rosenbrock)(xt)),
        "evaluate": ("softmax", {}, "output", softmax(xt)),
        "vjp": ("softmax", {"cotangents": v}, "vjp", vjp(softmax, xt)[1](vt)[0]),
        "jvp": ("softmax", {"tangents": v}, "jvp", jvp(softmax, (xt,), (vt,))[1]),
        "hvp": ("rosenbrock", {"tangents": v}, "hvp", jvp(jacrev(rosenbrock), (xt,), (vt,))[1]),
    }
    for kind, (function, extra, attribute, want) in cases.items():
        endpoint = importlib.import_module(f"{PACKAGE}.api.derivatives.{kind}")
        request_model = getattr(models, f"{kind.capitalize()}Request")
        name_enum = getattr(models, f"{kind.capitalize()}Name")
        body = request_model.from_dict({"inputs": [x], **extra})
        response = endpoint.sync_detailed(name=name_enum(function), client=client, body=body)
        assert response.status_code == 200, (kind, response.content[:500])
        parsed = response.parsed
        assert isinstance(parsed, getattr(models, f"{kind.capitalize()}Response")), (kind, type(parsed))
        assert parsed.function == function
        got = _array(getattr(parsed, attribute))
        assert_tree_close(got, want.detach().numpy(), rtol=1e-4, atol=1e-5)

    # A problem comes back typed too: an unknown input is a 422 Problem model.
    endpoint = importlib.import_module(f"{PACKAGE}.api.derivatives.jacobian")
    bad = models.JacobianRequest.from_dict({"inputs": {"nope": x}})
    response = endpoint.sync_detailed(name=models.JacobianName("softmax"), client=client, body=bad)
    assert response.status_code == 422
    assert isinstance(response.parsed, models.Problem) and response.parsed.code.value == "invalid_input"
