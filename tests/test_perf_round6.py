"""Round 6 of the performance work: the JSON small-request path's parse.

A 128-number JSON body (the small ``mlp`` Jacobian of ``bench``) was read by numpy's
inference, a 0/1 scan for booleans and a float64 -> float32 cast, and its data row was
scanned item by item by the depth check: now a flat row of numbers led by a float is read
by the array module in one pass (``wire._flat_floats``), and the depth check stops
looking into lists once it has met as many lists and objects as the body opens. Both must
read exactly what the general path reads and refuse exactly what it refuses.
"""

from __future__ import annotations

import io

import numpy as np
import orjson
import pytest
import torch
from jacobian_client import wire

from .conftest import live_server

F32, F64 = np.dtype(np.float32), np.dtype(np.float64)


def _general(data, dtype):
    """The general path's reading (the fast path switched off)."""
    saved = wire._flat_floats
    wire._flat_floats = lambda *a: None
    try:
        return wire._from_numbers(data, dtype, wire.Limits())
    finally:
        wire._flat_floats = saved


def _fast(data, dtype):
    return wire._from_numbers(data, dtype, wire.Limits())


def _outcome(read, data, dtype):
    try:
        arr = read(data, dtype)
    except wire.WireError as exc:
        return ("refused", str(exc), exc.code)
    return ("read", arr.dtype.str, arr.shape, arr.tobytes())


_ROWS = [
    [0.5, -1.25, 3.0e38, 3.5e38, -1e300, 1e-45, 7e-46, 1e-50, 0.1],  # overflow / underflow in float32
    [0.5, 2, -7, 2**53 + 1, 2**63, 2**64 + 3, 2**70 + 2**17 + 1, -(2**80) - 1],  # ints after a float
    [0.5, 2**1100],  # an int past float64
    [0.5, 1.0], [0.5, 0.0], [0.5, -0.0], [0.5, True], [0.5, False], [0.5, 1], [0.5, 0],  # 0/1 and booleans
    [0.5, "NaN", "-Infinity"], [0.5, "x"], [0.5, None], [0.5, [1.0]], [0.5, {"a": 1}],
    [float("nan"), 1.5], [float("inf"), 1.5],  # (not JSON, but numbers all the same)
    [1, 0.5], [True, 0.5], ["NaN", 0.5],  # not led by a float: the general path only
    [],
]


@pytest.mark.parametrize("dtype", [F32, F64, np.dtype(np.float16), np.dtype(np.int64), None])
@pytest.mark.parametrize("row", range(len(_ROWS)))
def test_a_flat_row_is_read_and_refused_as_the_general_path_reads_it(row, dtype):
    data = _ROWS[row]
    assert _outcome(_fast, list(data), dtype) == _outcome(_general, list(data), dtype)


def test_random_rows_are_read_bit_for_bit_as_the_general_path_reads_them():
    rng = np.random.default_rng(6)
    for _ in range(200):
        n = int(rng.integers(1, 40))
        scale = 10.0 ** rng.integers(-50, 50, n)
        data = (rng.standard_normal(n) * scale).tolist()
        for i in rng.integers(1, max(n, 2), int(rng.integers(0, 3))):  # ints after the lead, up to 2**73
            if i < n:
                data[i] = int(rng.integers(-(2**62), 2**62)) * int(rng.choice([1, 3, 2**11]))
        for dtype in (F32, F64):
            assert _outcome(_fast, data, dtype) == _outcome(_general, data, dtype)


def test_a_flat_float_row_skips_numpys_inference(monkeypatch):
    """The fast path is the one taken for the common body (numpy's asarray is not called)."""
    x = np.random.default_rng(0).standard_normal(128).astype(np.float32)
    data = orjson.loads(orjson.dumps(x, option=orjson.OPT_SERIALIZE_NUMPY))

    def refused(*a, **k):
        raise AssertionError("np.asarray called")

    monkeypatch.setattr(wire.np, "asarray", refused)
    got = wire._from_numbers(data, F32, wire.Limits())
    assert got.dtype == F32 and got.tobytes() == x.tobytes() and got.flags.writeable


class _Watched(list):
    """A list that counts how often it is iterated (the depth check's scan)."""

    scans = 0

    def __iter__(self):
        _Watched.scans += 1
        return super().__iter__()


def test_the_depth_check_does_not_scan_a_row_once_every_container_is_met():
    body = wire.dumps({"inputs": [{"dtype": "float32", "shape": [128], "data": [0.5] * 128}], "argnums": [0]})
    doc = wire.loads(body)
    doc["inputs"][0]["data"] = _Watched(doc["inputs"][0]["data"])
    containers = body.count(b"[") + body.count(b"{")
    _Watched.scans = 0
    assert wire.check_depth(doc, 64, containers) == 5
    assert _Watched.scans == 0
    assert wire.check_depth(doc, 64) == 5  # without the count: scanned (the watch works)
    assert _Watched.scans >= 1


@pytest.mark.parametrize("body", [
    b'{"inputs": [[0.5, [[[[1.0]]]]]]}',  # a container after the first item
    b'{"inputs": [[0.5, {"a": {"a": {"a": 1}}}]], "s": "[[[[["}',  # strings opening more
    b'{"inputs": [[0.5, [1, [2, [3, [4]]]]]]}',
])
def test_the_depth_check_still_finds_what_nests_too_deep(body):
    doc = orjson.loads(body)
    with pytest.raises(wire.WireError):
        wire.check_depth(doc, 4, body.count(b"[") + body.count(b"{"))
    with pytest.raises(wire.WireError):
        wire.check_depth(doc, 4)


def test_json_requests_on_a_real_server_are_answered_and_refused_as_before():
    """mlp's Jacobian from a flat float row equals jacrev; rows the fast path hands on
    (0/1, booleans, spelled non-finite values, ints) are read or refused as before."""
    import httpx
    from torch.func import jacrev

    from jacobian_service.examples import mlp

    x = np.random.default_rng(1).standard_normal(128).astype(np.float32)
    x[3], x[4] = 0.0, 1.0
    want = jacrev(mlp)(torch.from_numpy(x)).numpy()
    url_path = "/v1/functions/mlp/jacobian"
    # mlp only: the built-ins, one front end, no spare, no warm-ups (the defaults warmed
    # the tests' 68 functions in an engine and its spare, for a test that sends one).
    with live_server(FUNCTIONS="jacobian_service.examples", WORKERS=1, ENGINE_STANDBY="false", WARMUP="false") as (url, _):
        with httpx.Client(base_url=url, timeout=60) as c:
            for data in (x.tolist(), [float(v) for v in x], [int(v) if v in (0.0, 1.0) else float(v) for v in x]):
                r = c.post(url_path, content=orjson.dumps({"inputs": [data]}), headers={"content-type": "application/json"})
                assert r.status_code == 200, r.text
                got = np.asarray(r.json()["jacobian"]["data"], np.float32)
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
                r = c.post(url_path, content=wire.dumps({"inputs": [wire.encode_tree(x)]}),
                           headers={"content-type": "application/json", "accept": "application/x-npy"})
                assert r.status_code == 200 and np.array_equal(np.load(io.BytesIO(r.content)), got)
            bools = [0.5] * 127 + [True]
            r = c.post(url_path, content=orjson.dumps({"inputs": [bools]}), headers={"content-type": "application/json"})
            assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json"
            assert "booleans" in r.json()["detail"]
            spelled = [0.5] * 127 + ["Infinity"]
            r = c.post(url_path, content=orjson.dumps({"inputs": [spelled]}), headers={"content-type": "application/json"})
            assert r.status_code == 200, r.text
            assert r.json()["jacobian"]["shape"] == [64, 128]
