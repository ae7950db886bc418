"""Every error answers problem+json with its exact status and code, and nothing else breaks."""

from __future__ import annotations

import io
import json
import pickle
import zipfile

import numpy as np
import pytest
import torch

from jacobian_client import wire

from .conftest import assert_problem, decode, npy_bytes, npz_bytes

URL = "/v1/functions/sin/jacobian"


def still_serving(client) -> None:
    got, _ = decode(client.post(URL, json={"inputs": [[0.0, 1.0]]}))
    np.testing.assert_allclose(np.diag(got), np.cos([0.0, 1.0]), rtol=1e-6)


@pytest.mark.parametrize(
    "body, content_type",
    [
        (b"{not json", wire.JSON),
        (b"", wire.JSON),
        (b"\xff\xfe", wire.JSON),
        (b"\x93NUMPY\x01\x00garbage", wire.NPY),
        (npy_bytes(np.arange(10.0))[:-8], wire.NPY),  # truncated data
        (npy_bytes(np.arange(10.0))[:20], wire.NPY),  # truncated header
        (npy_bytes(np.arange(3.0)) + b"extra", wire.NPY),
        (b"PK\x03\x04 not a zip", wire.NPZ),
        (npz_bytes(x=np.arange(3.0))[:-30], wire.NPZ),
    ],
)
def test_malformed_bodies_are_400(client, body, content_type):
    assert_problem(client.post(URL, content=body, headers={"content-type": content_type}), 400, "malformed_body")
    still_serving(client)


def test_pickles_are_refused(client):
    obj = np.array([{"a": 1}, None], dtype=object)
    buf = io.BytesIO()
    np.save(buf, obj, allow_pickle=True)
    assert_problem(client.post(URL, content=buf.getvalue(), headers={"content-type": wire.NPY}), 400, "malformed_body")
    raw = pickle.dumps(np.arange(3.0))
    assert_problem(client.post(URL, content=raw, headers={"content-type": wire.NPY}), 400, "malformed_body")
    still_serving(client)


def test_unknown_function_lists_close_names(client):
    body = assert_problem(client.post("/v1/functions/sine/jacobian", json={"inputs": [[1.0]]}), 404, "function_not_found")
    assert "'sin'" in body["detail"]
    assert_problem(client.get("/v1/functions/nope"), 404, "function_not_found")
    assert_problem(client.get("/nowhere"), 404, "not_found")
    # The address `serve` prints, opened in a browser: the 404 says where the API and its docs are.
    root = assert_problem(client.get("/"), 404, "not_found")["detail"]
    assert root == "no route for GET /; the API is under /v1/functions, its interactive docs at /docs"
    assert_problem(client.delete(URL), 405, "method_not_allowed")
    # a name of 30,000 characters is quoted back cut short, not whole
    body = assert_problem(client.post("/v1/functions/" + "x" * 30_000 + "/jacobian", json={"inputs": [[1.0]]}),
                          404, "function_not_found")
    assert len(body["detail"]) < 300 and "30000 characters" in body["detail"]


def test_an_unreadable_npy_header_names_no_memory_address(client):
    header = b"{'descr': '<f4', 'fortran_order': False, 'shape': f(3,), }"
    header += b" " * (63 - 10 - len(header)) + b"\n"
    body = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + bytes(12)
    problem = assert_problem(client.post(URL, content=body, headers={"content-type": wire.NPY}), 400, "malformed_body")
    assert "unreadable .npy header" in problem["detail"] and "0x" not in problem["detail"], problem["detail"]


@pytest.mark.parametrize(
    "url, accept",
    [
        (URL, "text/html"),
        ("/v1/functions/sin_aux/jacobian", wire.NPY),  # aux: known before compute
        ("/v1/functions/polar/jacobian", wire.NPY),  # a tuple of outputs: known after the forward pass
    ],
)
def test_not_acceptable(client, url, accept):
    inputs = [[1.0, 2.0]] * (2 if "polar" in url else 1)
    body = assert_problem(client.post(url, json={"inputs": inputs}, headers={"accept": accept}), 406, "not_acceptable")
    if accept == wire.NPY:
        assert wire.NPZ in body["detail"]


def test_accept_falls_back_by_preference(client):
    response = client.post("/v1/functions/polar/jacobian", json={"inputs": [[1.0], [2.0]]}, headers={"accept": f"{wire.NPY}, {wire.NPZ};q=0.5"})
    assert response.status_code == 200 and response.headers["content-type"] == wire.NPZ


@pytest.mark.parametrize("accept, chosen", [
    (f"{wire.JSON};q=0.5, {wire.NPZ};q=nan, {wire.NPY};q=0.9", wire.NPY),  # a NaN weight broke the order
    (f"{wire.NPZ};q=nan, {wire.JSON};q=0.5, {wire.NPY};q=0.9", wire.NPY),
    (f"{wire.NPZ};q=2, {wire.NPY};q=0.9", wire.NPY),  # out of 0..1: left out, as unreadable ones are
    (f"{wire.NPZ};q=inf, {wire.NPY};q=1e9, {wire.JSON};q=0.25", wire.JSON),
    (f"{wire.NPY};q=1.000, {wire.JSON};q=0.999", wire.NPY),
    # Java's HttpURLConnection sends this when no Accept is set ("q=.2": refused as 406
    # when the weights were read to the letter of RFC 9110)
    ("text/html, image/gif, image/jpeg, *; q=.2, */*; q=.2", wire.JSON),
    (f"{wire.NPY};q=0.5000, {wire.JSON};q=.25", wire.NPY),
])
def test_accept_weights_between_0_and_1_rank_the_media_types(client, accept, chosen):
    r = client.post(URL, json={"inputs": [[1.0, 2.0]]}, headers={"accept": accept})
    assert r.status_code == 200 and r.headers["content-type"] == chosen


@pytest.mark.parametrize("url", [URL, "/v1/functions/softmax/sparsity?shapes=3"])
def test_accept_headers_given_twice_are_one_list(client, url):
    """RFC 9110 5.3: a list header may come in several lines; only the first was read
    (``text/html`` then JSON was a 406; a weighted JSON then .npz took JSON)."""
    get = client.get if "sparsity" in url else lambda u, **kw: client.post(u, json={"inputs": [[1.0, 2.0]]}, **kw)
    r = get(url, headers=[("accept", "text/html"), ("accept", wire.JSON)])
    assert r.status_code == 200 and r.headers["content-type"] == wire.JSON
    r = get(url, headers=[("accept", f"{wire.JSON};q=0.1"), ("accept", wire.NPZ)])
    assert r.status_code == 200 and r.headers["content-type"] == wire.NPZ


def test_unsupported_media_type(client):
    assert_problem(client.post(URL, content=b"x=1", headers={"content-type": "application/x-www-form-urlencoded"}), 415, "unsupported_media_type")


def test_payload_and_result_limits(make_client):
    c = make_client(max_request_bytes=1000, max_result_bytes=4096, stream_threshold_bytes=0)
    big = {"inputs": [list(np.linspace(0, 1, 500))]}
    assert_problem(c.post(URL, json=big), 413, "payload_too_large")
    # 40 x 40 float32 = 6400 bytes: too large gathered as JSON ...
    body = assert_problem(c.post(URL, json={"inputs": [[0.5] * 40]}), 413, "result_too_large")
    assert "application/x-npy" in body["detail"]
    # ... but fine streamed as .npy
    response = c.post(URL, content=npy_bytes(np.full(40, 0.5, np.float32)), headers={"content-type": wire.NPY, "accept": wire.NPY})
    got, _ = decode(response)
    np.testing.assert_allclose(got, np.diag(np.cos(np.full(40, 0.5))), rtol=1e-6)
    still_serving(c)



@pytest.mark.parametrize("mode", [None, "rev", "auto"])
def test_a_npy_jacobian_between_the_result_limit_and_the_stream_threshold_streams(make_client, mode):
    """A streamed .npy is not held to MAX_RESULT_BYTES, but one under the stream threshold
    (8 MiB) was gathered and then held to it: with a 4 KiB limit, a 40 x 40 softmax
    Jacobian (6,400 bytes) as .npy was a 413 while a 2,000 x 2,000 one (16 MB) streamed
    (and with mode=auto that one was a 413 too: auto gathered). Each now streams."""
    c = make_client(max_result_bytes=4096)
    x = np.linspace(0.1, 1.0, 40, dtype=np.float32)
    query = f"?mode={mode}" if mode else ""
    response = c.post(f"/v1/functions/softmax/jacobian{query}", content=npy_bytes(x),
                      headers={"content-type": wire.NPY, "accept": wire.NPY})
    got, _ = decode(response)
    want = torch.func.jacrev(torch.softmax, argnums=0)(torch.from_numpy(x), 0).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    if mode == "auto":  # the larger one too
        big = np.linspace(0.1, 1.0, 1500, dtype=np.float32)
        response = c.post("/v1/functions/softmax/jacobian?mode=auto", content=npy_bytes(big),
                          headers={"content-type": wire.NPY, "accept": wire.NPY})
        assert response.status_code == 200 and np.load(io.BytesIO(response.content)).shape == (1500, 1500)
    # as JSON it is gathered, and refused
    assert_problem(c.post(f"/v1/functions/softmax/jacobian{query}", json={"inputs": [x.tolist()]}), 413,
                   "result_too_large")
    still_serving(c)


@pytest.mark.parametrize(("path", "body", "remedy"), [
    ("hessian", {}, "a sparse Hessian (sparsity=auto)"),
    ("evaluate", {}, "fewer examples or a smaller input"),
    ("vjp", {"cotangents": [0.5] * 40}, "fewer vectors or a smaller input"),
    ("jvp", {"tangents": [0.5] * 40}, "fewer vectors or a smaller input"),
    ("jacobian", {"inputs": [[[0.5] * 40]], "batched": True}, "fewer examples or a smaller input"),
])
def test_a_result_over_the_limit_says_what_to_ask_for_instead(make_client, path, body, remedy):
    """Every 413 said "Ask for application/x-npy (streamed)", but only a Jacobian streams:
    a Hessian, an evaluation, the vector products and per-example results asked for as
    .npy were refused with the same advice. Each kind now says what would fit."""
    c = make_client(max_result_bytes=64)
    r = c.post(f"/v1/functions/sin/{path}", json={"inputs": [[0.5] * 40], **body},
               headers={"accept": wire.NPY if path != "hessian" else wire.JSON})
    detail = assert_problem(r, 413, "result_too_large")["detail"]
    assert remedy in detail and "x-npy" not in detail and "stream" not in detail, detail
    still_serving(c)

def test_npz_of_numpys_positional_names_says_how_to_name_the_members(client):
    """``np.savez(f, r, theta)``, a new user's first .npz, writes members ``arr_0`` and
    ``arr_1``: the 422 said only "missing input 'r'", never what was sent instead. It now
    names the members it could not place and, for numpy's positional names, how to name
    them (by parameter or by position); JSON objects get the unknown names too."""
    r, theta = np.array([1.0, 2.0]), np.array([0.1, 0.2])
    buf = io.BytesIO()
    np.savez(buf, r, theta)
    response = client.post("/v1/functions/polar/jacobian", content=buf.getvalue(), headers={"content-type": wire.NPZ})
    detail = assert_problem(response, 422, "invalid_input")["detail"]
    assert "missing input 'r'; polar takes ['r', 'theta']; unknown ['arr_0', 'arr_1']" in detail
    assert "numpy.savez(f, x=a, ...)" in detail and "numpy.savez(f, **{'0': a, '1': b})" in detail
    json_body = {"inputs": {"x": [1.0], "z": [2.0]}}
    detail = assert_problem(client.post("/v1/functions/add_square/jacobian", json=json_body), 422, "invalid_input")["detail"]
    assert detail == "missing input 'y'; add_square takes ['x', 'y']; unknown ['z']"
    # Named as the detail says, the same arrays are answered.
    got, _ = decode(client.post("/v1/functions/polar/jacobian", content=npz_bytes(**{"0": r, "1": theta}),
                                headers={"content-type": wire.NPZ, "accept": wire.NPZ}))
    np.testing.assert_allclose(got[0], np.diag(np.cos(theta)), rtol=1e-6)


def test_npz_declared_size_checked_before_expanding(make_client):
    c = make_client(max_request_bytes=100_000)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("x.npy", npy_bytes(np.zeros(1_000_000)))  # 8 MB that deflates to ~8 kB
    assert len(buf.getvalue()) < 100_000
    assert_problem(c.post(URL, content=buf.getvalue(), headers={"content-type": wire.NPZ}), 413, "payload_too_large")
    members = npz_bytes(**{f"m{i}": np.zeros(1) for i in range(100)})
    assert_problem(c.post(URL, content=members, headers={"content-type": wire.NPZ}), 413, "payload_too_large")


@pytest.mark.parametrize(
    "url, body, words",
    [
        (URL, {"inputs": [[1.0], [2.0]]}, "takes 1 input ['x'], got"),
        (URL, {"inputs": []}, "takes 1 input ['x'], got"),
        (URL, {}, "no 'inputs'"),
        (URL, [1, 2], "JSON object"),
        (URL, {"inputs": [[[1.0, 2.0]]]}, "expected shape (n,)"),
        ("/v1/functions/add_square/jacobian", {"inputs": [[1.0, 2.0], [1.0]]}, "n = 2"),
        ("/v1/functions/mlp/jacobian", {"inputs": [[1.0] * 127]}, "expected shape (128,)"),
        (URL, {"inputs": [[1.0]], "argnums": 1}, "out of range"),
        (URL, {"inputs": [[1.0]], "argnums": "y"}, "not a parameter"),
        ("/v1/functions/add_square/jacobian", {"inputs": [[1.0], [1.0]], "argnums": [0, 0]}, "duplicates"),
        (URL, {"inputs": [[1.0]], "argnums": []}, "empty"),
        (URL, {"inputs": [[1.0]], "argnums": 1.5}, "argnums"),
        (URL, {"inputs": [[1.0]], "chunk_size": 0}, "chunk_size"),
        (URL, {"inputs": [[1.0]], "chunk_size": -3}, "chunk_size"),
        (URL, {"inputs": [[1.0]], "mode": "sideways"}, "mode"),
        (URL, {"inputs": [[1.0]], "colour": "red"}, "colour"),
        (URL, {"inputs": [[1.0, 2.0]], "rows": [1, 5]}, "out of range"),
        (URL, {"inputs": [[1.0, 2.0]], "rows": [2, 1]}, "start <= stop"),
        (URL, {"inputs": [["a", "b"]]}, "numbers"),
        (URL, {"inputs": [[[1.0], [2.0, 3.0]]]}, "regular array"),
        (URL, {"inputs": [{"dtype": "complex128", "shape": [1], "data": [1]}]}, "unsupported dtype complex128 here"),
        (URL, {"inputs": [{"dtype": "float32", "shape": [3], "data": [1, 2]}]}, "shape [3] needs 3"),
        (URL, {"inputs": [{"dtype": "float32", "shape": [-1], "data": []}]}, "negative"),
        (URL, {"inputs": [{"dtype": "float32", "shape": [2], "base64": "!!"}]}, "base64"),
        (URL, {"inputs": [[1.0, 2.0]], "batched": True}, "expected shape (n,)"),
        ("/v1/functions/add_square/jacobian", {"inputs": [[[1.0]], [[1.0], [2.0]]], "batched": True}, "batch size"),
        ("/v1/functions/mlp/jacobian", {"inputs": [{"dtype": "float64", "shape": [128], "data": [0] * 128}], "batched": "maybe"}, "batched"),
        ("/v1/functions/sin/vjp", {"inputs": [[1.0]]}, "cotangents"),
        ("/v1/functions/sum_sin/hvp", {"inputs": [[1.0]]}, "tangents"),
        ("/v1/functions/sin/hvp", {"inputs": [[1.0, 2.0]], "tangents": [1.0, 1.0]}, "scalar (0-d) output"),
        ("/v1/functions/sum_sin/hvp", {"inputs": [[1.0]], "tangents": [1.0], "batched": True}, "batched_vectors"),
        ("/v1/functions/sum_sin/jacobian", {"inputs": [[1.0]], "batched_vectors": True}, "vjp, jvp and hvp"),
    ],
)
def test_invalid_input_is_422(client, url, body, words):
    detail = assert_problem(client.post(url, json=body), 422, "invalid_input")["detail"]
    assert words in detail


HVP = "/v1/functions/sum_sin/hvp"


@pytest.mark.parametrize(
    "url, body, words",
    [
        # non-scalar functions: a vector output, a tuple output, a vector with aux
        ("/v1/functions/planar_arm/hvp", {"inputs": [[0.1, 0.2, 0.3]], "tangents": [1.0, 0.0, 0.0]}, "scalar (0-d) output"),
        ("/v1/functions/polar/hvp", {"inputs": [[1.0], [0.5]], "tangents": [[1.0], [0.0]]}, "scalar (0-d) output"),
        ("/v1/functions/sin_aux/hvp", {"inputs": [[1.0, 2.0]], "tangents": [1.0, 0.0]}, "scalar (0-d) output"),
        # tangents of the wrong shape: too long, an extra axis, batched_vectors without the batch axis,
        # a batch axis without batched_vectors, and batches of different sizes across inputs
        (HVP, {"inputs": [[1.0, 2.0]], "tangents": [1.0, 0.0, 3.0]}, "tangents: expected shape [2], got [3]"),
        (HVP, {"inputs": [[1.0, 2.0]], "tangents": [[1.0, 0.0]]}, "tangents: expected shape [2], got [1, 2]"),
        (HVP, {"inputs": [[1.0, 2.0]], "tangents": [1.0, 0.0], "batched_vectors": True}, "tangents: expected shape ['B', 2], got [2]"),
        (HVP, {"inputs": [[1.0, 2.0]], "tangents": [[1.0, 0.0], [0.0, 1.0]]}, "tangents: expected shape [2], got [2, 2]"),
        ("/v1/functions/rosenbrock/hvp", {"inputs": [[1.0, 2.0]], "tangents": 1.0}, "tangents: expected shape [2], got []"),
        # wrong dtypes: tangents that are not real numbers, a dtype the wire does not know,
        # and a derivative with respect to an integer input
        (HVP, {"inputs": [[1.0, 2.0]], "tangents": ["a", "b"]}, "string 'a'"),
        (HVP, {"inputs": [[1.0, 2.0]], "tangents": {"dtype": "complex128", "shape": [2], "data": [1, 0]}}, "unsupported dtype complex128 here"),
        ("/v1/functions/scaled_norm/hvp", {"inputs": [[[1.0, 2.0, 3.0]], 2.0, 2], "tangents": 1, "argnums": "power"},
         "input 'power' is int64; only floating inputs can be differentiated"),
        # options that do not apply
        (HVP, {"inputs": [[1.0, 2.0]], "tangents": [1.0, 0.0], "rows": [0, 1]}, "rows"),
    ],
)
def test_bad_hvp_requests_are_422(client, url, body, words):
    detail = assert_problem(client.post(url, json=body), 422, "invalid_input")["detail"]
    assert words in detail, detail


def test_bad_hvp_binary_requests(client):
    """The same refusals for an .npz body (the tangents as a member) and an .npy body."""
    def post(**members):
        return client.post(HVP, content=npz_bytes(**members), headers={"content-type": wire.NPZ, "accept": wire.JSON})

    x = np.array([1.0, 2.0])
    detail = assert_problem(post(x=x, tangents=np.array([1.0, 0.0, 2.0])), 422, "invalid_input")["detail"]
    assert "tangents: expected shape [2], got [3]" in detail
    detail = assert_problem(post(x=x, tangents=np.array([1 + 0j, 0])), 422, "invalid_input")["detail"]
    assert "unsupported dtype complex128" in detail
    detail = assert_problem(post(x=x), 422, "invalid_input")["detail"]
    assert "tangents" in detail
    npy = client.post(HVP, content=npy_bytes(x), headers={"content-type": wire.NPY})
    assert "send application/x-npz" in assert_problem(npy, 422, "invalid_input")["detail"]
    # integer and bool tangents are what torch.func.jvp refuses ("Expected tangent to be
    # floating point or complex"), and jvp(grad(f)) with it: refused (they were cast)
    for tangents in (np.array([1, 0]), np.array([True, False])):
        detail = assert_problem(post(x=x, tangents=tangents), 422, "invalid_input")["detail"]
        assert "Expected tangent to be floating point" in detail
    ok, _ = decode(post(x=x, tangents=np.array([1.0, 0.0])), "hvp")
    np.testing.assert_allclose(ok, [-np.sin(1.0), 0.0], rtol=1e-12)
    still_serving(client)


def test_wrong_dtypes(client):
    # int64 input declared: a float is no same_kind cast
    body = {"inputs": [[[1.0, 2.0, 3.0]], 2.0, {"dtype": "float64", "shape": [], "data": 2.0}]}
    detail = assert_problem(client.post("/v1/functions/scaled_norm/jacobian", json=body), 422, "invalid_input")["detail"]
    assert "power" in detail and "int64" in detail
    # non-float input to differentiate
    body = {"inputs": [[[1.0, 2.0, 3.0]], 2.0, 2], "argnums": "power"}
    detail = assert_problem(client.post("/v1/functions/scaled_norm/jacobian", json=body), 422, "invalid_input")["detail"]
    assert "only floating inputs" in detail
    # mlp is float32: float64 casts (same_kind), int casts to float, bool does not
    ok = client.post("/v1/functions/mlp/jacobian", content=npy_bytes(np.zeros(128, np.int64)), headers={"content-type": wire.NPY, "accept": wire.JSON})
    assert ok.status_code == 200 and ok.json()["jacobian"]["dtype"] == "float32"


def test_function_errors_are_500_for_that_request_only(client):
    body = assert_problem(client.post("/v1/functions/broken/jacobian", json={"inputs": [[1.0]]}), 500, "function_error")
    assert body["detail"] == "ValueError: the simulator diverged"
    body = assert_problem(client.post("/v1/functions/wrong_type/evaluate", json={"inputs": [[1.0]]}), 500, "function_error")
    assert body["detail"].startswith("the output is a str, not a tensor")
    for endpoint in ("jacobian", "hessian", "evaluate", "vjp", "jvp", "hvp"):
        payload = {"inputs": [[1.0]], "cotangents": [1.0], "tangents": [1.0]}
        payload = {k: v for k, v in payload.items() if k == "inputs" or (k == "cotangents") == (endpoint == "vjp") and (k == "tangents") == (endpoint in ("jvp", "hvp"))}
        assert_problem(client.post(f"/v1/functions/broken/{endpoint}", json=payload), 500, "function_error")
    still_serving(client)


def test_an_error_whose_message_cannot_be_made_is_still_the_functions_error(client):
    """The error's ``__str__`` raises (user code too): describing it used to fail the
    request as our 500 ``internal_error``, not the function's."""
    x = {"inputs": [[1.0, 2.0, 3.0]]}
    for path in ("jacobian", "jacobian?sparsity=auto", "evaluate", "hessian"):
        body = assert_problem(client.post(f"/v1/functions/raises_unprintable/{path}", json=x), 500, "function_error")
        assert body["detail"].startswith("_UnprintableError: "), (path, body)
    npy = client.post("/v1/functions/raises_unprintable/jacobian", content=npy_bytes(np.ones(3, np.float32)),
                      headers={"content-type": wire.NPY, "accept": wire.NPY})
    assert_problem(npy, 500, "function_error")
    still_serving(client)


def test_request_id_is_echoed_or_made(client):
    response = client.get("/healthz", headers={"x-request-id": "abc-123"})
    assert response.headers["x-request-id"] == "abc-123"
    made = client.get("/healthz").headers["x-request-id"]
    assert len(made) == 32
    body = client.post("/v1/functions/nope/jacobian", json={"inputs": []}, headers={"x-request-id": "r-9"}).json()
    assert body["request_id"] == "r-9"


def test_auth(make_client):
    c = make_client(api_keys="k1, k2")
    assert c.get("/healthz").status_code == 200
    assert c.get("/readyz").status_code == 200
    assert_problem(c.get("/v1/functions"), 401, "unauthorized")
    assert_problem(c.post(URL, json={"inputs": [[1.0]]}), 401, "unauthorized")
    assert_problem(c.get("/v1/functions", headers={"authorization": "Bearer nope"}), 403, "forbidden")
    assert_problem(c.get("/v1/functions", headers={"authorization": "Basic k1"}), 401, "unauthorized")
    assert c.get("/v1/functions", headers={"authorization": "Bearer k2"}).status_code == 200
    assert c.post(URL, json={"inputs": [[1.0]]}, headers={"authorization": "Bearer k1"}).status_code == 200
    # /metrics names every function and its traffic: behind the key by default (it was
    # open to anyone who reached the port, keys or not), any API key reads it
    assert_problem(c.get("/metrics"), 401, "unauthorized")
    assert_problem(c.get("/metrics", headers={"authorization": "Bearer nope"}), 403, "forbidden")
    assert "jacobian_service_requests_total" in c.get("/metrics", headers={"authorization": "Bearer k2"}).text


def test_metrics_auth_is_configurable(make_client):
    c = make_client(api_keys="k1", metrics_auth="false")  # the operator opens it (a scraper's own network)
    assert c.get("/metrics").status_code == 200
    assert_problem(c.get("/v1/functions"), 401, "unauthorized")  # (only it)
    c = make_client(api_keys="", metrics_auth="true")  # without keys there is nothing to check: open
    assert c.get("/metrics").status_code == 200


@pytest.mark.parametrize("options", [
    {"chunk_size": True}, {"chunk_size": "2"}, {"chunk_size": 1.0}, {"batched": "yes"}, {"batched": 1},
    {"return_output": "on"}, {"return_output": "1"}, {"rows": [True, False]}, {"rows": ["0", "1"]},
])
def test_json_options_take_json_types_only(client, options):
    """Found by a red team: true was a chunk size of 1 and "yes" a boolean."""
    body = assert_problem(client.post(URL, json={"inputs": [[1.0, 2.0]], **options}), 422, "invalid_input")
    assert next(iter(options)) in body["detail"]


@pytest.mark.parametrize("query, status", [
    ("?return_output=true&chunk_size=1", 200), ("?return_output=on", 200), ("?return_output=0", 200),
    ("?return_output=maybe", 422), ("?chunk_size=1.5", 422),
])
def test_query_options_read_their_words(client, query, status):
    r = client.post(URL + query, content=npy_bytes(np.array([1.0, 2.0], np.float32)),
                    headers={"content-type": wire.NPY, "accept": wire.NPZ})
    assert r.status_code == status, r.text


def test_a_compressed_body_is_415_not_garbage(client):
    import gzip

    body = gzip.compress(b'{"inputs": [[1.0, 2.0]]}')
    problem = assert_problem(client.post(URL, content=body, headers={"content-type": wire.JSON, "content-encoding": "gzip"}),
                             415, "unsupported_media_type")
    assert "gzip" in problem["detail"]
    r = client.post(URL, json={"inputs": [[1.0, 2.0]]}, headers={"content-encoding": "identity"})
    assert r.status_code == 200
    # every Content-Encoding line counts, not the first alone (a second red team)
    two = [("content-type", wire.JSON), ("content-encoding", "identity"), ("content-encoding", "gzip")]
    assert_problem(client.post(URL, content=body, headers=two), 415, "unsupported_media_type")


def test_a_query_option_given_twice_is_422(client):
    body = npy_bytes(np.array([1.0, 2.0], np.float32))
    problem = assert_problem(client.post(URL + "?argnums=0&chunk_size=1&argnums=1", content=body,
                                         headers={"content-type": wire.NPY}), 422, "invalid_input")
    assert "'argnums'" in problem["detail"] and "chunk_size" not in problem["detail"]
    assert_problem(client.get("/v1/functions/sin/sparsity?shapes=3&shapes=4"), 422, "invalid_input")


@pytest.mark.parametrize("dtype", ["longdouble", "float128"])
def test_an_npy_of_a_dtype_json_refuses_is_refused_too(client, dtype):
    """Found by a red team: a float128 .npy was cast to float32 and answered, where JSON's
    "dtype": "float128" is a 422."""
    if not hasattr(np, dtype) or np.dtype(dtype).itemsize <= 8:
        pytest.skip(f"no wide {dtype} here")
    body = npy_bytes(np.array([1.0, 2.0], dtype=dtype))
    detail = assert_problem(client.post(URL, content=body, headers={"content-type": wire.NPY}), 422, "invalid_input")["detail"]
    assert "unsupported dtype" in detail and "float64" in detail
    json_body = {"inputs": [{"dtype": "float128", "shape": [2], "data": [1, 2]}]}
    assert_problem(client.post(URL, json=json_body), 422, "invalid_input")


def test_a_body_that_could_never_fit_the_budget_is_413_not_503(make_client):
    """Found by a second red team: a JSON body whose parse cost, or an .npz whose body and
    expansion together, exceed the whole body budget got 503 "retry shortly" with nothing
    else in flight, and the SDK retried in vain."""
    from jacobian_service.connections import json_parse_cost

    c = make_client(max_request_bytes=1 << 20, body_budget_bytes=1 << 20)
    numbers = {"inputs": [[0.123456789012345] * 50_000]}  # ~0.95 MB of text: its parse cost is several MB
    body = json.dumps(numbers).encode()
    assert len(body) < 1 << 20 < json_parse_cost(body)
    problem = assert_problem(c.post(URL, content=body, headers={"content-type": wire.JSON}), 413, "payload_too_large")
    assert "request memory" in problem["detail"]
    stored = npz_bytes(x=np.zeros(70_000))  # 560 KB stored: body + expansion > 1 MiB
    problem = assert_problem(c.post(URL, content=stored, headers={"content-type": wire.NPZ}), 413, "payload_too_large")
    assert "needs both at once" in problem["detail"]
    still_serving(c)


@pytest.mark.parametrize("body, query", [
    ({"inputs": [[1.0]], "argnums": [0] * 300_000}, ""),  # duplicates, quoted back whole
    ({"inputs": [[1.0]], "argnums": [{"k": "v" * 300_000}]}, ""),  # a wrong type, repr'd whole
    ({"inputs": [[1.0]], "argnums": "y" * 300_000}, ""),  # an unknown name
    ({"inputs": {f"k{i}" * 50: [1.0] for i in range(5000)}}, ""),  # unknown input keys
    ({"inputs": [[1.0]]}, "?" + "&".join(["a"] * 15_000)),  # options given twice (was quadratic: seconds)
])
def test_no_refusal_quotes_a_request_back_at_its_own_size(client, body, query):
    """Found by a red team: details quoted what was sent (a 3 MB argnums list came back in
    a 3 MB 422). Every detail is cut at 2,000 characters, saying how much was cut."""
    import time

    started = time.monotonic()
    r = client.post(f"/v1/functions/sin/jacobian{query}", json=body)
    assert time.monotonic() - started < 5
    assert_problem(r, 422, "invalid_input")
    assert len(r.json()["detail"]) < 2100
    assert len(r.content) < 3000


def test_rows_past_int64_are_422_not_500(client):
    """They could not travel to the engine (orjson refuses such integers): a 500 and a
    logged traceback in the process layout."""
    for query in ("rows=0,99999999999999999999999", "rows=-99999999999999999999999,2"):
        r = client.post(f"/v1/functions/sin/jacobian?{query}", content=npy_bytes(np.ones(3, np.float32)),
                        headers={"content-type": wire.NPY})
        assert_problem(r, 422, "invalid_input")
        assert "rows" in r.json()["detail"]


def test_an_unknown_docs_asset_is_not_quoted_whole(client):
    r = client.get("/docs-assets/" + "a" * 30_000)
    assert_problem(r, 404, "not_found")
    assert len(r.content) < 600
