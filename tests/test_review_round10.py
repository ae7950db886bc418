"""Review round 10: defects found reviewing the day's merges (ee8129d..main).

One in-process app (the built-in examples) shared by the module's tests.
"""

from __future__ import annotations

import io
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from starlette.testclient import TestClient

from jacobian_service import create_app
from jacobian_service.settings import Settings

from . import complex1_functions as F
from .conftest import assert_problem, sdk_over


@pytest.fixture(scope="module")
def c() -> Iterator[TestClient]:
    with TestClient(create_app(Settings(warmup=False)), raise_server_exceptions=False) as client:
        while client.get("/readyz").status_code != 200:
            pass
        yield client


def _npz(**members: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **members)
    return buf.getvalue()


@pytest.mark.parametrize("key", ["\u00b2", "\u0663", "\u2460", "7", "01", "9" * 5000])
def test_an_unknown_input_named_by_a_digit_that_is_no_position_is_a_422(c, key):
    """The count of inputs "given by position" (b7fdf4e) took every key str.isdigit()
    holds for as a position: "²" (superscript two) made int() raise, a 500 and a
    traceback in the log, from JSON and .npz bodies alike; "٣" was counted as position 3;
    keys "0" and "7" read as 8 inputs. Only the ASCII positions the service matches, all
    of the keys, are counted."""
    for r in (c.post("/v1/functions/sin/evaluate", json={"inputs": {"0": [1.0, 2.0], key: [1.0]}}),
              c.post("/v1/functions/sin/evaluate", content=_npz(**{"0": np.ones(2), key: np.ones(1)}),
                     headers={"content-type": "application/x-npz"})):
        body = assert_problem(r, 422, "invalid_input")
        assert body["detail"].startswith("unknown inputs ["), body
        assert "given by position" not in body["detail"], body


def test_one_input_too_many_by_position_is_counted(c):
    r = c.post("/v1/functions/sin/evaluate", json={"inputs": {"0": [1.0, 2.0], "1": [1.0], "2": [3.0]}})
    body = assert_problem(r, 422, "invalid_input")
    assert body["detail"] == "unknown inputs ['1', '2']; sin takes ['x']: 1 input, and 3 were given by position", body


@pytest.fixture(scope="module")
def cc() -> Iterator[TestClient]:
    settings = Settings(warmup=False, functions="tests.complex1_functions")
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        while client.get("/readyz").status_code != 200:
            pass
        yield client


@pytest.mark.parametrize("transport", ["binary", "json"])
def test_the_sdk_sends_python_complex_numbers_as_complex_arrays(cc, transport):
    """Python's complex numbers for an input declared complex (and a complex output's
    cotangents): a scalar was "cannot send a complex as an input; pass a numpy array,
    list or number", a list of them orjson's TypeError "Type is not JSON serializable:
    complex", numpy's and torch's complex scalars in a list likewise, where the same
    numbers as a numpy array were sent. Sent as the complex128 array they make, a real
    input refuses them as it refuses that array (the 422), never reading pairs as reals."""
    from jacobian_client import InvalidInput

    z = [1 + 2j, np.complex64(-0.5 + 0.25j), torch.tensor(0.3 - 1.5j, dtype=torch.complex128)]
    zt = torch.tensor([1 + 2j, -0.5 + 0.25j, 0.3 - 1.5j], dtype=torch.complex128)
    with sdk_over(cc) as sdk:
        np.testing.assert_allclose(sdk.evaluate("conj_abs", 1 + 1j, transport=transport), np.sqrt(2), rtol=1e-6)
        np.testing.assert_allclose(sdk.evaluate("csquare", z, transport=transport), F.csquare(zt).numpy(),
                                   rtol=1e-6)
        want = torch.func.vjp(F.csquare, zt)[1](zt.conj())[0].resolve_conj().numpy()
        np.testing.assert_allclose(sdk.vjp("csquare", zt, cotangents=[complex(v) for v in zt.conj()],
                                           transport=transport), want, rtol=1e-12)
        for bad in ([1j, 2.0, 3.0], 1j):
            with pytest.raises(InvalidInput, match="unsupported dtype complex128 here"):
                sdk.evaluate("real_sin", bad, transport=transport)


@pytest.mark.parametrize("kind, name, body", [
    ("jvp", "csquare", {"tangents": [[0.5, -1.0], [2.0, 0.5], [-1.0, 0.75]]}),
    ("hvp", "abs2", {"tangents": [[0.5, -1.0], [2.0, 0.5], [-1.0, 0.75]]}),
    ("vjp", "csquare", {"cotangents": [[0.5, -1.0], [2.0, 0.5], [-1.0, 0.75]]}),
    ("jvp", "csquare", {"tangents": [[[0.5, -1.0], [2.0, 0.5], [-1.0, 0.75]]], "batched_vectors": True}),
])
def test_complex_vectors_sent_as_plain_pairs_are_told_how_to_send_them(cc, kind, name, body):
    """A complex input's plain lists are its [real, imag] pairs; a vector's plain lists are
    real numbers (a real tangent of a complex input: its imaginary part 0). Pairs sent
    plain as tangents (or a complex output's cotangents) were "expected shape [3], got
    [3, 2]" and no more: the 422 now says where pairs go."""
    r = cc.post(f"/v1/functions/{name}/{kind}", json={"inputs": [[[1.0, 2.0], [-0.5, 0.25], [0.3, -1.5]]], **body})
    problem = assert_problem(r, 422, "invalid_input")
    key = "cotangents" if kind == "vjp" else "tangents"
    shape = [1, 3] if body.get("batched_vectors") else [3]
    assert problem["detail"].startswith(f"{key}: expected shape "), problem
    assert (f'(complex {key} as [real, imag] pairs go in an array object that names the dtype: {{"dtype": '
            f'"complex128", "shape": {shape}, "data": [[re, im], ...]}}; plain lists here are real numbers)'
            ) in problem["detail"], problem
    # a real tangent of the input's shape answers (torch.func.jvp's of imaginary part 0)
    if kind != "vjp":
        ok = cc.post(f"/v1/functions/{name}/{kind}", json={"inputs": [[[1.0, 2.0], [-0.5, 0.25], [0.3, -1.5]]],
                                                          "tangents": [0.5, 2.0, -1.0]})
        assert ok.status_code == 200, ok.text


def test_a_sparsity_cache_directory_that_cannot_be_written_costs_only_the_disk_copy(tmp_path, monkeypatch):
    """SPARSITY_CACHE_DIR that is no directory (or a disk full, a volume made read-only):
    every sparse Jacobian and sparsity query was a 500 function_error naming the server's
    path ("NotADirectoryError: [Errno 20] Not a directory: '/.../cache'"), the function
    blamed; the disk copy is a restart's shortcut, the entry in memory already."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    settings = Settings(warmup=False, sparsity_cache_dir=blocker / "cache")
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        while client.get("/readyz").status_code != 200:
            pass
        x = [1.0, 2.0, 3.0]
        r = client.post("/v1/functions/sin/jacobian", json={"inputs": [x], "sparsity": "auto", "sparse_format": "dense"},
                        headers={"accept": "application/json"})
        assert r.status_code == 200, r.text
        want = torch.func.jacrev(torch.sin)(torch.tensor(x))
        from jacobian_client import wire

        np.testing.assert_allclose(wire.decode_tree(r.json()["jacobian"]), want.numpy(), rtol=1e-6)
        r = client.get("/v1/functions/sin/sparsity?shapes=4")
        assert r.status_code == 200 and r.json()["pattern"]["nnz"] == 4, r.text

    # a disk that fills mid-write: nothing raised, no temporary file left, the entry served from memory
    from jacobian_service.sparsity import patterns

    cache = patterns.PatternCache(tmp_path / "full")

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(patterns.np, "savez", full)
    cache.put("k", {"value_dependent": True})
    assert cache.get("k") == {"value_dependent": True}
    assert list((tmp_path / "full").iterdir()) == []


def test_a_cache_file_not_as_this_version_writes_it_is_a_miss(tmp_path):
    """The directory outlives the run (and the version that wrote it): an entry whose shape
    is 0-d raised TypeError out of get(), a 500 function_error of the sparse request."""
    from jacobian_service.sparsity import patterns

    np.savez(tmp_path / "k.npz", shape=np.asarray(3), rows=np.zeros(1, np.int64), cols=np.zeros(1, np.int64),
             name=np.asarray("a"), source=np.asarray("s"), exact=np.asarray(True), notes=np.asarray([""]))
    assert patterns.PatternCache(tmp_path).get("k") is None


def test_the_openapi_document_says_what_a_release_without_a_key_gets():
    """With API keys and no operators' keys the document said "every call is a 403", and a
    call without a key is the 401 (AuthMiddleware asks for the header first)."""
    app = create_app(Settings(warmup=False), api_keys=("k",), admin_keys=())
    with TestClient(app, raise_server_exceptions=False) as client:
        while client.get("/readyz").status_code != 200:
            pass
        said = client.get("/openapi.json", headers={"authorization": "Bearer k"}).json()
        op = said["paths"]["/v1/functions/{name}/quarantine"]["delete"]
        assert_problem(client.delete("/v1/functions/sin/quarantine"), 401, "unauthorized")
        assert_problem(client.delete("/v1/functions/sin/quarantine", headers={"authorization": "Bearer k"}), 403,
                       "forbidden")
        assert "call with a key is a 403 `forbidden` (without one, the 401 `unauthorized`" in op["description"], op
