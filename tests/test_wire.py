"""The wire codecs: round trips (Hypothesis) and hostile headers."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from jacobian_client import wire

DTYPES = ["bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float16", "float32", "float64"]

arrays = st.sampled_from(DTYPES).flatmap(
    lambda d: hnp.arrays(np.dtype(d), hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5), elements=None if d != "float16" else st.floats(-100, 100, width=16))
)


def npy(pieces) -> bytes:
    return b"".join(bytes(p) for p in pieces)


@settings(max_examples=150, deadline=None)
@given(arrays)
def test_npy_round_trip(arr):
    back = wire.read_npy(npy(wire.write_npy(arr)))
    assert back.dtype == arr.dtype and back.shape == arr.shape
    np.testing.assert_array_equal(back, arr)
    # the same bytes numpy itself writes and reads
    buf = io.BytesIO()
    np.save(buf, arr)
    np.testing.assert_array_equal(wire.read_npy(buf.getvalue()), arr)
    np.testing.assert_array_equal(np.load(io.BytesIO(npy(wire.write_npy(arr)))), arr)


@settings(max_examples=150, deadline=None)
@given(arrays)
def test_json_round_trip(arr):
    if arr.dtype.kind == "f":
        arr = np.where(np.isfinite(arr), arr, 0).astype(arr.dtype)  # JSON has no NaN/Inf
    doc = wire.loads(wire.dumps(wire.encode_tree({"a": (arr, [arr])})))
    back = wire.decode_tree(doc)
    for got in (back["a"][0], back["a"][1][0]):
        assert got.dtype == arr.dtype and got.shape == arr.shape
        np.testing.assert_array_equal(got, arr)


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.text("abcxyz", min_size=1, max_size=4), arrays, min_size=1, max_size=4))
def test_npz_round_trip(members):
    trees = {"jacobian": tuple(members.values()), "aux": {"k": list(members.values())[0], "label": "é", "n": 3}}
    got, meta = wire.read_result_npz(wire.write_npz(trees, {"device": "cpu"}))
    assert meta == {"device": "cpu"}
    assert got["aux"]["label"] == "é" and got["aux"]["n"] == 3
    for g, w in zip(got["jacobian"], members.values()):
        np.testing.assert_array_equal(g, w)
    buf = io.BytesIO()
    np.savez(buf, **members)
    for name, arr in wire.read_npz(buf.getvalue()).items():
        np.testing.assert_array_equal(arr, members[name])


def test_npz_results_whose_keys_hold_a_slash_keep_every_array():
    """A function returning ``{"a/b": x, "a": {"b": y}}`` (jacrev takes any string keys)
    got an .npz with two members named ``jacobian/a/b.npy``: numpy read y for both, the
    SDK refused the answer. Each array has its own member now, the skeleton says which."""
    x, y, z = np.arange(3.0), np.arange(3.0) + 10, np.arange(3.0) + 20
    trees = {"jacobian": {"a/b": x, "a": {"b": y}, "a/b~1": z}, "aux": {"k/0": x, "k": [y]}}
    body = wire.write_npz(trees, {})
    names = zipfile.ZipFile(io.BytesIO(body)).namelist()
    assert len(names) == len(set(names)) == 6, names
    got, _ = wire.read_result_npz(body)
    np.testing.assert_array_equal(got["jacobian"]["a/b"], x)
    np.testing.assert_array_equal(got["jacobian"]["a"]["b"], y)
    np.testing.assert_array_equal(got["jacobian"]["a/b~1"], z)
    np.testing.assert_array_equal(got["aux"]["k/0"], x)
    np.testing.assert_array_equal(got["aux"]["k"][0], y)
    sparse = wire.write_sparse_npz(wire.SparseCOO(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0), (2, 3)),
                                   {}, {"aux": trees["aux"]})
    names = zipfile.ZipFile(io.BytesIO(sparse)).namelist()
    assert len(names) == len(set(names)), names


def test_big_headers_use_version_2():
    shape = (1,) * 15
    header = wire.npy_header(shape, "float32")
    assert header[:8] == b"\x93NUMPY\x01\x00"
    assert wire.npy_nbytes((3, 4), "float64") == len(wire.npy_header((3, 4), "float64")) + 96


def test_bfloat16_base64():
    import base64

    values = np.array([1.0, -2.5, 0.15625], np.float32)
    raw = (values.view(np.uint32) >> 16).astype("<u2").tobytes()
    arr, name = wire.decode_json_array({"dtype": "bfloat16", "shape": [3], "base64": base64.b64encode(raw).decode()})
    assert name == "bfloat16" and arr.dtype == np.float32
    np.testing.assert_array_equal(arr, values)


def raw_npy(header: str, data: bytes = b"") -> bytes:
    """A version 1.0 .npy with any header text, padded the way numpy pads it."""
    text = header.encode("latin1")
    text += b" " * (-(10 + len(text) + 1) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text + data


@pytest.mark.parametrize(
    "body, code",
    [
        (b"", "malformed_body"),
        (b"\x93NUMPY\x09\x00", "malformed_body"),
        (raw_npy("{'descr': '<f8', 'fortran_order': False, 'shape': (-2,), }"), "malformed_body"),
        (raw_npy("__import__('os').system('true')"), "malformed_body"),
        (raw_npy("{'descr': '|O', 'fortran_order': False, 'shape': (1,), }"), "malformed_body"),
        (raw_npy("{'descr': '<f8', 'fortran_order': False, 'shape': (99999999999999,), }"), "payload_too_large"),
        (raw_npy("{'descr': '<f8', 'fortran_order': False, 'shape': (2**62, 2**62), }"), "malformed_body"),
        (raw_npy("{'descr': [('a', '<f8')], 'fortran_order': False, 'shape': (1,), }", b"\0" * 8), "invalid_input"),
        (raw_npy("{'descr': '<f8', 'fortran_order': False, 'shape': (2,), }", b"\0" * 8), "malformed_body"),
    ],
)
def test_hostile_npy_headers(body, code):
    with pytest.raises(wire.WireError) as info:
        wire.read_npy(body)
    assert info.value.code == code


def test_zip_bomb_refused_from_declared_sizes():
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("x.npy", b"\0" * (50 << 20))
    assert len(buf.getvalue()) < 100_000
    with pytest.raises(wire.WireError) as info:
        wire.read_npz(buf.getvalue(), wire.Limits(max_bytes=1 << 20))
    assert info.value.code == "payload_too_large"


def test_json_limits():
    limits = wire.Limits(max_elements=10, max_rank=3)
    with pytest.raises(wire.WireError, match="elements"):
        wire.decode_json_array(list(range(11)), "float32", limits)
    with pytest.raises(wire.WireError, match="deeper"):
        wire.decode_json_array([[[[1.0]]]], "float32", limits)
    with pytest.raises(wire.WireError, match="elements"):
        wire.decode_json_array({"dtype": "float32", "shape": [2**40, 2**40], "base64": ""}, None, limits)
    with pytest.raises(wire.WireError):
        wire.loads(b"[" * 5000 + b"]" * 5000)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_json_writes_each_value_in_its_own_precision_beside_non_finite_ones(dtype):
    """orjson writes a float32 array's 0.1 as 0.1; one NaN in the array, or a 0-d array,
    or a float32 scalar (an aux), went through Python floats and came out with float64's
    digits (0.10000000149011612): a JSON reader (a browser) saw other numbers than the
    same array without the NaN."""
    shortest = wire.dumps(np.array([0.1], dtype))[1:-1].decode()  # orjson's own text for 0.1 in this dtype
    tree = {"a": np.array([0.1, np.nan, np.inf, -np.inf], dtype), "b": np.array(0.1, dtype),
            "c": np.array(np.nan, dtype), "d": dtype(0.1)}
    text = wire.dumps(wire.encode_tree(tree)).decode()
    assert text == (f'{{"a":{{"dtype":"{np.dtype(dtype).name}","shape":[4],"data":[{shortest},"NaN","Infinity","-Infinity"]}},'
                    f'"b":{{"dtype":"{np.dtype(dtype).name}","shape":[],"data":{shortest}}},'
                    f'"c":{{"dtype":"{np.dtype(dtype).name}","shape":[],"data":"NaN"}},"d":{shortest}}}'), text
    back = wire.decode_tree(wire.loads(text))
    np.testing.assert_array_equal(back["a"], tree["a"])
    assert back["a"].dtype == dtype and back["b"] == tree["b"] and np.isnan(back["c"])


def test_a_json_answers_walk_asks_no_plain_node_whether_it_is_sparse(monkeypatch):
    """encode_tree asked every node of an answer (the document, its meta's numbers and
    strings, the array) whether it was a sparse matrix first: a ``format`` attribute
    looked up on each and missing (an AttributeError made and dropped), 2/3 of a small
    JSON answer's walk. The plain nodes are taken first; what they encode to is as
    before, and so is every other node's."""
    import collections
    import enum
    import math

    import scipy.sparse

    asked = []
    real = wire.is_sparse
    monkeypatch.setattr(wire, "is_sparse", lambda obj: asked.append(type(obj)) or real(obj))
    jac = np.arange(6, dtype=np.float32).reshape(2, 3)
    meta = {"device": "cpu", "chunk_size": 2, "batch_size": 1, "mode": "rev", "queue_ms": 0.1, "compute_ms": 0.5,
            "sparse": None, "exact": True}
    doc = wire.encode_tree({"function": "mlp", "jacobian": jac, "meta": meta})
    assert asked == []
    assert doc["meta"] == meta and doc["function"] == "mlp"
    assert doc["jacobian"]["dtype"] == "float32" and doc["jacobian"]["shape"] == [2, 3]
    assert wire.dumps(doc) == wire.dumps({"function": "mlp", "jacobian": {"dtype": "float32", "shape": [2, 3], "data": jac},
                                          "meta": meta})

    class Level(enum.IntEnum):
        ONE = 1

    Pair = collections.namedtuple("Pair", "a b")
    odd = {1: (Level.ONE, Pair(math.inf, -math.nan)), "s": [np.float32(0.1), np.int64(3), np.bool_(True), -math.inf],
           "m": scipy.sparse.csr_matrix(np.eye(2))}
    text = wire.dumps(wire.encode_tree(odd))
    assert text.startswith(b'{"1":[1,["Infinity","NaN"]],"s":[0.1,3,true,"-Infinity"],"m":{"format":"csr"'), text
