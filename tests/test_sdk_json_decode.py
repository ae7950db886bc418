"""JSON array data read by struct, not numpy's inference (the SDK's ``transport="json"``).

``wire._flat_floats`` now reads regular nested lists (an answer's rows) as well as flat
ones, packing the numbers with struct: reading a 64x128 float32 Jacobian answer cost the
SDK 5.8M instructions, 2.9M of them numpy's ``asarray`` of the rows and the cast. Every
array must read (or be refused) exactly as by the general path it skips: dtype, shape,
bytes, and the words of a refusal.
"""

from __future__ import annotations

import asyncio
import math

import httpx
import numpy as np
import pytest
import torch
from jacobian_client import AsyncClient, wire
from jacobian_service.examples import mlp

from tests.conftest import ready_app, sdk_over

F32, F64 = np.dtype(np.float32), np.dtype(np.float64)
LIMITS = wire.Limits()


def _outcome(data, dtype, fast: bool, limits=LIMITS):
    saved = wire._flat_floats
    if not fast:
        wire._flat_floats = lambda *a: None
    try:
        arr = wire._from_numbers(data, dtype, limits)
    except wire.WireError as exc:
        return ("refused", str(exc), exc.code)
    finally:
        wire._flat_floats = saved
    return ("read", arr.dtype.str, arr.shape, arr.tobytes(), arr.flags.writeable)


def _same(data, dtype, limits=LIMITS):
    fast, general = _outcome(data, dtype, True, limits), _outcome(data, dtype, False, limits)
    assert fast == general, (data if len(str(data)) < 300 else str(data)[:300], dtype)
    return fast


def _taken(data, dtype) -> bool:
    """Whether the fast path read ``data`` itself (not None: handed to the general path)."""
    return wire._flat_floats(data, dtype, LIMITS) is not None


def _nest(values: list, shape: tuple[int, ...]) -> list:
    return np.array(values, dtype=object).reshape(shape).tolist()


SHAPES = [(7,), (5000,), (9000,), (3, 4), (64, 128), (2, 3, 2), (300, 2), (4, 5000), (2, 1, 3, 1), (1, 1)]


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("shape", SHAPES)
def test_random_arrays_read_as_the_general_path_bit_for_bit(dtype, shape):
    rng = np.random.default_rng(hash(shape) % 2**32)
    low, high = (-42, 35) if dtype == F32 else (-300, 300)  # subnormals to near the largest
    values = (rng.standard_normal(math.prod(shape)) * 10.0 ** rng.integers(low, high, math.prod(shape))).astype(dtype)
    data = _nest([float(v) for v in values], shape)  # the floats orjson gives for the numbers
    out = _same(data, dtype)
    assert out[0] == "read" and _taken(data, dtype)
    assert out[2] == shape and out[3] == values.astype(dtype).tobytes()
    # as written on the wire (float32's shortest digits) and read back by orjson
    doc = wire.loads(wire.dumps(wire.encode_tree(values.reshape(shape))))
    arr, _ = wire.decode_json_array(doc)
    assert arr.dtype == dtype and arr.shape == shape and arr.tobytes() == values.tobytes() and arr.flags.writeable


EDGES = [0.0, -0.0, 1.0, -1.0, 1e-40, -1e-44, 7e-46, 1e-50, 2.0**-149, 5e-324, 1e300, -1e300, 3.4028235e38,
         3.4028236e38, 1 + 2.0**-25, 1 - 2.0**-26, 0.1, 2.0**63, -(2.0**63), 2.0**64, 1e19]


@pytest.mark.parametrize("dtype", [F32, F64])
def test_edge_values_in_every_position_read_as_the_general_path(dtype):
    for value in EDGES:
        for shape in ((4,), (2, 2), (2, 1, 2)):
            for at in range(4):
                flat = [0.5, 0.25, 0.75, 0.125]
                flat[at] = value
                assert _same(_nest(flat, shape), dtype)[0] == "read"
    # an all-edges array, and zeros, -0.0 and ones among many (the byte search and the ufuncs)
    for count in (len(EDGES), 2000):
        flat = [EDGES[i % len(EDGES)] for i in range(count)]
        if count > 100:
            flat[0] = 0.5
        assert _same(_nest(flat, (count,)), dtype)[0] == "read"
        assert _same(_nest(flat[:count // 2 * 2], (count // 2, 2)), dtype)[0] == "read"
        assert _taken(_nest(flat[:count // 2 * 2], (count // 2, 2)), dtype)


INTS = [0, 1, -1, 2, 3, 2**24 + 1, 2**53 + 1, -(2**53) - 1, 2**60 + 2**36 + 1, 2**63 - 1, -(2**63), 2**63 + 1,
        2**64 - 1, 2**64 + 1, -(2**63) - 1, 2**70 + 1, 2**1023, 2**1030, -(2**1100)]


@pytest.mark.parametrize("dtype", [F32, F64])
def test_ints_beside_floats_read_as_the_general_path(dtype):
    """numpy reads an int among floats as a float64 (up to 2^64), else as an object: the
    cast of such ints differs (double rounding), so those go the general path."""
    for value in INTS:
        for shape in ((3,), (3, 1), (1, 3)):
            data = _nest([0.5, value, 0.25], shape)
            assert _same(data, dtype)[0] in ("read", "refused")
    assert _taken([[0.5, 2**53 + 1], [3, 4]], dtype)
    assert not _taken([[0.5, 2**64 + 1]], dtype) and not _taken([0.5, 2**1030], dtype)
    assert not _taken([[1, 0.5]], dtype)  # led by an int: numpy infers int64 for all-int data


BAD = [
    [[0.5, True], [1.0, 2.0]],  # booleans, as 1.0: refused
    [[0.5, False]],
    [0.5, True],
    [[0.5, 1.0], [False, 2.5]],
    [[0.5, "NaN"], ["Infinity", "-Infinity"]],  # spelled non-finite numbers: read
    [[0.5, "x"]],
    [[0.5, None]],
    [[0.5, [1.0]], [1.0, 2.0]],
    [[0.5, {"a": 1}]],
    [[0.5, 1.5], [1.0]],  # ragged
    [[0.5, 1.5], 1.0],
    [[0.5, 1.5], "ab"],
    [[[0.5], [1.5]], [[1.0], 2.0]],
    [[0.5], []],
    [[], []],
    [[[]]],
    [0.5, [1.0, 2.0]],
    [[0.5, 1.5], {"0": 1.0, "1": 2.0}],
    [{"0": 1.0}],
    [[0.5] * 3] * 2 + [[0.5, 0.5, {"0": 1.0}]],
]


@pytest.mark.parametrize("dtype", [F32, F64])
def test_refused_or_odd_data_is_answered_as_the_general_path(dtype):
    for data in BAD:
        _same(data, dtype)
    # a bad value deep in a long row, and in a joined piece of short rows
    long = [[0.5] * 6000 for _ in range(2)]
    long[1][5999] = "x"
    assert _same(long, dtype)[0] == "refused"
    short = [[0.5, 0.5] for _ in range(3000)]
    short[2999][1] = True
    assert _same(short, dtype)[0] == "refused"


def test_max_elements_and_rank_limits_hold():
    limits = wire.Limits(max_elements=100)
    assert _same([[0.5] * 10] * 11, F32, limits)[0] == "refused"
    assert _same([[0.5] * 10] * 10, F32, limits)[0] == "read"
    deep = 0.5
    for _ in range(40):
        deep = [deep]
    assert _same(deep, F32)[0] == "refused"


def test_complex_pairs_and_other_dtypes_decode_as_before():
    rng = np.random.default_rng(1)
    c = (rng.standard_normal((3, 4)) + 1j * rng.standard_normal((3, 4))).astype(np.complex64)
    c[0, 0] = complex(math.nan, -0.0)
    c[1, 1] = complex(math.inf, 1.0)
    tree = {"c": c, "c128": c.astype(np.complex128), "i": np.array([[2**62 + 1, -3]], np.int64),
            "f16": np.array([[0.5, 1.0]], np.float16), "b": np.array([[True, False]]),
            "nan": np.array([[math.nan, -math.inf], [-0.0, 1.0]], np.float32), "l": [np.zeros((2, 0), np.float32)]}
    doc = wire.loads(wire.dumps(wire.encode_tree(tree)))
    answers = wire.Limits(complex=True)  # as the SDK reads answers
    got = wire.decode_tree(doc, tuple, answers)
    saved = wire._flat_floats
    wire._flat_floats = lambda *a: None
    try:
        old = wire.decode_tree(wire.loads(wire.dumps(wire.encode_tree(tree))), tuple, answers)
    finally:
        wire._flat_floats = saved
    for key in tree:
        a, b = (got[key], old[key]) if key != "l" else (got[key][0], old[key][0])
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), key
    assert got["c"].tobytes() == c.tobytes() and got["i"][0, 0] == 2**62 + 1
    # base64 data and bfloat16 numbers are untouched by the fast path
    b64 = {"dtype": "bfloat16", "shape": [2], "base64": "gD8AQA=="}
    assert wire.decode_json_array(b64)[0].tolist() == [1.0, 2.0]
    assert wire.decode_json_array({"dtype": "bfloat16", "shape": [1, 2], "data": [[0.5, 1.5]]})[1] == "bfloat16"


def test_a_large_answer_is_not_held_as_float64_nor_twice():
    """The old path made a float64 array (8 bytes a number) then its float32 cast; now
    the float32 bytes are packed once, a piece at a time."""
    import tracemalloc

    rows = np.random.default_rng(2).standard_normal((500, 2000)).astype(np.float32)
    doc = wire.loads(wire.dumps(wire.encode_tree(rows)))
    tracemalloc.start()
    try:
        arr, _ = wire.decode_json_array(doc)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert arr.tobytes() == rows.tobytes()
    assert peak < 1.5 * rows.nbytes, peak  # the old path: 3x (float64 + float32)


@pytest.fixture(scope="module")
def app():
    with ready_app("jacobian_service.examples") as c:
        yield c


def test_sdk_json_jacobian_sync_and_async_match_jacrev_bit_for_bit(app):
    x = np.random.default_rng(0).standard_normal(128).astype(np.float32)
    want = torch.func.jacrev(mlp)(torch.from_numpy(x)).numpy()
    with sdk_over(app) as client:
        J = client.jacobian("mlp", x, transport="json")
    assert J.dtype == np.float32 and J.shape == (64, 128) and J.flags.writeable
    np.testing.assert_array_equal(J, want)

    def forward(request: httpx.Request) -> httpx.Response:
        r = app.request(request.method, str(request.url.copy_with(scheme="http", host="testserver", port=None)),
                        content=request.content, headers=dict(request.headers))
        return httpx.Response(r.status_code, headers={k: v for k, v in r.headers.items()
                                                     if k.lower() not in ("content-encoding", "transfer-encoding")},
                              content=r.content)

    async def main():
        async with AsyncClient("http://sdk.test", http_transport=httpx.MockTransport(forward), max_retries=0,
                               transport="json") as aclient:
            return await aclient.jacobian("mlp", x)

    J2 = asyncio.run(main())
    assert J2.dtype == np.float32 and J2.tobytes() == J.tobytes()
