"""Red team, round twelve: hostile clients and every limit (one limit, one status on
every endpoint and method; what the HTTP parser refuses, said; paths read as sent).

The API cases run on the session's in-process app (``client``); the cases of the HTTP
connection itself on one real server for the module (a start costs ~3 s). Each names
what a user saw before.
"""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest
from numpy.lib import format as npy_format

from jacobian_client import wire

from .conftest import assert_problem

JSON = {"content-type": wire.JSON}


# ------------------------------------------------------------ one limit, one status


# violation -> (the shape, status, code, what the detail says), at the default limits
# (2^28 elements, rank 16): each body is its header alone, refused before data is read.
_SHAPES = {
    "elements": ((2**28 + 1,), 413, "payload_too_large", "over the limit of 268435456 elements"),
    "elements, several dims": ((2**14, 2**14 + 1), 413, "payload_too_large", "over the limit of 268435456 elements"),
    "rank": ((1,) * 17, 422, "invalid_input", "rank 17 is over the limit of 16"),
    "sizes around a zero": ((0, 2**28 + 1), 422, "invalid_input", "holds no elements"),
}
_VECTOR = {"vjp": "cotangents", "jvp": "tangents", "hvp": "tangents"}
_POSTS = [("jacobian", "reaction_diffusion", ""), ("hessian", "reaction_diffusion", ""),
          ("evaluate", "reaction_diffusion", ""), ("vjp", "reaction_diffusion", ""),
          ("jvp", "reaction_diffusion", ""), ("jacobian", "reaction_diffusion", "?sparsity=auto")]


def _npy_head(shape: tuple[int, ...]) -> bytes:
    """An .npy body's header alone: what the limits are checked from."""
    buf = io.BytesIO()
    npy_format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": shape})
    return buf.getvalue()


def _npz(**members: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in members.items():
            z.writestr(f"{name}.npy", data)
    return buf.getvalue()


def _bodies(kind: str, shape: tuple[int, ...]) -> list[tuple[str, bytes]]:
    """The same array in every format a ``kind`` takes (its vector as it too)."""
    vector = _VECTOR.get(kind)
    array = {"dtype": "float32", "shape": list(shape), "data": []}
    doc = {"inputs": [array], **({vector: array} if vector else {})}
    bodies = [(wire.JSON, wire.dumps(doc)), (wire.NPZ, _npz(u=_npy_head(shape), **({vector: _npy_head(shape)} if vector else {})))]
    if not vector:
        bodies.append((wire.NPY, _npy_head(shape)))
    return bodies


@pytest.mark.parametrize("violation", list(_SHAPES))
def test_a_shape_over_a_limit_gets_one_status_on_every_endpoint_and_method(client, violation: str) -> None:
    """``GET .../sparsity?shapes=1001`` was a 422 "over the array limits" where the same
    shape posted to any endpoint, in any format, is a 413 ``payload_too_large``: a client
    that branches on the status (the SDK raises ``PayloadTooLarge`` for a 413) took one
    limit for two faults. Now the query's shapes are checked by the rule a body's are
    (``wire.check_shape``): the same status, code and words everywhere."""
    shape, status, code, says = _SHAPES[violation]
    seen = 0
    for kind, name, query in _POSTS:
        for media, body in _bodies(kind, shape):
            r = client.post(f"/v1/functions/{name}/{kind}{query}", content=body, headers={"content-type": media})
            assert says in assert_problem(r, status, code)["detail"], (kind, media, r.text)
            seen += 1
    for kind in ("jacobian", "hessian"):
        r = client.get(f"/v1/functions/reaction_diffusion/sparsity?kind={kind}&shapes={','.join(map(str, shape))}")
        detail = assert_problem(r, status, code)["detail"]
        assert says in detail and "input 'u'" in detail, detail
        seen += 1
    assert seen == 18
    # within the limits, both are answered
    assert client.get("/v1/functions/reaction_diffusion/sparsity?shapes=4,4").json()["pattern"]["shape"] == [16, 16]


# ------------------------------------------------------------ integers below int64, for a float input


@pytest.mark.parametrize("literal", ["-9223372036854775809", "-9223372036854776000", "-9223372036854776832"])
def test_an_explicit_int64_below_its_range_is_refused_for_a_float_input_too(client, literal: str) -> None:
    """Round ten read integer literals exactly for functions that take integers; for a
    float function the body was read as orjson reads it, which rounds every integer
    literal within 1024 below -2**63 to the float -2**63, and that fits int64: ``sin``'s
    evaluate of ``{"dtype": "int64", "data": [-2**63 - 1]}`` (or int64 cotangents of a
    vjp) answered 200, computed with -2**63, while one past the top, 2**63, is a 422.
    Now an array that names an integer dtype is read exactly whatever the function: 422."""
    def post(endpoint: str, doc: str):
        return client.post(f"/v1/functions/sin/{endpoint}", content=doc, headers=JSON)

    for endpoint, doc in (
        ("evaluate", f'{{"inputs": [{{"dtype": "int64", "shape": [2], "data": [1, {literal}]}}]}}'),
        ("evaluate", f'{{"inputs": {{"x": {{"dtype": "int64", "data": [{literal}]}}}}}}'),  # no shape: still an array
        ("vjp", f'{{"inputs": [[0.5]], "cotangents": {{"dtype": "int64", "shape": [1], "data": [{literal}]}}}}'),
    ):
        problem = assert_problem(post(endpoint, doc), 422, "invalid_input")
        assert problem["detail"].endswith("array data does not fit int64"), problem
    # int64's lowest itself is read exactly and served, as is the literal in plain numbers
    # or a float array, which carry no integer dtype (a float, as any JSON reader makes it)
    r = post("evaluate", '{"inputs": [{"dtype": "int64", "shape": [1], "data": [-9223372036854775808]}]}')
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(wire.decode_tree(r.json()["output"]), np.sin(np.float32([-2.0**63])), rtol=1e-6)
    for cotangents in (f"[{literal}]", f'{{"dtype": "float64", "shape": [1], "data": [{literal}]}}'):
        r = post("vjp", f'{{"inputs": [[0.5]], "cotangents": {cotangents}}}')
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(wire.decode_tree(r.json()["vjp"]), [np.cos(np.float32(0.5)) * float(literal)], rtol=1e-6)
