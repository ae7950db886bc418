"""Red team, round ten: hostile clients and every limit (numbers JSON readers round,
bodies in other encodings, lying headers, the same limit on every endpoint and format).

The API cases run on the session's in-process app (``client``); each names what a user
saw before.
"""

from __future__ import annotations

import numpy as np
import pytest

from jacobian_client import wire

from .conftest import assert_problem

JSON = {"content-type": wire.JSON}


# ------------------------------------------------------------ integers JSON readers round


@pytest.mark.parametrize("literal", ["-9223372036854775809", "-9223372036854776000", "-9223372036854776832"])
def test_an_integer_below_int64_is_refused_not_rounded_to_its_lowest(client, literal: str) -> None:
    """orjson reads an integer literal past int64 as a float, and those within 1024 below
    -2**63 round to the float -2**63, which fits int64: scaled_norm's int64 ``power`` of
    -2**63 - 1 (or JavaScript's JSON.stringify of int64's lowest, -9223372036854776000)
    answered 200, computed with -2**63, where 2**63 is a 422. Now a 422 too."""
    body = f'{{"inputs": {{"x": [[3.0, 4.0, 0.0]], "scale": 1.0, "power": {literal}}}}}'
    problem = assert_problem(client.post("/v1/functions/scaled_norm/evaluate", content=body, headers=JSON),
                             422, "invalid_input")
    assert problem["detail"].startswith("array data does not fit int64")
    body = f'{{"inputs": [{{"dtype": "int64", "shape": [2], "data": [1, {literal}]}}]}}'
    problem = assert_problem(client.post("/v1/functions/sin/evaluate", content=body, headers=JSON), 422, "invalid_input")
    assert problem["detail"].startswith("array data does not fit int64")
    # int64's lowest itself, an integer literal, is read exactly and served
    body = '{"inputs": [{"dtype": "int64", "shape": [1], "data": [-9223372036854775808]}]}'
    r = client.post("/v1/functions/sin/evaluate", content=body, headers=JSON)
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(wire.decode_tree(r.json()["output"]), np.sin(np.float32(-(2.0 ** 63))), rtol=1e-6)
    # for a float input (and cotangents, which have no dtype of their own) it is a float
    x = [0.5, 1.0, 2.0]
    body = f'{{"inputs": [{x}], "cotangents": [{literal}, 1, 100000000000000000000000000000]}}'
    r = client.post("/v1/functions/sin/vjp", content=body, headers=JSON)
    assert r.status_code == 200, r.text
    want = np.cos(np.float32(x)) * np.float32([float(literal), 1, 1e29])
    np.testing.assert_allclose(wire.decode_tree(r.json()["vjp"]), want, rtol=1e-6)
