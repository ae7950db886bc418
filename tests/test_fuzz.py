"""Fuzzing: schemathesis over /openapi.json, and hostile bodies from Hypothesis.

Whatever arrives, the answer is a 2xx or a 4xx problem+json (the built-ins never fail
on their own), never a 500, and the process keeps serving.
"""

from __future__ import annotations

import io
import json
import zipfile
from urllib.parse import quote

import numpy as np
import pytest
import schemathesis
from starlette.testclient import TestClient
from hypothesis import HealthCheck, event, given, settings, strategies as st

from jacobian_client import wire
from jacobian_service import create_app
from jacobian_service.settings import Settings

# sum_sin and rosenbrock are the scalar ones: hvp gets past its output check only there.
BUILTINS = ["sin", "sin_aux", "sum_sin", "rosenbrock", "add_square", "no_grad_square", "polar", "softmax", "planar_arm", "mlp",
            "lorenz96"]
ENDPOINTS = ["jacobian", "hessian", "evaluate", "vjp", "jvp", "hvp"]
HOSTILE_SETTINGS = Settings(warmup=False, max_request_bytes=1 << 20, max_array_elements=1 << 16, request_timeout_s=20)


@schemathesis.serializer(wire.NPY, wire.NPZ)
def _raw_bytes(ctx, value) -> bytes:
    """The binary bodies are opaque to schemathesis: send what it generated, as bytes."""
    return value if isinstance(value, bytes) else str(value).encode()


APP = create_app(HOSTILE_SETTINGS)


@pytest.fixture(scope="module", autouse=True)
def app():
    with TestClient(APP):  # runs the lifespan: the worker is up for the whole module
        yield APP


@pytest.fixture(scope="module")
def module_schema(app):
    return schemathesis.openapi.from_asgi("/openapi.json", app)


@pytest.fixture
def schema(request, module_schema):
    # schemathesis' lazy tests read and set the test's ``_nodeid``, which pytest 9 no
    # longer has (AttributeError): given here, as the id its reports take.
    if not hasattr(request.node, "_nodeid"):
        request.node._nodeid = request.node.nodeid
    return module_schema


# The schema is loaded from a fixture (lazily): each operation's test, with the coverage
# phase's cases schemathesis builds for it (~6 CPU-s for the 14 operations), is made when
# the test runs, in the one xdist worker that runs this module, not as every worker
# collects the whole suite. The same cases run, one subtest per operation.
lazy_schema = schemathesis.pytest.from_fixture("schema")


def assert_handled(response) -> None:
    assert response.status_code < 500, response.text
    assert "Traceback" not in response.text
    if response.status_code >= 400:
        content_type = response.headers["content-type"]
        content_type = content_type[0] if isinstance(content_type, list) else content_type  # schemathesis' Response
        assert content_type.startswith(wire.PROBLEM)


@lazy_schema.parametrize()
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
def test_schemathesis_finds_no_server_error(case):
    response = case.call()
    if response.status_code == 504 and "X-Request-Timeout" in (case.headers or {}):
        return  # the deadline the case asked for (1e-300 s) passed: the 504 is the answer
    assert_handled(response)


def test_the_fuzzers_reach_every_endpoint(schema):
    """A new endpoint is fuzzed only if the OpenAPI document lists it (schemathesis) and
    ENDPOINTS names it (the hostile bodies below)."""
    from jacobian_service.parsing import KINDS

    assert set(ENDPOINTS) == set(KINDS)
    paths = schema.raw_schema["paths"]
    for endpoint in ENDPOINTS:
        assert "post" in paths[f"/v1/functions/{{name}}/{endpoint}"], endpoint


@pytest.fixture(scope="module")
def hostile(app):
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=30,
)
option_values = st.fixed_dictionaries(
    {},
    optional={
        "argnums": st.one_of(st.integers(-3, 3), st.text(max_size=3), st.lists(st.integers(-3, 3), max_size=3)),
        "chunk_size": st.one_of(st.none(), st.integers(-5, 2**63)),
        "batched": st.one_of(st.booleans(), st.text(max_size=3)),
        "rows": st.lists(st.integers(-5, 2**40), max_size=3),
        "mode": st.sampled_from(["rev", "fwd", "auto", "??"]),
        "return_output": st.booleans(),
        "batched_vectors": st.booleans(),
    },
)
arrays = st.one_of(
    st.lists(st.floats(width=32), max_size=6),
    st.lists(st.lists(st.floats(-10, 10), min_size=2, max_size=2), max_size=3),
    st.builds(lambda d, s, data: {"dtype": d, "shape": s, "data": data}, st.sampled_from(["float32", "float64", "int64", "bool", "float16", "bfloat16", "complex64", "é"]), st.lists(st.integers(-2, 200), max_size=3), st.lists(st.floats(), max_size=5)),
    st.builds(lambda s, b: {"dtype": "float32", "shape": s, "base64": b}, st.lists(st.integers(-1, 2**62), max_size=3), st.text(max_size=12)),
    json_values,
)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    name=st.sampled_from(BUILTINS) | st.text(max_size=12),
    endpoint=st.sampled_from(ENDPOINTS),
    inputs=st.lists(arrays, max_size=3) | st.dictionaries(st.sampled_from(["x", "y", "r", "theta", "angles", "zz"]), arrays, max_size=3),
    options=option_values,
    vectors=arrays,
)
def test_hostile_json_bodies(hostile, name, endpoint, inputs, options, vectors):
    body = {"inputs": inputs, **options, "cotangents": vectors, "tangents": vectors}
    if endpoint != "vjp":
        body.pop("cotangents")
    if endpoint not in ("jvp", "hvp"):
        body.pop("tangents")
    assert_handled(hostile.post(f"/v1/functions/{quote(name, safe='')}/{endpoint}", content=json.dumps(body), headers={"content-type": wire.JSON}))


def npy_with(shape: str, descr: str = "<f4", data: bytes = b"") -> bytes:
    text = f"{{'descr': {descr!r}, 'fortran_order': False, 'shape': {shape}, }}".encode()
    text += b" " * (-(10 + len(text) + 1) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text + data


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    body=st.one_of(
        st.binary(max_size=300),
        st.builds(lambda shape, descr, data: npy_with(shape, descr, data), st.sampled_from(["(3,)", "(-1,)", "(2**70,)", "(1,)*40", "()", "(0,)", "'x'"]), st.sampled_from(["<f4", "<f8", "|O", "<c8", ">f8", "|b1", "<U3"]), st.binary(max_size=40)),
        st.builds(lambda cut: np.lib.format.header_data_from_array_1_0 and _saved(np.arange(5.0))[:cut], st.integers(0, 200)),
    ),
    media=st.sampled_from([wire.NPY, wire.NPZ]),
    query=st.dictionaries(st.sampled_from(["argnums", "chunk_size", "rows", "batched", "mode", "bogus"]), st.text(max_size=6), max_size=3),
)
def test_hostile_binary_bodies(hostile, body, media, query):
    response = hostile.post("/v1/functions/softmax/jacobian", content=body, params=query, headers={"content-type": media, "accept": wire.NPY})
    assert_handled(response)


# Tangent shapes for an input of shape x: its own (valid), a batch of it (valid with
# batched_vectors), and wrong ones; None stands for "the bytes the header promises".
_TANGENT_SHAPES = [lambda x: x, lambda x: (2, *x), lambda x: (4,), lambda x: (), lambda x: (0,), lambda x: (1,) * 40]


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    x=st.sampled_from([(3,), (2, 3), (), (0,)]),
    shape_of=st.sampled_from(_TANGENT_SHAPES),
    descr=st.sampled_from(["<f8", "<f4", "<i8", "|b1", "<c8", "|O", "<U3", ">f8"]),
    data=st.none() | st.binary(max_size=64),
    name=st.sampled_from(["sum_sin", "rosenbrock", "sin"]),
    query=st.dictionaries(st.sampled_from(["argnums", "batched_vectors", "return_output", "batched", "rows"]),
                          st.sampled_from(["true", "false", "0", "x", "-1", "[0]"]), max_size=2),
)
def test_hostile_hvp_npz_bodies(hostile, x, shape_of, descr, data, name, query):
    """hvp over .npz: a well-formed input and a tangents member of any shape and dtype,
    with data that may not match its header (many match: those reach the engine)."""
    shape = shape_of(x)
    if data is None:  # what the header promises (object and string arrays: whatever it is)
        data = b"\1" * (int(np.prod(shape)) * np.dtype(descr).itemsize) if descr[1] in "fibc" else b""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("x.npy", _saved(np.linspace(-1.0, 1.0, int(np.prod(x))).reshape(x)))
        zf.writestr("tangents.npy", npy_with(str(shape), descr, data))
    response = hostile.post(f"/v1/functions/{name}/hvp", content=buf.getvalue(), params=query,
                            headers={"content-type": wire.NPZ, "accept": wire.NPZ})
    assert_handled(response)
    event(f"status {response.status_code}")  # --hypothesis-show-statistics: how many got through


def _saved(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def test_npz_hostile_archives(hostile):
    def archive(members: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> bytes:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", compression=compression) as zf:
            for name, data in members.items():
                zf.writestr(name, data)
        return buf.getvalue()

    cases = [
        archive({"x.npy": b"\0" * (4 << 20)}, zipfile.ZIP_DEFLATED),  # bomb: 4 MB declared > 1 MB limit
        archive({"x.npy": _saved(np.arange(3.0)), "../evil.npy": _saved(np.arange(3.0))}),
        archive({"x.npy": b"not npy"}),
        archive({"x.npy": _saved(np.array([object()], dtype=object)) if False else npy_with("(1,)", "|O", b"\0" * 8)}),
        archive({}),
        archive({"x.npy": _saved(np.arange(3.0)), "x": _saved(np.arange(3.0))}),
    ]
    for body in cases:
        response = hostile.post("/v1/functions/sin/jacobian", content=body, headers={"content-type": wire.NPZ})
        assert_handled(response)
        assert 400 <= response.status_code < 500
    ok = hostile.post("/v1/functions/sin/jacobian", json={"inputs": [[1.0]]})
    assert ok.status_code == 200


@pytest.mark.parametrize(
    "payload",
    [
        b"[" * 100_000 + b"]" * 100_000,
        b'{"inputs": [' + b"[" * 500 + b"1" + b"]" * 500 + b"]}",
        '{"inputs": [[1]], "argnums": "\u00e9\u6f22\ud83d\ude00"}'.encode("utf-8", "surrogatepass"),
        '{"inputs": {"\u00e9": [1.0]}}'.encode(),
        b'{"inputs": [[1e999]]}',
        b'{"inputs": [{"dtype": "float32", "shape": [9223372036854775807, 9223372036854775807], "base64": ""}]}',
        b'{"inputs": [{"dtype": "float32", "shape": [99999999999999999999999], "data": []}]}',
        b'{"inputs": [[1.0]], "chunk_size": 99999999999999999999999999}',
        b'{"inputs": [[1.0]], "chunk_size": 9223372036854775807}',
    ],
)
def test_hostile_json_edge_cases(hostile, payload):
    response = hostile.post("/v1/functions/sin/jacobian", content=payload, headers={"content-type": wire.JSON})
    assert_handled(response)
    assert hostile.get("/healthz").status_code == 200
