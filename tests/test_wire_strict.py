"""Issue 10, wire and parsing items: strict input (argnums, numbers, .npz member names),
nested cotangents, hostile shapes and archives, and Python's own JSON."""

from __future__ import annotations

import io
import json
import time
import zipfile
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
import torch
from torch.utils import _pytree as pytree

from jacobian_client import wire

from .conftest import assert_problem, decode, npy_bytes, npz_bytes
from .user_functions import nested_dict_out, nested_out

SIN = "/v1/functions/sin/jacobian"
X = np.array([0.3, -1.2, 2.0], dtype=np.float32)


def _npy_with_shape(shape: str) -> bytes:
    text = f"{{'descr': '<f8', 'fortran_order': False, 'shape': {shape}, }}"
    text += " " * (-(10 + len(text) + 1) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text.encode()


def _arr(a: np.ndarray) -> dict[str, Any]:
    a = np.asarray(a)
    return {"dtype": a.dtype.name, "shape": list(a.shape), "data": a.tolist()}


# ----------------------------------------------------------------- item 2: argnums


@pytest.mark.parametrize("argnums", [0.0, 1.0, [1, 0.0], True, False, [True], ["x", 1.0]])
def test_argnums_must_be_integers_or_names(client, argnums):
    body = {"inputs": [[1.0], [2.0]], "argnums": argnums}
    detail = assert_problem(client.post("/v1/functions/add_square/jacobian", json=body), 422, "invalid_input")["detail"]
    assert "argnums" in detail


def test_integer_and_name_argnums_still_work(client):
    got, _ = decode(client.post("/v1/functions/add_square/jacobian", json={"inputs": [[1.0], [2.0]], "argnums": [1, "x"]}))
    np.testing.assert_allclose([g.item() for g in got], [4.0, 1.0])  # d/dy (x + y^2), d/dx


# ----------------------------------------------------------------- item 4: nested cotangents


def _vjp_reference(fn: Any, cotangents: Any, batched: bool = False) -> np.ndarray:
    out, pullback = torch.func.vjp(fn, torch.from_numpy(X))
    cot = pytree.tree_map(torch.from_numpy, cotangents)
    if batched:
        return torch.func.vmap(pullback)(cot)[0].numpy()
    return pullback(cot)[0].numpy()


def _cotangents(batch: int | None = None) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(4)
    shape = (3,) if batch is None else (batch, 3)
    v1, v2, v3 = (rng.standard_normal(shape).astype(np.float32) for _ in range(3))
    return v1, (v2, v3)


@pytest.mark.parametrize("form", ["nested", "flat"])
def test_nested_cotangents_json(client, form):
    v1, (v2, v3) = _cotangents()
    cot = [_arr(v1), [_arr(v2), _arr(v3)]] if form == "nested" else [_arr(v1), _arr(v2), _arr(v3)]
    got, _ = decode(client.post("/v1/functions/nested_out/vjp", json={"inputs": [X.tolist()], "cotangents": cot}), "vjp")
    np.testing.assert_allclose(got, _vjp_reference(nested_out, (v1, (v2, v3))), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("form", ["nested", "flat"])
def test_nested_cotangents_npz(client, form):
    v1, (v2, v3) = _cotangents()
    names = ["cotangents/0", "cotangents/1/0", "cotangents/1/1"] if form == "nested" else [f"cotangents/{i}" for i in range(3)]
    body = npz_bytes(x=X, **dict(zip(names, (v1, v2, v3))))
    response = client.post("/v1/functions/nested_out/vjp", content=body, headers={"content-type": wire.NPZ})
    got, _ = decode(response, "vjp")
    np.testing.assert_allclose(got, _vjp_reference(nested_out, (v1, (v2, v3))), rtol=1e-5, atol=1e-6)


def test_nested_batched_cotangents(client):
    v1, (v2, v3) = _cotangents(batch=2)
    body = {"inputs": [X.tolist()], "cotangents": [_arr(v1), [_arr(v2), _arr(v3)]], "batched_vectors": True}
    got, _ = decode(client.post("/v1/functions/nested_out/vjp", json=body), "vjp")
    np.testing.assert_allclose(got, _vjp_reference(nested_out, (v1, (v2, v3)), batched=True), rtol=1e-5, atol=1e-6)


def test_nested_cotangents_with_the_wrong_leaf_count_are_422(client):
    v1, (v2, _) = _cotangents()
    body = {"inputs": [X.tolist()], "cotangents": [_arr(v1), [_arr(v2)]]}
    assert_problem(client.post("/v1/functions/nested_out/vjp", json=body), 422, "invalid_input")


def _dict_cotangents() -> tuple[Any, Any]:
    """(tree in the output's structure, the same with dict keys in another order)."""
    rng = np.random.default_rng(5)
    v1, vb, va0 = (rng.standard_normal(3).astype(np.float32) for _ in range(3))
    va1 = np.float32(rng.standard_normal())
    va1 = np.asarray(va1)
    return (v1, {"b": vb, "a": (va0, va1)}), [v1, {"a": [va0, va1], "b": vb}]


def test_cotangents_with_dicts_inside(client):
    want_tree, sent = _dict_cotangents()
    body = {"inputs": [X.tolist()], "cotangents": [_arr(sent[0]), {"a": [_arr(sent[1]["a"][0]), _arr(sent[1]["a"][1])], "b": _arr(sent[1]["b"])}]}
    got, _ = decode(client.post("/v1/functions/nested_dict_out/vjp", json=body), "vjp")
    np.testing.assert_allclose(got, _vjp_reference(nested_dict_out, want_tree), rtol=1e-5, atol=1e-6)
    members = {"cotangents/0": sent[0], "cotangents/1/a/0": sent[1]["a"][0], "cotangents/1/a/1": sent[1]["a"][1], "cotangents/1/b": sent[1]["b"]}
    response = client.post("/v1/functions/nested_dict_out/vjp", content=npz_bytes(x=X, **members), headers={"content-type": wire.NPZ})
    got, _ = decode(response, "vjp")
    np.testing.assert_allclose(got, _vjp_reference(nested_dict_out, want_tree), rtol=1e-5, atol=1e-6)


_LIKES = [
    np.zeros(2),
    (np.zeros(1), (np.zeros(2), np.zeros(3))),
    {"b": np.zeros(1), "a": np.zeros(2)},
    (np.zeros(1), {"z": [np.zeros(2), np.zeros(3)], "a": np.zeros(4)}),
    [{"k": (np.zeros(1),)}, np.zeros(2)],
]


@pytest.mark.parametrize("like", _LIKES, ids=range(len(_LIKES)))
def test_vector_leaves_follow_pytree_order(like):
    """wire.vector_leaves (torch-free) puts a tree's leaves in torch's pytree order, by
    key for dicts whatever order they were sent in, and takes the flat list as well."""
    ref_leaves, spec = pytree.tree_flatten(like)
    numbered = pytree.tree_unflatten([np.full(r.shape, i, dtype=np.float32) for i, r in enumerate(ref_leaves)], spec)

    def reorder(node: Any) -> Any:  # as a client might send it: lists, dict keys reversed
        if isinstance(node, dict):
            return {k: reorder(node[k]) for k in reversed(list(node))}
        if isinstance(node, (list, tuple)):
            return [reorder(n) for n in node]
        return node

    for sent in (reorder(numbered), pytree.tree_leaves(numbered)):
        got = wire.vector_leaves(sent, like)
        assert [int(g.flat[0]) if g.size else None for g in got] == [i if r.size else None for i, r in enumerate(ref_leaves)]
    if len(ref_leaves) == 1:
        assert wire.vector_leaves(ref_leaves[0], like)[0] is ref_leaves[0]


@pytest.mark.parametrize(
    "sent",
    [
        [np.zeros(1), [np.zeros(2)]],  # a leaf missing
        [np.zeros(1), {"z": [np.zeros(2), np.zeros(3)], "b": np.zeros(4)}],  # wrong key
        [np.zeros(1), [np.zeros(2), np.zeros(3)]],  # a list where a dict is
        [np.zeros(1), {"z": [np.zeros(2), np.zeros(3)], "a": [np.zeros(4)]}],  # a node where a leaf is
    ],
)
def test_vector_leaves_refuse_mismatched_trees(sent):
    with pytest.raises(wire.WireError) as info:
        wire.vector_leaves(sent, _LIKES[3])
    assert info.value.code == "invalid_input"


# ----------------------------------------------------------------- item 9: compressed .npz


def _zip(members: dict[str, bytes], compression: int) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def test_expanded_size_is_read_from_the_central_directory():
    big = npy_bytes(np.zeros(1 << 18))  # 2 MiB of zeros deflates to ~2 KiB
    body = _zip({"x.npy": big, "y.npy": npy_bytes(np.arange(3.0))}, zipfile.ZIP_DEFLATED)
    assert len(body) < 10_000
    assert wire.expanded_size(body, wire.NPZ) == len(big) + len(npy_bytes(np.arange(3.0)))
    assert wire.expanded_size(b"not a zip", wire.NPZ) == len(b"not a zip")
    raw = npy_bytes(np.arange(5.0))
    assert wire.expanded_size(raw, wire.NPY) == len(raw)
    assert wire.expanded_size(b'{"inputs": [1]}', wire.JSON) == 15


@pytest.mark.parametrize("zip64", [False, True])
def test_a_central_directory_of_too_many_members_is_refused_unread(client, zip64):
    """Found by a red team: 200,000 empty members (17 MB) took zipfile 1.2 s to list on
    the event loop, before the member count was checked; its end record's entry count
    may lie, so the directory's declared size is what is bounded."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", allowZip64=True) as zf:
        for i in range(70_000 if zip64 else 20_000):  # over 65,535 entries: a ZIP64 end record
            zf.writestr(str(i), b"")
    body = buf.getvalue()
    assert (b"PK\x06\x06" in body[-200:]) == zip64
    start = time.process_time()
    assert wire.expanded_size(body, wire.NPZ) == len(body)
    with pytest.raises(wire.WireError, match="central directory"):
        wire.read_npz(body)
    assert time.process_time() - start < 0.1  # listing it takes zipfile ~0.1-0.4 s
    assert_problem(client.post(SIN, content=body, headers={"content-type": wire.NPZ}), 413, "payload_too_large")


def _lying_directory(variant: str, n: int) -> bytes:
    """n empty central-directory entries behind end records that a parser of its own
    would read otherwise than zipfile does (found by a second red team)."""
    import struct

    cd = struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, 20, *[0] * 14) * n
    def eocd(on_disk: int, entries: int, size: int, offset: int) -> bytes:
        return struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, on_disk, entries, size, offset, 0)
    def zip64(entries: int, size: int, offset: int) -> bytes:
        return struct.pack("<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, entries, entries, size, offset)
    def locator(offset: int) -> bytes:
        return struct.pack("<4sLQL", b"PK\x06\x07", 0, offset, 1)
    if variant == "zip64 beside a size of 0":
        return cd + zip64(n, len(cd), 0) + locator(len(cd)) + eocd(0, 0, 0, 0)
    if variant == "counts spelling the signature":
        return cd + eocd(0x4B50, 0x0605, len(cd), 0)
    fake = zip64(0, 0, 0)  # a locator pointing at a small record; zipfile reads the one before it
    return fake + cd + zip64(n, len(cd), len(fake)) + locator(0) + eocd(0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF)


@pytest.mark.parametrize("variant", ["zip64 beside a size of 0", "counts spelling the signature", "a locator elsewhere"])
def test_an_end_record_that_lies_does_not_hide_a_large_directory(client, variant):
    body = _lying_directory(variant, 50_000)
    start = time.process_time()
    assert wire.expanded_size(body, wire.NPZ) == len(body)
    with pytest.raises(wire.WireError, match="central directory"):
        wire.read_npz(body)
    assert time.process_time() - start < 0.1
    assert_problem(client.post(SIN, content=body, headers={"content-type": wire.NPZ}), 413, "payload_too_large")


@pytest.mark.parametrize("compression", [zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA])
def test_bzip2_and_lzma_members_are_refused(client, compression):
    body = _zip({"x.npy": npy_bytes(np.arange(3.0, dtype=np.float32))}, compression)
    detail = assert_problem(client.post(SIN, content=body, headers={"content-type": wire.NPZ}), 400, "malformed_body")["detail"]
    assert "deflate" in detail


def _lying_sizes(body: bytes, file_size: int) -> bytes:
    """Rewrite the central directory's uncompressed size of the (only) member."""
    at = body.rindex(b"PK\x01\x02")
    return body[: at + 24] + file_size.to_bytes(4, "little") + body[at + 28 :]


def _no_member_opened(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a member was decompressed")

    monkeypatch.setattr(zipfile.ZipFile, "open", refuse)


@pytest.mark.parametrize(
    "body, limits, code",
    [
        (_zip({"x.npy": npy_bytes(np.zeros(2))}, zipfile.ZIP_BZIP2), wire.Limits(), "malformed_body"),
        (_zip({"x.npy": npy_bytes(np.zeros(2))}, zipfile.ZIP_LZMA), wire.Limits(), "malformed_body"),
        # 1 KiB deflated claiming 100 MiB: beyond what deflate can do
        (_lying_sizes(_zip({"x.npy": npy_bytes(np.random.default_rng(0).random(128))}, zipfile.ZIP_DEFLATED), 100 << 20), wire.Limits(), "malformed_body"),
        # one member over what max_elements allows any array to take
        (_zip({"x.npy": npy_bytes(np.zeros(1 << 18))}, zipfile.ZIP_DEFLATED), wire.Limits(max_elements=100), "payload_too_large"),
    ],
)
def test_npz_refused_before_any_member_is_expanded(monkeypatch, body, limits, code):
    _no_member_opened(monkeypatch)
    with pytest.raises(wire.WireError) as info:
        wire.read_npz(body, limits)
    assert info.value.code == code


def test_deflated_npz_still_reads(client):
    buf = io.BytesIO()
    np.savez_compressed(buf, x=np.zeros(1000, dtype=np.float32))
    got, _ = decode(client.post(SIN, content=buf.getvalue(), headers={"content-type": wire.NPZ}))
    assert got.shape == (1000, 1000)


# ----------------------------------------------------------------- item 13: client data is never a 500


@pytest.mark.parametrize(
    "array",
    [
        {"dtype": "float64", "shape": [0, 2**63 - 1], "data": []},
        {"dtype": "float64", "shape": [0, 2**62], "data": []},
        {"dtype": "float64", "shape": [2**62, 0], "base64": ""},
        {"dtype": "float64", "shape": [0, 2**63], "base64": ""},
    ],
)
def test_zero_size_arrays_with_huge_dimensions_are_4xx(client, array):
    response = client.post(SIN, json={"inputs": [array]})
    assert response.status_code in (413, 422), response.text
    assert_problem(response, response.status_code, {413: "payload_too_large", 422: "invalid_input"}[response.status_code])


@pytest.mark.parametrize("shape", ["(0, 9223372036854775808)", "(0, 4611686018427387904)", "(9223372036854775807, 0)"])
def test_zero_size_npy_with_huge_dimensions_is_4xx(client, shape):
    response = client.post(SIN, content=_npy_with_shape(shape), headers={"content-type": wire.NPY})
    assert response.status_code in (413, 422), response.text
    assert_problem(response, response.status_code, {413: "payload_too_large", 422: "invalid_input"}[response.status_code])


def test_shape_dims_must_fit_int64():
    with pytest.raises(wire.WireError) as info:
        wire.decode_json_array({"dtype": "float32", "shape": [0, 2**64], "data": []})
    assert info.value.code == "invalid_input"


@pytest.mark.parametrize("query", ["chunk_size=99999999999999999999", "chunk_size=18446744073709551616", "chunk_size=9223372036854775808"])
def test_chunk_size_beyond_64_bits_is_422(client, query):
    assert_problem(client.post(f"{SIN}?{query}", json={"inputs": [[1.0]]}), 422, "invalid_input")


def test_chunk_size_beyond_64_bits_in_json_is_422(client):
    assert_problem(client.post(SIN, json={"inputs": [[1.0]], "chunk_size": 2**63}), 422, "invalid_input")


# ----------------------------------------------------------------- item 20: lenient input


@pytest.mark.parametrize(
    "x",
    [
        [None, 1.0],
        None,
        ["0.5", 1.0],
        "0.5",
        [True, 1.0],
        [True, False],
        True,
        [[1.0, None], [2.0, 3.0]],
        {"dtype": "float32", "shape": [2], "data": [1.0, None]},
        {"dtype": "float32", "shape": [2], "data": ["1.0", "NaN"]},
        {"dtype": "float32", "shape": [2], "data": [True, 1.5]},
        {"dtype": "float64", "shape": [2], "data": [0, True]},
        {"dtype": "float32", "shape": [], "data": "nan"},
    ],
)
def test_nulls_strings_and_booleans_are_not_numbers(client, x):
    assert_problem(client.post(SIN, json={"inputs": [x]}), 422, "invalid_input")


@pytest.mark.parametrize(
    "data, want",
    [
        ([0, 1.5, "NaN", "Infinity", "-Infinity"], [0.0, 1.5, np.nan, np.inf, -np.inf]),
        ([[1, 0], [0, 1]], [[1.0, 0.0], [0.0, 1.0]]),
        (2**70, float(2**70)),
        ([0.0, 1.0, -0.0], [0.0, 1.0, -0.0]),
    ],
)
def test_numbers_and_spelled_non_finite_values_still_decode(data, want):
    arr, _ = wire.decode_json_array(data, "float64")
    np.testing.assert_array_equal(arr, np.asarray(want, dtype=np.float64))


@pytest.mark.parametrize("data", [["NaN", 1e10], [1.0, 1e10]])
def test_out_of_range_numbers_overflow_to_inf_with_or_without_spelled_values(data):
    """Found by the fuzzer: a float16 array with "NaN" beside 1e10 took another path whose
    cast warned (a 500 under warnings-as-errors); both paths give inf, as numpy casts."""
    arr, _ = wire.decode_json_array({"dtype": "float16", "shape": [2], "data": data})
    assert arr.dtype == np.float16 and arr[1] == np.inf


@pytest.mark.parametrize("data, ok", [([True, False], True), (True, True), ([0, 1], True), ([2, 0], False), ([1.0], False), ([None], False)])
def test_booleans_are_fine_for_bool_arrays(data, ok):
    if ok:
        arr, _ = wire.decode_json_array({"dtype": "bool", "shape": list(np.shape(data)), "data": data})
        np.testing.assert_array_equal(arr, np.asarray(data, dtype=bool))
        assert arr.dtype == np.bool_
    else:
        with pytest.raises(wire.WireError) as info:
            wire.decode_json_array({"dtype": "bool", "shape": list(np.shape(data)), "data": data})
        assert info.value.code == "invalid_input"


def test_booleans_for_a_declared_bool_input(client):
    body = {"inputs": [X.tolist(), [True, False, True]]}
    got, _ = decode(client.post("/v1/functions/masked/jacobian", json=body))
    np.testing.assert_allclose(got, np.diag([1.0, 0.0, 1.0]))
    body = {"inputs": [X.tolist(), [1.0, 0.0, 1.0]]}
    assert_problem(client.post("/v1/functions/masked/jacobian", json=body), 422, "invalid_input")


@pytest.mark.parametrize(
    "names",
    [
        ["cotangents/-1", "cotangents/0"],
        ["cotangents/0", "cotangents/5"],
        ["cotangents/1", "cotangents/2"],
        ["cotangents/00", "cotangents/1"],
        ["cotangents", "cotangents/0"],
        ["cotangents/0", "cotangents/0/1"],
        ["cotangents/0", "cotangents/a"],
        ["cotangents/0", "cotangents/1/"],
    ],
)
def test_npz_vector_member_names_must_be_exact_positions(client, names):
    body = npz_bytes(r=X, theta=X, **{n: np.ones(3, dtype=np.float32) for n in names})
    assert_problem(client.post("/v1/functions/polar/vjp", content=body, headers={"content-type": wire.NPZ}), 422, "invalid_input")


@pytest.mark.parametrize("names", [["x", "x/"], ["x/"], ["/x"], ["x//"], ["params/w", "params/w/", "params/b", "x"]])
def test_npz_input_member_paths_with_an_empty_name_are_422(client, names):
    """`x/.npy` beside `x.npy` named the same input twice, and the last member won."""
    fn = "dense_layer" if any(n.startswith("params") for n in names) else "sin"
    arrays = {n: np.full((2, 2) if n.startswith("params/w") else 2, i + 1.0, np.float32) for i, n in enumerate(names)}
    body = npz_bytes(**arrays)
    r = client.post(f"/v1/functions/{fn}/jacobian", content=body, headers={"content-type": wire.NPZ})
    assert_problem(r, 422, "invalid_input")
    assert "empty name in the path" in r.json()["detail"]


# ----------------------------------------------------------------- item 21: Python's JSON


def test_bare_nan_and_infinity_from_python_json(client):
    body = json.dumps({"inputs": [[float("nan"), float("inf"), -float("inf"), 0.0]]})
    assert "NaN" in body and "Infinity" in body
    got, _ = decode(client.post(SIN, content=body, headers={"content-type": wire.JSON}))
    diag = np.diag(got)
    assert np.isnan(diag[:3]).all() and diag[3] == 1.0


def test_bare_nan_as_cotangent(client):
    body = json.dumps({"inputs": [[0.0, 1.0]], "cotangents": [float("nan"), 1.0]})
    got, _ = decode(client.post("/v1/functions/sin/vjp", content=body, headers={"content-type": wire.JSON}), "vjp")
    assert np.isnan(got[0]) and got[1] == pytest.approx(np.cos(1.0))


@pytest.mark.parametrize(
    "payload, status, code",
    [
        (b"[" * 100_000 + b"NaN" + b"]" * 100_000, 400, "malformed_body"),
        (b'{"inputs": [' + b"[" * 70 + b"NaN" + b"]" * 70 + b"]}", 400, "malformed_body"),
        (b'{"inputs": [[NaN, 1.0]], "chunk_size": NaN}', 422, "invalid_input"),
        (b'{"inputs": [[NaN, 1.0]]', 400, "malformed_body"),
        (b'{"inputs": [[nan, 1.0]]}', 400, "malformed_body"),
        (b'{"inputs": [[NaN, 1.0]], "argnums": Infinity}', 422, "invalid_input"),
    ],
)
def test_python_json_keeps_the_limits(client, payload, status, code):
    assert_problem(client.post(SIN, content=payload, headers={"content-type": wire.JSON}), status, code)


def test_loads_falls_back_only_for_non_finite_tokens():
    assert wire.loads(b'[NaN, Infinity, -Infinity, 1]')[3] == 1
    assert wire.loads(b'{"a": [ NaN ,\n-Infinity], "NaN": "Infinity in a string"}') == {
        "a": ["NaN", "-Infinity"], "NaN": "Infinity in a string"}
    # bare tokens only where a value stands: as a key, or glued to other text, unreadable
    for bad in (b"[nan]", b"[1, 2", b"NaN!", b"[Infinity, ]", b"{NaN: 1}", b'{"a": 1, NaN: 2}', b"[1NaN]", b"[NaNa]"):
        with pytest.raises(wire.WireError):
            wire.loads(bad)


@pytest.mark.parametrize("body", [
    b'NaN"' + b'\\"' * 200_000,  # one string left open, full of escaped quotes
    b'NaN"' + b'\\"' * 200_000 + b"\\",  # ... ending in a lone backslash
    b'{"a": [' + b'"x",' * 300_000 + b"NaN]}",  # more strings than a rewrite is tried for
])
def test_loads_of_hostile_text_with_bare_tokens_is_linear(body):
    """Found by a red team: the rewrite's string pattern failed on a string left open and
    was retried from every quote in it, time in the square of the body (40 KB: 6 s, with
    the front end's event loop stalled). 400 KB of it now takes milliseconds."""
    start = time.process_time()
    with pytest.raises(wire.WireError):
        wire.loads(body)
    assert time.process_time() - start < 0.5


def test_a_body_of_escaped_quotes_is_400_at_once_on_a_server(client):
    body = b'NaN"' + b'\\"' * 20_000
    start = time.process_time()
    assert_problem(client.post(SIN, content=body, headers={"content-type": wire.JSON}), 400, "malformed_body")
    assert time.process_time() - start < 0.5


def test_npz_vector_paths_nested_too_deeply_are_422(client):
    name = "cotangents/" + "/".join(["0"] * 5000)
    body = npz_bytes(r=X, theta=X, **{name: np.ones(3, dtype=np.float32)})
    assert_problem(client.post("/v1/functions/polar/vjp", content=body, headers={"content-type": wire.NPZ}), 422, "invalid_input")


_trees = st.recursive(
    st.builds(lambda n: np.full(2, n, dtype=np.float32), st.integers(0, 9)),
    lambda children: st.lists(children, min_size=1, max_size=3) | st.dictionaries(st.sampled_from(["a", "b", "k", "zz"]), children, min_size=1, max_size=3),
    max_leaves=8,
)


@settings(max_examples=100, deadline=None)
@given(_trees)
def test_npz_member_paths_spell_the_tree(tree):
    """The .npz names a tree's arrays get (wire.flatten_tree, as the SDK and the server
    write them) read back (wire.tree_from_paths) as the same tree, in torch's leaf order."""
    _, arrays = wire.flatten_tree("cotangents", tree)
    back = wire.tree_from_paths({path.removeprefix("cotangents").removeprefix("/"): arr for path, arr in arrays})
    assert pytree.tree_structure(back) == pytree.tree_structure(tree)
    assert all(a is b for a, b in zip(pytree.tree_leaves(back), pytree.tree_leaves(tree)))
    assert all(a is b for a, b in zip(wire.vector_leaves(back, tree), pytree.tree_leaves(tree)))


def test_an_option_given_in_both_the_query_and_a_json_body_is_422(client):
    """Which one was meant cannot be known (the body's won, silently); options split
    between the two still combine."""
    r = client.post(f"{SIN}?chunk_size=1", json={"inputs": [[1.0, 2.0]], "chunk_size": 2})
    assert_problem(r, 422, "invalid_input")
    assert r.json()["detail"] == "options ['chunk_size'] are given in both the query string and the body; give each once"
    got, doc = decode(client.post(f"{SIN}?chunk_size=1", json={"inputs": [[1.0, 2.0]], "return_output": True}))
    assert doc["meta"]["chunk_size"] == 1 and "output" in doc


@pytest.mark.parametrize("url, body, key", [
    (SIN, b'{"inputs": [[1.0]], "inputs": [[2.0, 3.0]]}', "inputs"),
    (SIN, b'{"inputs": [{"dtype": "float64", "shape": [1], "data": [1.0], "dtype": "float16"}]}', "dtype"),
    (SIN, b'{"inputs": {"x": [1.0], "\\u0078": [2.0]}}', "x"),  # the same key, spelled two ways
    (SIN, b'{"inputs": [[1.0]], "argnums": 0, "argnums": "x:y"}', "argnums"),  # a colon in a string too
    ("/v1/functions/dict_out/vjp", b'{"inputs": [[1.0, 2.0]], "cotangents": {"a": [1.0, 1.0], "a": [2.0, 2.0]}}', "a"),
])
def test_a_json_object_giving_a_key_twice_is_refused(client, url, body, key):
    """orjson (as Python's json) kept the last of the two, silently: {"inputs": A,
    "inputs": B} was answered for B, whatever a proxy or a log in front had read."""
    r = client.post(url, content=body, headers={"content-type": "application/json"})
    assert_problem(r, 400, "malformed_body")
    assert r.json()["detail"] == f"a JSON object gives the key {key!r} twice; give each key once"


def test_colons_inside_strings_are_not_keys(client):
    """The check counts colons against the object members parsed; a colon inside a string
    makes it look again (exactly), and a body with no key twice is served."""
    r = client.post(f"{SIN}", content=b'{"inputs": {"x": [1.0]}, "sparsity": "dense", "mode": "rev"}',
                    headers={"content-type": "application/json"})
    assert r.status_code == 200
    r = client.post(SIN, content=b'{"inputs": [[1.0]], "argnums": "x:y"}', headers={"content-type": "application/json"})
    assert_problem(r, 422, "invalid_input")  # read, then refused for what it says: no such parameter
    assert "'x:y' is not a parameter" in r.json()["detail"]
