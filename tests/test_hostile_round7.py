"""Red team, round seven: hostile clients and the limits, on a real server.

One server for the module (a start costs ~3 s); the protocol cases run a real uvicorn
with the service's protocol class on a thread (no server start). Each case names what a
user saw before.
"""

from __future__ import annotations

import io
import subprocess
import time
import zipfile
from typing import Iterator

import httpx
import numpy as np
import pytest
from numpy.lib import format as npy_format

from jacobian_client import wire

from .conftest import assert_problem, live_server
from .test_connections import _connect

X = [0.5, 1.0, 2.0]


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, subprocess.Popen]]:
    # A body budget of 64 MiB: the stream budget (its size) holds three 17.6 MB streams
    with live_server(WORKERS=1, ENGINE_STANDBY="false", BODY_BUDGET_BYTES=64 << 20,
                     TRUSTED_PROXIES="127.0.0.1") as served:  # (clients told apart: X-Forwarded-For)
        yield served


def _post(url: str, path: str, **kw) -> httpx.Response:
    return httpx.post(f"{url}{path}", timeout=60, **kw)


def _npy_head(shape: tuple[int, ...], descr: str = "<f4") -> bytes:
    """An .npy body of no elements: its header alone."""
    buf = io.BytesIO()
    npy_format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def _request(path: str, body: bytes, content_type: str = "application/json") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


# ------------------------------------------------------------ shapes of no elements


@pytest.mark.parametrize("form", ["npy", "json", "npz"])
def test_a_shape_of_no_elements_is_not_over_the_element_limit(server, form: str) -> None:
    """A (0, 2^30) array holds nothing: it was a 413 'shape [0, 1073741824] is over the
    limit of 268435456 elements' (.npy, JSON array objects, .npz members alike). Its
    sizes are still held to the limit (derivatives multiply shapes: a Hessian of a
    (0, 2^28) input is (0, 2^28, 0, 2^28, 0, 2^28), which no array can index), so it is a
    422 that says so; an array that does hold too many elements keeps its 413."""
    url, _ = server
    shape = (0, 1 << 30)
    if form == "npy":
        r = _post(url, "/v1/functions/reaction_diffusion/jacobian", content=_npy_head(shape),
                  headers={"content-type": wire.NPY})
    elif form == "json":
        r = _post(url, "/v1/functions/reaction_diffusion/jacobian",
                  json={"inputs": [{"dtype": "float32", "shape": list(shape), "data": []}]})
    else:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            zf.writestr("u.npy", _npy_head(shape))
        r = _post(url, "/v1/functions/reaction_diffusion/jacobian", content=buf.getvalue(),
                  headers={"content-type": wire.NPZ})
    problem = assert_problem(r, 422, "invalid_input")
    assert "holds no elements" in problem["detail"] and "268435456" in problem["detail"], problem
    # an array of as many elements as that shape spans is over the limit: 413, as before
    problem = assert_problem(_post(url, "/v1/functions/reaction_diffusion/jacobian", content=_npy_head((1 << 15, 1 << 15)),
                                   headers={"content-type": wire.NPY}), 413, "payload_too_large")
    assert "over the limit of 268435456 elements" in problem["detail"]


def test_a_hessian_of_no_elements_that_no_array_can_index_is_a_413_not_the_functions_500(server) -> None:
    """A (0, 2^28) input is within every limit, but its Hessian's shape (0, 2^28, 0,
    2^28, 0, 2^28) cannot be strided: it was torch's 'RuntimeError: Stride calculation
    overflowed', a 500 function_error blamed on the function (so from (0, 2^22) on). It
    is now a 413 result_too_large before any derivative, and a smaller one is answered,
    empty."""
    url, _ = server
    npy = {"content-type": wire.NPY}
    problem = assert_problem(_post(url, "/v1/functions/reaction_diffusion/hessian", content=_npy_head((0, 1 << 22)),
                                   headers=npy), 413, "result_too_large")
    assert "2^63" in problem["detail"] and "Stride" not in problem["detail"]
    # per example: two (0, 2^22) examples
    problem = assert_problem(_post(url, "/v1/functions/reaction_diffusion/hessian?batched=true",
                                   content=_npy_head((2, 0, 1 << 22)), headers=npy), 413, "result_too_large")
    assert "2^63" in problem["detail"]
    r = _post(url, "/v1/functions/reaction_diffusion/hessian", content=_npy_head((0, 8)), headers=npy)
    assert r.status_code == 200, r.text
    H = r.json()["hessian"]
    assert H["shape"] == [0, 8, 0, 8, 0, 8] and H["data"] == []
    # the service is unharmed: sin's Jacobian is still cos on the diagonal
    r = _post(url, "/v1/functions/sin/jacobian", json={"inputs": [X]})
    np.testing.assert_allclose(r.json()["jacobian"]["data"], np.diag(np.cos(X)), rtol=1e-6)


# ------------------------------------------------------------ wire messages


def _encrypted_npz() -> bytes:
    """An .npz whose member says it is encrypted (general purpose flag bit 0)."""
    buf = io.BytesIO()
    np.save(buf, np.asarray(X, np.float32))
    z = io.BytesIO()
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("x.npy", buf.getvalue())
    body = bytearray(z.getvalue())
    body[6] |= 1  # the local header's flags
    central = body.index(b"PK\x01\x02")
    body[central + 8] |= 1  # the central directory's
    return bytes(body)


def test_an_encrypted_npz_member_is_named_by_its_name_not_a_zipinfo_repr(server) -> None:
    """Its 400 said "File <ZipInfo filename='x.npy' filemode='?rw-------' file_size=140>
    is encrypted, password required for extraction": zipfile's internal object."""
    url, _ = server
    problem = assert_problem(_post(url, "/v1/functions/sin/jacobian", content=_encrypted_npz(),
                                   headers={"content-type": wire.NPZ}), 400, "malformed_body")
    assert problem["detail"] == ".npz member 'x.npy' is encrypted; send the arrays unencrypted, as numpy.savez writes them"
    # and in the SDK's own reader
    with pytest.raises(wire.WireError, match="is encrypted") as info:
        wire.read_npz(_encrypted_npz())
    assert "ZipInfo" not in str(info.value)


def test_zipfile_messages_name_members_by_name() -> None:
    text = wire._zip_text(RuntimeError("File <ZipInfo filename='a b.npy' filemode='?rw-------' file_size=140> is bad"))
    assert text == "File 'a b.npy' is bad"


# ------------------------------------------------------------ limits


@pytest.mark.parametrize("value", ["inf", "nan", "1e309", "-Infinity", "abc", "0", "-1"])
def test_a_request_timeout_that_is_no_deadline_is_refused_naming_it(server, value: str) -> None:
    """'inf', 'nan' and '1e309' (an infinity) were told the header 'must be a positive
    number of seconds'; every refusal now names the value and what the header does."""
    url, _ = server
    problem = assert_problem(_post(url, "/v1/functions/sin/jacobian", json={"inputs": [X]},
                                   headers={"x-request-timeout": value}), 422, "invalid_input")
    assert problem["detail"] == (f"X-Request-Timeout must be a positive, finite number of seconds, not {value!r} "
                                 "(it shortens the server's REQUEST_TIMEOUT_S, 60 s)")
    # a long one only leaves the server's deadline in force
    r = _post(url, "/v1/functions/sin/jacobian", json={"inputs": [X]}, headers={"x-request-timeout": "1e300"})
    np.testing.assert_allclose(r.json()["jacobian"]["data"], np.diag(np.cos(X)), rtol=1e-6)


# ------------------------------------------------------------ slow readers of streams


def _softmax_npy(n: int) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.linspace(0, 1, n, dtype=np.float32))
    return buf.getvalue()


def test_slow_readers_of_streams_hold_no_more_than_the_front_ends_budget(server) -> None:
    """Each client that asks for a streamed Jacobian and reads nothing keeps its chunk
    (and the one asked for ahead) in the front end until SEND_TIMEOUT_S: 120 of them
    (a 2000 x 2000 softmax, 16 MB) grew a front end from 97 MB to 1.9 GB, without bound
    (MAX_QUEUE streams of 32 MiB chunks: 16 GB). Streams now reserve their two chunks
    against a budget the size of BODY_BUDGET_BYTES (measured: 114 MB for the 120); one
    that does not fit now is a 503 with Retry-After, and other requests go on."""
    url, _ = server
    n = 2100  # 17.6 MB: streamed (over STREAM_THRESHOLD_BYTES), held whole (a stream holds at most its bytes)
    body = _softmax_npy(n)
    request = _request("/v1/functions/softmax/jacobian", body, wire.NPY).replace(b"\r\n\r\n", b"\r\nAccept: application/x-npy\r\n\r\n", 1)
    readers = []
    try:
        for i in range(3):  # 53 MB of 64 MiB, three clients (one may hold half the budget)
            s = _connect(url, rcvbuf=4096)
            s.sendall(request.replace(b"\r\n\r\n", b"\r\nX-Forwarded-For: 192.0.2.%d\r\n\r\n" % (i + 1), 1))
            s.settimeout(30)
            assert s.recv(12) == b"HTTP/1.1 200"
            readers.append(s)
        npy = {"content-type": wire.NPY, "accept": wire.NPY}
        problem = assert_problem(_post(url, "/v1/functions/softmax/jacobian", content=body, headers=npy), 503, "unavailable")
        assert "BODY_BUDGET_BYTES" in problem["detail"]
        # JSON streams too
        assert_problem(_post(url, "/v1/functions/softmax/jacobian", content=body, headers={"content-type": wire.NPY}),
                       503, "unavailable")
        # what does not stream is served
        r = _post(url, "/v1/functions/sin/jacobian", json={"inputs": [X]})
        np.testing.assert_allclose(r.json()["jacobian"]["data"], np.diag(np.cos(X)), rtol=1e-6)
    finally:
        for s in readers:
            s.close()
    # the readers gone, their reservations are given back: the stream is served, whole
    _softmax_served_whole(url, body, np.linspace(0, 1, n, dtype=np.float32), npy)


def _softmax_served_whole(url: str, body: bytes, x: np.ndarray, headers: dict[str, str]) -> None:
    """``softmax``'s streamed Jacobian at ``x`` (``body``), once the stream budget has room
    again (its 503s retried for 20 s), equal to softmax's Jacobian on a sample of entries."""
    deadline = time.monotonic() + 20
    while (r := _post(url, "/v1/functions/softmax/jacobian", content=body, headers=headers)).status_code == 503:
        assert time.monotonic() < deadline, r.text
        time.sleep(0.2)
    assert r.status_code == 200, r.text
    J = np.load(io.BytesIO(r.content))
    s = np.exp(x - x.max()) / np.exp(x - x.max()).sum()
    np.testing.assert_allclose(J[::100, ::100], (np.diag(s) - np.outer(s, s))[::100, ::100], rtol=1e-4, atol=1e-7)
