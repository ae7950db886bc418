"""Review, round three: a third pair of eyes on the session's later changes, as an outside
red team would read them. Each test names what a client saw before.

In-process (the ``client`` fixture): no server of its own.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from jacobian_client import wire

from .conftest import assert_problem

JSON_HEADERS = {"content-type": "application/json"}
BIG = "9" * 400  # an integer literal past float64's range (309 digits or more)
REFUSED = "bool arrays take true/false (or 0/1)"


@pytest.mark.parametrize("data", [BIG, f"-{BIG}", f"2, {BIG}", f"1.5, {BIG}", f"1, {BIG}", "99999999999999999999"])
def test_a_bool_array_refuses_every_number_but_0_and_1_however_it_is_read(client, data: str) -> None:
    """Since 8c03bb5 a JSON integer past float64 is read as the exact integer it is
    (Python's reader), and array data holding one takes the slow path, value by value:
    there a bool array took any number by its truth, so {"dtype": "bool", "data": [999...]}
    (400 digits) was an evaluate of sin(True), 200 [0.84147096], and 2 or 1.5 beside it
    were True too, where 2, 1.5, 10^20 and 1e400 alone are each a 422. Now every path says
    the fast path's words."""
    body = f'{{"inputs": [{{"dtype": "bool", "shape": [{data.count(",") + 1}], "data": [{data}]}}]}}'
    for endpoint in ("evaluate", "jacobian"):
        problem = assert_problem(client.post(f"/v1/functions/sin/{endpoint}", content=body, headers=JSON_HEADERS),
                                 422, "invalid_input")
        assert problem["detail"] == f"input 'x': {REFUSED}", problem  # (the words 2 alone gets, naming the input)
    # the SDK's reader of answers is the same module: it refuses them alike
    with pytest.raises(wire.WireError, match=r"bool arrays take true/false \(or 0/1\)"):
        wire.decode_json_array(wire.loads(f'{{"dtype": "bool", "shape": [{data.count(",") + 1}], "data": [{data}]}}'))


def test_a_bool_array_still_takes_true_false_0_and_1(client) -> None:
    """The other side of the refusal above: booleans, 0 and 1 are a bool array, computed
    as torch computes it."""
    r = client.post("/v1/functions/sin/evaluate", headers=JSON_HEADERS,
                    content='{"inputs": [{"dtype": "bool", "shape": [4], "data": [true, 0, 1, false]}]}')
    assert r.status_code == 200, r.text
    expected = torch.sin(torch.tensor([True, False, True, False]).to(torch.float32))
    np.testing.assert_array_equal(np.asarray(r.json()["output"]["data"], dtype=np.float32), expected.numpy())
    arr, _ = wire.decode_json_array(wire.loads('{"dtype": "bool", "shape": [3], "data": [1, 0, true]}'))
    np.testing.assert_array_equal(arr, [True, False, True])


def test_an_integer_past_float64_costs_no_second_reading_of_the_body(monkeypatch) -> None:
    """Since 8c03bb5 a body holding one integer literal past float64 (309 digits) was read
    a second time whole, by Python's json, beside orjson's tree: a 48 MB body of 2 M
    numbers and one such integer cost a front end 19 s of CPU (0.7 s without it) and 1.31
    times the memory the body budget charged for its parse (272 MB for 208 MB). Now
    orjson's one reading holds the integer as a marked string, put back as the integer:
    Python's json reads none of it, and every reader still gets the exact integer."""
    import json as json_module

    read: list[int] = []
    real = json_module.loads
    monkeypatch.setattr(wire.json, "loads", lambda s, *a, **k: read.append(len(s)) or real(s, *a, **k))
    numbers = ",".join(["0.5"] * 1000)
    body = (f'{{"inputs": [[{numbers}, {BIG}, -{BIG}, 1e400]], "x": {{"deep": [[{BIG}]], "s": "\\u0000{BIG}"}},'
            f' "argnums": {BIG}, "top": -{BIG}}}')
    doc = wire.loads(body.encode(), max_depth=64)
    assert read == []
    big = int(BIG)
    assert doc["inputs"][0][-3:] == [big, -big, "Infinity"] and doc["inputs"][0][:1000] == [0.5] * 1000
    assert doc["x"] == {"deep": [[big]], "s": "\x00" + BIG}  # (a client's own string stays a string)
    assert doc["argnums"] == big and doc["top"] == -big
    assert wire.loads(f"[{BIG}]".encode()) == [big]
    # exact integers asked for too (a body that may hold an integer orjson rounds)
    assert wire.loads(f'[-9223372036854775809, {BIG}]'.encode(), exact_integers=True) == [-2**63 - 1, big]
