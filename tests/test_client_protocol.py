"""The SDK's request/response layer without sockets: bodies, queries, Accept, results,
error mapping, retry decisions, and the incremental .npy reader."""

from __future__ import annotations

import io
import random
import zipfile
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

import jacobian_client as jc
from jacobian_client import wire
from jacobian_client._errors import TransportError, error_from_response
from jacobian_client._npystream import FileSink, MemorySink, NpyReceiver
from jacobian_client._protocol import NPY_OR_NPZ, Protocol, RetryPolicy, parse_retry_after


def npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


# --------------------------------------------------------------------------- requests


def test_one_array_input_goes_as_npy_with_query_options() -> None:
    proto = Protocol()
    x = np.arange(3, dtype=np.float32)
    call = proto.compute_call("jacobian", "sin", [x], {"argnums": 0, "chunk_size": 16, "batched": True})
    assert call.method == "POST" and call.path == "/v1/functions/sin/jacobian"
    assert call.headers["Content-Type"] == wire.NPY
    assert call.headers["Accept"] == NPY_OR_NPZ
    assert call.params == {"chunk_size": "16", "batched": "true"}
    np.testing.assert_array_equal(wire.read_npy(call.content), x)
    assert call.fallback is not None and call.fallback.headers["Accept"] == wire.NPZ


def test_several_inputs_go_as_npz_named_by_position_and_tuple_argnums_in_query() -> None:
    proto = Protocol()
    x, y = np.ones(2), np.zeros(2, np.float32)
    call = proto.compute_call("jacobian", "add_square", [x, y], {"argnums": (0, 1), "rows": (1, 2)})
    assert call.headers["Content-Type"] == wire.NPZ
    assert call.headers["Accept"] == wire.NPZ  # a tuple of Jacobians is never one array
    assert call.params == {"argnums": "0,1", "rows": "1,2"}
    members = wire.read_npz(call.content)
    assert set(members) == {"0", "1"} and members["1"].dtype == np.float32
    one = proto.compute_call("jacobian", "add_square", [x, y], {"argnums": (1,)})
    assert one.params == {"argnums": "1,"}  # stays a tuple on the server


def test_plain_numbers_go_as_json_without_dtype_and_arrays_as_base64() -> None:
    proto = Protocol()
    call = proto.compute_call("jacobian", "add_square", [[0.5, 1.0], np.ones(2, np.float64)], {})
    assert call.headers["Content-Type"] == wire.JSON
    body = wire.loads(call.content)
    assert body["inputs"][0] == [0.5, 1.0]
    arr, dtype = wire.decode_json_array(body["inputs"][1])
    assert dtype == "float64" and arr.tolist() == [1.0, 1.0]
    assert "base64" in body["inputs"][1]


def test_json_transport_is_readable_json_both_ways() -> None:
    proto = Protocol(transport="json")
    call = proto.compute_call("jacobian", "sin", [np.ones(2, np.float32)], {"argnums": "x"})
    assert call.headers["Accept"] == wire.JSON and call.fallback is None
    body = wire.loads(call.content)
    assert body == {"inputs": [{"dtype": "float32", "shape": [2], "data": [1.0, 1.0]}], "argnums": "x"}


def test_vectors_travel_as_npz_members_or_json_tree() -> None:
    proto = Protocol()
    x = np.ones(2, np.float32)
    call = proto.compute_call("vjp", "polar", [x, x], {}, vectors=("cotangents", (x, 2 * x)))
    members = wire.read_npz(call.content)
    assert set(members) == {"0", "1", "cotangents/0", "cotangents/1"}
    single = proto.compute_call("jvp", "sin", [x], {}, vectors=("tangents", x))
    assert set(wire.read_npz(single.content)) == {"0", "tangents"}
    plain = proto.compute_call("vjp", "sin", [x], {}, vectors=("cotangents", [1.0, 2.0]))
    assert wire.loads(plain.content)["cotangents"] == [1.0, 2.0]


def test_defaults_are_not_sent_and_bad_options_are_refused_locally() -> None:
    proto = Protocol()
    call = proto.compute_call("jacobian", "sin", [np.ones(1)], {"argnums": 0, "chunk_size": None, "batched": False})
    assert call.params == {}
    with pytest.raises(ValueError):
        proto.compute_call("jacobian", "sin", [np.ones(1)], {"chunk_size": 0})
    with pytest.raises(TypeError):
        proto.compute_call("jacobian", "sin", [np.ones(1)], {"argnums": 1.5})
    with pytest.raises(ValueError):
        proto.compute_call("jacobian", "sin", [np.ones(1)], {"rows": (3, 1)})
    with pytest.raises(ValueError):
        proto.compute_call("jacobian", "sin", [np.ones(1)], {}, transport="json", out="J.npy")
    with pytest.raises(TypeError):
        proto.compute_call("jacobian", "sin", [object()], {})


def test_api_key_and_request_id_headers() -> None:
    proto = Protocol(api_key="sekret")
    assert proto.base_headers["Authorization"] == "Bearer sekret"
    a = proto.compute_call("evaluate", "sin", [np.ones(1)], {})
    b = proto.compute_call("evaluate", "sin", [np.ones(1)], {})
    assert a.headers["X-Request-ID"] != b.headers["X-Request-ID"]
    assert proto.function_call("a/b").path == "/v1/functions/a%2Fb"


def test_known_has_aux_asks_for_npz_and_out_asks_for_npy_only() -> None:
    proto = Protocol()
    proto.functions_cache["sin_aux"] = jc.FunctionInfo.from_json({"name": "sin_aux", "has_aux": True, "inputs": []})
    assert proto.compute_call("jacobian", "sin_aux", [np.ones(1)], {}).headers["Accept"] == wire.NPZ
    streamed = proto.compute_call("jacobian", "softmax", [np.ones(1)], {}, out="J.npy")
    assert streamed.headers["Accept"] == wire.NPY and streamed.fallback is None


def test_torch_tensors_are_accepted_when_torch_is_imported() -> None:
    torch = pytest.importorskip("torch")
    proto = Protocol()
    call = proto.compute_call("sin", "sin", [torch.ones(3, dtype=torch.float64, requires_grad=True)], {})
    assert wire.read_npy(call.content).dtype == np.float64
    bf = proto.compute_call("sin", "sin", [torch.tensor([1.5, -2.0], dtype=torch.bfloat16)], {})
    arr, name = wire.decode_json_array(wire.loads(bf.content)["inputs"][0])
    assert name == "bfloat16" and arr.tolist() == [1.5, -2.0]


# --------------------------------------------------------------------------- responses


def _response(status: int = 200, content: bytes = b"", ctype: str = wire.JSON, **headers: str) -> httpx.Response:
    return httpx.Response(status, content=content, headers={"content-type": ctype, **headers},
                          request=httpx.Request("POST", "http://t/v1/functions/f/jacobian"))


def test_npz_result_with_aux_and_output() -> None:
    proto = Protocol()
    call = proto.compute_call("jacobian", "f", [np.ones(2)], {"return_output": True})
    J, out = np.eye(2), np.ones(2)
    body = wire.write_npz({"jacobian": J, "output": out, "aux": {"n": 3, "v": out}}, {"device": "cpu"})
    got = proto.read_result(call, _response(content=body, ctype=wire.NPZ), body)
    assert isinstance(got, tuple) and len(got) == 3
    np.testing.assert_array_equal(got[0], J)
    np.testing.assert_array_equal(got[1], out)
    assert got[2]["n"] == 3 and got[0].flags.writeable


def test_json_result_nested_tuple() -> None:
    proto = Protocol(transport="json")
    call = proto.compute_call("jacobian", "polar", [np.ones(2), np.ones(2)], {"argnums": (0, 1)})
    tree = ((np.eye(2), np.eye(2) * 2), (np.eye(2) * 3, np.eye(2) * 4))
    body = wire.dumps({"jacobian": wire.encode_tree(tree), "meta": {}})
    got = proto.read_result(call, _response(content=body), body)
    assert isinstance(got, tuple) and isinstance(got[1], tuple)
    np.testing.assert_array_equal(got[1][0], np.eye(2) * 3)


def test_evaluate_with_aux_mirrors_calling_the_function() -> None:
    proto = Protocol()
    call = proto.compute_call("evaluate", "sin_aux", [np.ones(2)], {})
    body = wire.write_npz({"output": np.ones(2), "aux": np.zeros(2)}, {})
    out, aux = proto.read_result(call, _response(content=body, ctype=wire.NPZ), body)
    assert out.shape == aux.shape == (2,)


def test_functions_listing_fills_the_cache() -> None:
    proto = Protocol()
    doc = [{"name": "sin_aux", "description": "d", "has_aux": True,
            "inputs": [{"name": "x", "shape": ["n"], "dtype": "floating"}], "extra": 1}]
    body = wire.dumps(doc)
    infos = proto.read_result(proto.functions_call(), _response(content=body), body)
    assert infos[0].inputs[0] == jc.InputInfo("x", ("n",), "floating") and infos[0].raw["extra"] == 1
    assert proto.functions_cache["sin_aux"].has_aux


# --------------------------------------------------------------------------- errors

CODES = {
    "malformed_body": (400, jc.MalformedBody),
    "unauthorized": (401, jc.Unauthorized),
    "forbidden": (403, jc.Forbidden),
    "function_not_found": (404, jc.FunctionNotFound),
    "not_acceptable": (406, jc.NotAcceptable),
    "payload_too_large": (413, jc.PayloadTooLarge),
    "result_too_large": (413, jc.ResultTooLarge),
    "unsupported_media_type": (415, jc.UnsupportedMediaType),
    "invalid_input": (422, jc.InvalidInput),
    "overloaded": (429, jc.Overloaded),
    "function_error": (500, jc.FunctionError),
    "unavailable": (503, jc.Unavailable),
    "timeout": (504, jc.Timeout),
    "out_of_memory": (507, jc.OutOfMemory),
    "malformed_request": (400, jc.MalformedRequest),
    "not_found": (404, jc.NotFound),
    "method_not_allowed": (405, jc.MethodNotAllowed),
    "request_timeout": (408, jc.RequestTimeout),
    "precondition_failed": (412, jc.PreconditionFailed),
    "expectation_failed": (417, jc.ExpectationFailed),
    "headers_too_large": (431, jc.HeadersTooLarge),
    "internal_error": (500, jc.InternalError),
    "unsupported_transfer_coding": (501, jc.UnsupportedTransferCoding),
}


@pytest.mark.parametrize("code", sorted(CODES))
def test_error_mapping_by_code(code: str) -> None:
    status, cls = CODES[code]
    problem = {"type": "x", "title": "t", "status": status, "detail": f"because {code}", "code": code,
               "request_id": "rid-1"}
    resp = _response(status, wire.dumps(problem), wire.PROBLEM, **{"retry-after": "2"})
    err = error_from_response(resp)
    assert type(err) is cls
    assert err.status_code == status and err.code == code and err.problem == problem
    assert err.response is resp and err.request_id == "rid-1"
    assert f"because {code}" in str(err)


def test_error_mapping_falls_back_to_status_and_to_apierror() -> None:
    assert type(error_from_response(_response(404, b"<html>nope</html>", "text/html"))) is jc.FunctionNotFound
    assert type(error_from_response(_response(502, b"bad gateway", "text/plain"))) is jc.APIError
    unknown = error_from_response(_response(404, wire.dumps({"code": "brand_new", "detail": "x"}), wire.PROBLEM))
    assert type(unknown) is jc.APIError and unknown.code == "brand_new"
    assert isinstance(error_from_response(_response(429, b"", **{"retry-after": "3"})), jc.Overloaded)
    assert error_from_response(_response(429, b"", **{"retry-after": "3"})).retry_after == 3.0


# --------------------------------------------------------------------------- retries


def test_retry_after_parsing() -> None:
    assert parse_retry_after("2") == 2.0
    assert parse_retry_after("0.5") == 0.5
    assert parse_retry_after(None) is None
    assert parse_retry_after("garbage") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past


def test_a_retry_after_date_past_any_year_is_ignored() -> None:
    """A 503/429 whose Retry-After dates past C's int of years raised a bare
    OverflowError out of the call (and out of ``APIError.retry_after``): now read as
    absent, so the usual backoff applies and the retries stay bounded."""
    value = "Sun, 06 Nov 99999999999 08:49:37 GMT"
    assert parse_retry_after(value) is None
    assert RetryPolicy(rng=random.Random(0)).delay_after_status(503, {"retry-after": value}, 0, 0.0) is not None
    error = error_from_response(_response(503, b'{"code": "unavailable"}', **{"retry-after": value}))
    assert isinstance(error, jc.Unavailable) and error.retry_after is None


def test_retry_policy_decisions() -> None:
    policy = RetryPolicy(max_retries=3, backoff_base=0.5, backoff_max=2.0, max_retry_time=10.0, rng=random.Random(0))
    assert policy.delay_after_status(500, {}, 0, 0.0) is None
    assert policy.delay_after_status(422, {}, 0, 0.0) is None
    d = policy.delay_after_status(429, {"retry-after": "3"}, 0, 0.0)
    assert d is not None and 3.0 <= d <= 3.3
    assert policy.delay_after_status(429, {"retry-after": "30"}, 0, 0.0) is None  # past the total bound
    assert policy.delay_after_status(503, {}, 3, 0.0) is None  # count bound
    for attempt in range(3):
        d = policy.delay_after_status(503, {}, attempt, 0.0)
        assert d is not None and 0.0 <= d <= min(2.0, 0.5 * 2**attempt)
    req = httpx.Request("GET", "http://t")
    assert policy.delay_after_exception(httpx.ConnectError("refused", request=req), 0, 0.0) is not None
    assert policy.delay_after_exception(httpx.RemoteProtocolError("gone", request=req), 0, 0.0) is not None
    assert policy.delay_after_exception(httpx.ReadTimeout("slow", request=req), 0, 0.0) is None


# --------------------------------------------------------------------------- .npy stream


@pytest.mark.parametrize("piece", [1, 7, 128, 1 << 20])
def test_receiver_reassembles_any_piece_size(piece: int) -> None:
    arr = np.arange(60, dtype=">f8").reshape(3, 4, 5)
    body = npy(arr)
    rx = NpyReceiver(MemorySink())
    for i in range(0, len(body), piece):
        rx.feed(body[i : i + piece])
    got = rx.close()
    np.testing.assert_array_equal(got, arr)
    assert got.dtype == np.float64 and got.dtype.isnative and got.flags.writeable


def test_receiver_handles_empty_and_scalar() -> None:
    for arr in (np.zeros((0, 3), np.float32), np.float64(2.5) * np.ones(())):
        rx = NpyReceiver(MemorySink())
        rx.feed(npy(arr))
        np.testing.assert_array_equal(rx.close(), arr)


def test_receiver_short_long_and_bad_bodies() -> None:
    body = npy(np.ones(100))
    rx = NpyReceiver(MemorySink())
    rx.feed(body[:-1])
    with pytest.raises(jc.IncompleteResponse):
        rx.close()
    rx = NpyReceiver(MemorySink())
    with pytest.raises(jc.TransportError):
        rx.feed(body + b"x")
    rx = NpyReceiver(MemorySink())
    with pytest.raises(jc.TransportError):
        rx.feed(b"PK\x03\x04 not an npy at all")
    rx = NpyReceiver(MemorySink())
    rx.feed(body[:5])
    with pytest.raises(jc.IncompleteResponse):
        rx.close()


def test_file_sink_renames_only_when_whole(tmp_path: Path) -> None:
    arr = np.arange(1000, dtype=np.float32).reshape(10, 100)
    body = npy(arr)
    out = tmp_path / "J.npy"
    out.write_bytes(b"previous result")
    rx = NpyReceiver(FileSink(out))
    rx.feed(body[:-10])
    with pytest.raises(jc.IncompleteResponse):
        rx.close()
    assert out.read_bytes() == b"previous result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["J.npy"]
    progress: list[tuple[int, int]] = []
    rx = NpyReceiver(FileSink(out), on_progress=lambda done, total: progress.append((done, total)))
    for i in range(0, len(body), 1000):
        rx.feed(body[i : i + 1000])
    got = rx.close()
    assert isinstance(got, np.memmap) and not got.flags.writeable
    np.testing.assert_array_equal(got, arr)
    assert progress[-1] == (len(body), len(body))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["J.npy"]


# --------------------------------------------------------------------------- 406 fallback


def test_server_that_does_not_negotiate_gets_npz_after_406() -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers["accept"])
        if request.headers["accept"] != wire.NPZ:
            return httpx.Response(406, json={"code": "not_acceptable", "detail": "has aux"},
                                  headers={"content-type": wire.PROBLEM})
        body = wire.write_npz({"jacobian": np.eye(2), "aux": np.ones(2)}, {})
        return httpx.Response(200, content=body, headers={"content-type": wire.NPZ})

    with jc.Client("http://t", http_transport=httpx.MockTransport(handler)) as client:
        J, aux = client.jacobian("sin_aux", np.ones(2))
        J, aux = client.jacobian("sin_aux", np.ones(2))
        with pytest.raises(jc.NotAcceptable):
            client.jacobian("sin_aux", np.ones(2), out="never.npy")
    assert seen == [NPY_OR_NPZ, wire.NPZ, wire.NPZ, wire.NPY]
    assert not Path("never.npy").exists()


def test_client_rejects_unknown_transport() -> None:
    with pytest.raises(ValueError):
        jc.Client("http://t", transport="xml")
    with pytest.raises(TypeError):
        jc.Client("http://t", max_retries=1, retry=RetryPolicy())


def _deep(levels: int, leaf: bytes) -> bytes:
    return b"[" * levels + leaf + b"]" * levels  # orjson writes no more than 254 levels


@pytest.mark.parametrize("what", ["json value", "json aux", "npz meta.json"])
def test_a_result_nested_too_deeply_is_a_transport_error(what: str) -> None:
    """orjson reads 1,024 levels; the trees built from them are walked recursively, and a
    result nested ~900 deep ended the call in a bare RecursionError (not an SDK error)."""
    proto = Protocol(transport="json" if what.startswith("json") else "binary")
    call = proto.compute_call("evaluate", "f", [np.ones(2)], {})
    if what == "json value":
        body = b'{"output": ' + _deep(900, b"1") + b"}"
        ctype = wire.JSON
    elif what == "json aux":
        body = b'{"output": [1.0], "aux": ' + _deep(900, b"1") + b"}"
        ctype = wire.JSON
    else:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            zf.writestr("output.npy", npy(np.ones(2)))
            zf.writestr("meta.json", b'{"structure": {"output": ' + _deep(900, b'{"$npy": "output.npy"}') + b"}}")
        body, ctype = buf.getvalue(), wire.NPZ
    with pytest.raises(TransportError, match="^unreadable evaluate response: nested too deeply$"):
        proto.read_result(call, _response(content=body, ctype=ctype), body)


WRONG_ANSWERS = [
    # (kind, inputs, options, vectors, answer, message)
    ("jacobian", [np.ones(3)], {}, None, np.eye(2), (r"value is shaped \(2, 2\); a right one ends with the shape of "
                                                     r"an input it differentiates: \(3,\)")),
    ("jacobian", [np.ones(3)], {}, None, np.eye(3, dtype=np.int64), "value is int64; a jacobian is floating"),
    ("jacobian", [np.ones(3), np.ones((2, 2))], {"argnums": 1}, None, np.ones((3, 3)), r"differentiates: \(2, 2\)$"),
    ("jacobian", [np.ones((4, 3))], {"batched": True}, None, np.ones((5, 3)), r"a batch of 4 examples was sent"),
    ("hessian", [np.ones(3)], {}, None, np.ones((3, 2)), r"differentiates: \(3,\)$"),
    ("vjp", [np.ones(3)], {}, ("cotangents", np.ones(2)), np.ones(2), r"differentiates: \(3,\)$"),
    ("hvp", [np.ones(3)], {}, ("tangents", np.ones(3)), np.ones(4), r"differentiates: \(3,\)$"),
    ("vjp", [np.ones(3)], {}, ("cotangents", np.ones(3)), np.ones(3, dtype=np.int32), "a vjp is floating"),
    ("evaluate", [np.ones((4, 3))], {"batched": True}, None, np.ones(3), r"a batch of 4 examples was sent"),
]


@pytest.mark.parametrize("kind, inputs, options, vectors, answer, message", WRONG_ANSWERS)
@pytest.mark.parametrize("ctype", [wire.NPY, wire.NPZ, wire.JSON, "stream"])
def test_an_answer_the_inputs_rule_out_is_refused(kind: str, inputs: list[np.ndarray], options: dict[str, Any],
                                                  vectors: Any, answer: np.ndarray, message: str, ctype: str) -> None:
    """A Jacobian of a 3-vector answered as a 2x2 matrix (or as integers, or a batch of
    another size) by a buggy server or a proxy's mix-up was returned as it came, in
    every format: the inputs sent rule such answers out (torch.func's shapes)."""
    proto = Protocol()
    call = proto.compute_call(kind, "f", inputs, options, vectors=vectors)
    key = {"evaluate": "output"}.get(kind, kind)
    if ctype == "stream":
        with pytest.raises(TransportError, match=message):
            proto.receiver(call, _response(content=b"", ctype=wire.NPY))[0].feed(npy(answer))
        return
    body = {wire.NPY: lambda: npy(answer), wire.NPZ: lambda: wire.write_npz({key: answer}, {}),
            wire.JSON: lambda: wire.dumps({key: wire.encode_tree(answer)})}[ctype]()
    with pytest.raises(TransportError, match=message):
        proto.read_result(call, _response(content=body, ctype=ctype), body)


def test_every_right_shape_passes_the_check() -> None:
    """The check refuses no answer torch.func gives: tuple argnums, pytree inputs, a
    parameter's name, rows, batched Hessians, batched vectors, 0-d inputs."""
    proto = Protocol()
    cases = [
        ("jacobian", [np.ones(3), np.ones((2, 2))], {"argnums": (0, 1)}, None,
         ((np.ones((4, 3)), np.ones((4, 2, 2))),)),
        ("jacobian", [{"w": np.ones((2, 3)), "b": np.ones(2)}], {}, None, {"w": np.ones((2, 2, 3)), "b": np.eye(2)}),
        ("jacobian", [np.ones(3), np.ones(5)], {"argnums": "y"}, None, np.ones((7, 5))),
        ("jacobian", [np.ones(3)], {"rows": (2, 4)}, None, np.ones((2, 3))),
        ("jacobian", [np.array(0.5)], {}, None, np.ones(6)),
        ("hessian", [np.ones((4, 3))], {"batched": True}, None, np.ones((4, 3, 3))),
        ("vjp", [np.ones(3)], {"batched_vectors": True}, ("cotangents", np.ones((6, 2))), np.ones((6, 3))),
        ("evaluate", [np.ones(3)], {}, None, np.ones((), dtype=np.int64)),
        ("jvp", [np.ones(3)], {}, ("tangents", np.ones(3)), np.ones((7, 7), dtype=np.float16)),
        ("jvp", [np.ones(3)], {}, ("tangents", np.ones(3)), (np.ones(2), np.zeros((), dtype=np.int64))),  # as torch's
    ]
    for kind, inputs, options, vectors, answer in cases:
        call = proto.compute_call(kind, "f", inputs, options, vectors=vectors)
        key = {"evaluate": "output"}.get(kind, kind)
        body = wire.write_npz({key: answer}, {})
        got = proto.read_result(call, _response(content=body, ctype=wire.NPZ), body)
        assert type(got) is type(answer), (kind, options)


def test_a_sparse_answer_to_a_dense_call_and_back_is_refused() -> None:
    """A dense Jacobian call answered with a sparse ``.npz`` returned a scipy matrix, and
    a sparse call answered densely returned a numpy array, silently."""
    proto = Protocol()
    dense_call = proto.compute_call("jacobian", "f", [np.ones(3)], {})
    body = wire.write_sparse_npz(wire.SparseCOO(np.arange(3), np.arange(3), np.ones(3), (3, 3)))
    with pytest.raises(TransportError, match="value is a sparse matrix; a dense one was asked for"):
        proto.read_result(dense_call, _response(content=body, ctype=wire.NPZ), body)
    sparse_call = proto.compute_call("jacobian", "f", [np.ones(3)], {"sparsity": "auto"})
    body = wire.write_npz({"jacobian": np.eye(3)}, {})
    with pytest.raises(TransportError, match=r"value is a dense array; a sparse matrix was asked for"):
        proto.read_result(sparse_call, _response(content=body, ctype=wire.NPZ), body)
    dense_of_sparse = proto.compute_call("jacobian", "f", [np.ones(3)], {"sparsity": "auto", "sparse_format": "dense"})
    assert proto.read_result(dense_of_sparse, _response(content=body, ctype=wire.NPZ), body).shape == (3, 3)


def test_a_sparse_matrix_the_inputs_rule_out_is_refused() -> None:
    """A sparse Jacobian is (outputs x input elements), a sparse Hessian n x n: a matrix
    of another width came back as the answer."""
    proto = Protocol()
    wrong = wire.write_sparse_npz(wire.SparseCOO(np.arange(3), np.arange(3), np.ones(3), (3, 4)))
    for kind, message in (("jacobian", r"shaped \(3, 4\); the inputs sent make it \(m, 6\)"),
                          ("hessian", r"shaped \(3, 4\); the inputs sent make it \(6, 6\)")):
        call = proto.compute_call(kind, "f", [np.ones((2, 3))], {"sparsity": "auto"})
        with pytest.raises(TransportError, match=message):
            proto.read_result(call, _response(content=wrong, ctype=wire.NPZ), wrong)
    right = wire.write_sparse_npz(wire.SparseCOO(np.arange(3), np.arange(3), np.ones(3), (5, 6)))
    call = proto.compute_call("jacobian", "f", [np.ones((2, 3))], {"sparsity": "auto"})
    assert proto.read_result(call, _response(content=right, ctype=wire.NPZ), right).shape == (5, 6)
    call = proto.compute_call("jacobian", "f", [np.ones(2), np.ones(3)], {"sparsity": "auto", "argnums": (0, 1)})
    both = wire.write_sparse_npz(wire.SparseCOO(np.arange(3), np.arange(3), np.ones(3), (4, 5)))  # 2 + 3 columns
    assert proto.read_result(call, _response(content=both, ctype=wire.NPZ), both).shape == (4, 5)
