"""The small JSON Jacobian's front-end path, cut (bench.fe_callgrind --format json).

``wire._flat_floats`` looks for a 0 or 1 (a boolean read as a number) in the values'
bytes, not by four numpy ufunc calls; the route takes the body's counts of "," and "["
from ``read_body``, which counted them to charge the parse, not counting them again.
Each must read, refuse, offload and answer exactly as before.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from jacobian_client import wire
from jacobian_service import routes
from jacobian_service.examples import mlp

F32, F64 = np.dtype(np.float32), np.dtype(np.float64)
JSON = {"content-type": "application/json", "accept": "application/json"}
PATH = "/v1/functions/mlp/jacobian"


def _outcome(data, dtype, fast: bool):
    saved = wire._flat_floats
    if not fast:
        wire._flat_floats = lambda *a: None  # the general path alone
    try:
        arr = wire._from_numbers(list(data), dtype, wire.Limits())
    except wire.WireError as exc:
        return ("refused", str(exc), exc.code)
    finally:
        wire._flat_floats = saved
    return ("read", arr.dtype.str, arr.shape, arr.tobytes())


_SPECIAL = [
    0.0,
    -0.0,
    1.0,
    True,
    False,
    0,
    1,
    1e-40,
    -1e-44,
    7e-46,
    1e-50,
    1 + 2.0**-25,
    1 - 2.0**-26,
    2.0**-149,
    5e-324,
    1e300,
    -3.5e38,
    3.4028235e38,
    0.5,
    2.0,
    65536.0,
    2.0**-126,
]


@pytest.mark.parametrize("dtype", [F32, F64])
def test_zero_one_search_in_bytes_reads_as_the_general_path(dtype):
    """Values that are, or round to, 0 / -0 / 1 in float32 or float64, subnormals (a zero
    top byte: a match across two items' bytes), booleans beside them: the fast path's
    outcome is the general path's, bit for bit, refusals included."""
    rng = np.random.default_rng(47)
    rows = [[0.5, v] for v in _SPECIAL] + [
        [0.5, v, w] for v in _SPECIAL[7:] for w in _SPECIAL[7:]
    ]
    for _ in range(300):
        n = int(rng.integers(1, 12))
        row = [0.25] + [_SPECIAL[i] for i in rng.integers(0, len(_SPECIAL), n)]
        rows.append(row)
    for row in rows:
        assert _outcome(row, dtype, True) == _outcome(row, dtype, False), row


def test_the_fast_path_still_takes_a_row_with_no_zero_or_one():
    """The common row (random float32 values) is read by the fast path; a 0 or 1 among
    them (a Jacobian's zeros are common) has the row's types looked at, a boolean sending
    it to the general path (which refuses it) only."""
    x = np.random.default_rng(1).standard_normal(128).astype(np.float32)
    assert wire._flat_floats(x.tolist(), F32, wire.Limits()).tobytes() == x.tobytes()
    assert wire._flat_floats([0.5, True], F32, wire.Limits()) is None
    assert wire._flat_floats([0.5, 0.0], F32, wire.Limits()).tolist() == [0.5, 0.0]
    assert wire._flat_floats([0.5, 1e-50], F64, wire.Limits()).tolist() == [0.5, 1e-50]
    assert wire._flat_floats([0.5, 1e-50], F32, wire.Limits()).tobytes() == np.float32([0.5, 0.0]).tobytes()


@pytest.fixture
def offloads(monkeypatch):
    """The (size, containers) each parse of a JSON body was run with."""
    seen: list[tuple[int, object]] = []
    real = routes._offload

    async def watched(size, fn, *args):
        if fn is routes.parse_call:
            seen.append((size, args[-1]))
        return await real(size, fn, *args)

    monkeypatch.setattr(routes, "_offload", watched)
    return seen


def test_a_small_body_is_parsed_inline_with_its_containers_counted(client, offloads):
    x = np.random.default_rng(2).standard_normal(128).astype(np.float32)
    body = wire.dumps({"inputs": [wire.encode_tree(x)]})
    offloads.clear()
    r = client.post(PATH, content=body, headers=JSON)
    assert r.status_code == 200, r.text
    assert offloads == [(len(body), body.count(b"[") + body.count(b"{"))]
    got = np.asarray(r.json()["jacobian"]["data"], np.float32)
    want = torch.func.jacrev(mlp)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_a_small_body_of_many_numbers_is_still_offloaded(client, offloads):
    """Over 4,096 commas in under 256 KiB: parsed on a worker thread, its containers not
    counted (the route's decision, now from read_body's counts)."""
    body = wire.dumps({"inputs": [[0.5] * 5000]})
    assert len(body) < routes._OFFLOAD_BYTES
    offloads.clear()
    r = client.post(PATH, content=body, headers=JSON)
    assert r.status_code == 422, r.text  # (5000 numbers for a 128-input function)
    assert offloads == [(routes._OFFLOAD_BYTES + 1, None)]


def test_a_small_body_of_many_lists_is_still_offloaded(client, offloads):
    body = wire.dumps({"inputs": [[[0.5]] * 300]})
    offloads.clear()
    client.post(PATH, content=body, headers=JSON)
    assert offloads == [
        (routes._OFFLOAD_BYTES + 1, body.count(b"[") + body.count(b"{"))
    ]


def test_a_json_answer_is_todays_encoding_bytes_for_bytes():
    """The answer's text is orjson's of the float32 array (each value's shortest float32
    digits), non-finite values spelled: every float32 value round-trips."""
    rng = np.random.default_rng(3)
    specials = np.array(
        [
            np.nan,
            np.inf,
            -np.inf,
            -0.0,
            0.0,
            3.4028235e38,
            -3.4028235e38,
            1e-45,
            1.17549435e-38,
            1e-7,
            123456789.0,
            0.1,
        ],
        np.float32,
    )
    for finite in (True, False):
        jac = (
            rng.standard_normal((64, 128)) * 10.0 ** rng.integers(-40, 38, (64, 128))
        ).astype(np.float32)
        if not finite:
            jac.flat[rng.integers(0, jac.size, len(specials))] = specials
        text = wire.dumps(wire.encode_tree({"jacobian": jac}))
        back = wire.decode_tree(wire.loads(text)["jacobian"])
        assert (
            back.dtype == F32
            and back.tobytes() == jac.tobytes()
            or (
                not finite
                and np.array_equal(back, jac, equal_nan=True)
                and np.array_equal(np.signbit(back), np.signbit(jac))
            )
        )
        if finite:
            assert (
                text
                == b'{"jacobian":{"dtype":"float32","shape":[64,128],"data":'
                + wire.dumps(jac)
                + b"}}"
            )
