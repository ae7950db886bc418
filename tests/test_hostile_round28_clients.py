"""Red team, round twenty-eight: hostile clients against what the service spends for them
(a gathered answer its front end could not hold for its client, computed whole and
then refused, again at every retry).

Each names what a user saw before. The answer cases run one real server of this module
(two API keys: two clients) whose stream budget is small enough for two slow answers
to fill a client's share.
"""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import threading
import time
from typing import Iterator

import httpx
import numpy as np
import pytest
from jacobian_client import wire

from . import clients28_functions
from ._client_support import real_server
from .conftest import assert_problem
from .test_hostile_round27_clients import _head, _softmax_jacobian

HOSTILE, HONEST = "hostile-key", "honest-key"


@pytest.fixture(scope="module")
def budget_server() -> Iterator[str]:
    """A share of 16 MiB per client: two 7.84 MB answers read slowly fill it."""
    with real_server(functions="jacobian_service.examples,tests.clients28_functions", api_keys=f"{HOSTILE},{HONEST}",
                     body_budget_bytes=32 << 20) as url:
        yield url


def _post(url: str, path: str, body: bytes, key: str, accept: str = wire.JSON, **query: str) -> httpx.Response:
    return httpx.post(url + path, content=body, params=query, timeout=60,
                      headers={"content-type": wire.JSON, "accept": accept, "authorization": f"Bearer {key}"})


# ------------------------------------------------------------ answers refused before they are computed


def _slow_reader(url: str, body: bytes) -> socket.socket:
    """A connection of the hostile key that asked a 7.84 MB softmax Jacobian as JSON (a
    gathered answer, held while sent) and reads next to nothing of it."""
    port = int(url.rsplit(":", 1)[1])
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", port))
    s.sendall(b"POST /v1/functions/softmax/jacobian HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
              b"Authorization: Bearer %s\r\nContent-Length: %d\r\n\r\n" % (HOSTILE.encode(), len(body)) + body)
    status, head = _head(s)
    assert status == 200, head
    return s


# Requests of the hostile key whose gathered answers (each 2 MB or more) pass what is left
# of its share: one per endpoint that computes a derivative, each a tiny body.
_WIDE = np.linspace(-1, 1, 1400).tolist()
_PAST_THE_SHARE = [
    ("/v1/functions/sum_sin/hessian", {"inputs": [_WIDE]}, {}),  # 7.84 MB, never streamed
    ("/v1/functions/softmax/jacobian", {"inputs": [_WIDE]}, {}),  # 7.84 MB as JSON, under the stream threshold
    ("/v1/functions/softmax/jacobian", {"inputs": [np.ones((4, 700)).tolist()], "batched": True}, {}),  # 7.84 MB
    ("/v1/functions/sin/jvp", {"inputs": [_WIDE], "batched_vectors": True, "tangents": {  # 2.24 MB
        "dtype": "float32", "shape": [400, 1400], "base64": base64.b64encode(bytes(2240000)).decode()}}, {}),
    ("/v1/functions/sum_sin/hessian", {"inputs": [_WIDE]}, {"accept": wire.NPZ}),
]


def test_an_answer_past_its_clients_share_is_refused_before_it_is_computed(budget_server: str) -> None:
    """A gathered answer of 1 MiB or more is held on the stream budget, in its client's
    share, while it is sent (round 27); past the share it is a 429. Its size is known
    only from the forward pass, and the refusal came after the whole derivative had
    been computed and encoded: a client keeping its share full (two slow readers) had
    the engine compute a 7.84 MB Hessian (up to MAX_RESULT_BYTES, 512 MB) for every
    tiny request it then retried, at no cost to itself. Now the front end sends the
    room its client has with the request, and the engine refuses a larger answer as soon
    as the forward pass gives its size, in the budget's words, saying so: on every
    endpoint that computes a derivative. The other key is served meanwhile, as torch.func
    computes it; and the hostile key's own Hessian once its connections are gone."""
    url = budget_server
    x = np.linspace(-1, 1, 1400, dtype=np.float32)
    slow = [_slow_reader(url, json.dumps({"inputs": [x.tolist()]}).encode()) for _ in range(2)]
    try:
        for path, doc, how in _PAST_THE_SHARE:
            r = _post(url, path, json.dumps(doc).encode(), HOSTILE, how.get("accept", wire.JSON))
            problem = assert_problem(r, 429, "overloaded")
            assert problem["detail"].startswith("this client holds 2 large answers ("), (path, problem)
            assert problem["detail"].endswith(" (refused by the engine as soon as its size was known, before "
                                              "computing it)"), (path, problem)
            assert r.headers["retry-after"] == "1"
        # the honest key is served beside them, in time
        started = time.monotonic()
        r = _post(url, "/v1/functions/softmax/jacobian", json.dumps({"inputs": [x.tolist()]}).encode(), HONEST, wire.NPY)
        assert r.status_code == 200, r.text[:300]
        assert time.monotonic() - started < 20
        np.testing.assert_allclose(np.load(io.BytesIO(r.content)), _softmax_jacobian(x), rtol=1e-5, atol=1e-7)
    finally:
        for s in slow:
            s.close()
    deadline = time.monotonic() + 20  # (each slow answer's room comes back as its send fails)
    while (r := _post(url, "/v1/functions/sum_sin/hessian", json.dumps({"inputs": [x.tolist()]}).encode(), HOSTILE,
                      wire.NPZ)).status_code != 200:
        assert r.status_code == 429 and time.monotonic() < deadline, r.text[:300]
        time.sleep(0.1)
    with np.load(io.BytesIO(r.content)) as npz:
        np.testing.assert_allclose(npz["hessian"], np.diag(-np.sin(x)), rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------ integers past float64


JSON_HEADERS = {"content-type": wire.JSON}


@pytest.mark.parametrize("digits", [400, 5000])  # (5,000: past Python's own int() limit, 4,300)
def test_an_integer_past_float64_is_an_integer_to_every_reader(client, digits: int) -> None:
    """JSON's readers differ on a number past float64's range (RFC 8259 leaves it to
    them): 1e309 is an infinity to Python's and JavaScript's, and the service reads it
    so (round 10). A 400-digit integer was spelled "Infinity" the same way, so an int64
    input refused it as "array data does not fit int64: it holds Infinity", argnums as
    "'Infinity' is not a parameter of 'sin'", chunk_size and rows as "Input should be a
    valid integer", where the query string said "is beyond the range of int64" of the
    same number. Now an integer literal is read as the integer it is (Python's reader):
    an int64 input does not fit it, as a 30-digit one; every integer option in JSON says
    the query string's words; a float input or vector takes the infinity it rounds to."""
    big = "9" * digits
    for sign in ("", "-"):
        for body in (f'{{"inputs": [[[1.0, 2.0, 3.0]], 2.0, {sign}{big}]}}',
                     f'{{"inputs": [[[1.0, 2.0, 3.0]], 2.0, {{"dtype": "int64", "shape": [], "data": {sign}{big}}}]}}'):
            problem = assert_problem(client.post("/v1/functions/scaled_norm/evaluate", content=body,
                                                 headers=JSON_HEADERS), 422, "invalid_input")
            assert problem["detail"] == "input 'power': array data does not fit int64", problem
        problem = assert_problem(client.post("/v1/functions/sin/vjp", headers=JSON_HEADERS, content=(
            f'{{"inputs": [[1.0, 2.0]], "cotangents": {{"dtype": "int64", "shape": [2], "data": [1, {sign}{big}]}}}}')),
            422, "invalid_input")
        assert problem["detail"] == "cotangents: array data does not fit int64", problem
    said = f"'{big[:40]}...' is beyond the range of int64"
    for option, json_value, query_value in (("argnums", big, big), ("chunk_size", big, big),
                                            ("rows", f"[0, {big}]", f"0,{big}")):
        in_json = assert_problem(client.post("/v1/functions/sin/jacobian", headers=JSON_HEADERS,
                                             content=f'{{"inputs": [[1.0, 2.0]], "{option}": {json_value}}}'),
                                 422, "invalid_input")
        in_query = assert_problem(client.post(f"/v1/functions/sin/jacobian?{option}={query_value}", headers=JSON_HEADERS,
                                              content='{"inputs": [[1.0, 2.0]]}'), 422, "invalid_input")
        assert in_json["detail"] == in_query["detail"] == f"{option}: {said}", (in_json, in_query)
    # a float input, and a vector of no dtype, take the infinity it rounds to (as 1e309)
    r = client.post("/v1/functions/add_square/evaluate", headers=JSON_HEADERS,
                    content=f'{{"inputs": [[{big}, -{big}, 0.5], [1, 2, 3]]}}')
    assert r.status_code == 200 and r.json()["output"]["data"] == ["Infinity", "-Infinity", 9.5], r.text
    r = client.post("/v1/functions/sin/vjp", headers=JSON_HEADERS,
                    content=f'{{"inputs": [[0.0, 0.0]], "cotangents": [-{big}, 0.5]}}')
    assert r.status_code == 200 and r.json()["vjp"]["data"] == ["-Infinity", 0.5], r.text


# ------------------------------------------------------------ the engine's time, in turns


def _queue_depth(url: str) -> float:
    text = httpx.get(url + "/metrics", headers={"authorization": f"Bearer {HONEST}"}, timeout=10).text
    return float(next(line.split()[1] for line in text.splitlines() if line.startswith("jacobian_service_queue_depth ")))


def test_one_clients_many_requests_take_turns_with_another_clients(budget_server: str) -> None:
    """The engine took its queue first come first served: a client that sent 40
    Hessians at once (tiny bodies) had another client's one-element Jacobian wait behind
    all of them (6.6 s behind 40 of 0.2 s; behind 40 of 1.3 s, a 504 at 60 s). Now the
    engine takes the first queued job of the client whose last job it took longest ago:
    the other client waits for one job (or batch) at most, whatever the queue holds.
    (Here the hostile client's request that holds the engine until the test lets it go
    has 24 of its Hessians queue before the honest request: that one comes next.)"""
    url = budget_server
    x = np.linspace(-1, 1, 500)
    body = json.dumps({"inputs": [x.tolist()]}).encode()  # (a 1 MB Hessian: under what is held while sent)
    assert _post(url, "/v1/functions/sum_sin/hessian", body, HOSTILE, wire.NPY).status_code == 200  # (its cost learned)
    finished: list[str] = []

    def hostile() -> None:
        r = _post(url, "/v1/functions/sum_sin/hessian", body, HOSTILE, wire.NPY)
        finished.append(f"hostile {r.status_code}")

    answers: list[httpx.Response] = []

    def honest() -> None:
        answers.append(_post(url, "/v1/functions/sin/jacobian", json.dumps({"inputs": [[0.5, 1.0]]}).encode(), HONEST))
        finished.append("honest")

    # The hostile client holds the engine (its turn the latest) until 24 of its Hessians,
    # and then the honest request, wait behind it.
    number = os.getpid() % 1_000_000  # (exact as a float32; one gate per test process)
    holder = threading.Thread(target=_post, args=(url, "/v1/functions/holds_the_engine/evaluate",
                                                  json.dumps({"inputs": [[float(number)]]}).encode(), HOSTILE))
    threads = [threading.Thread(target=hostile) for _ in range(24)]
    honest_thread = threading.Thread(target=honest)
    started: list[threading.Thread] = []
    try:
        for wave, depth in (([holder], 1), (threads, 25), ([honest_thread], 26)):
            for t in wave:
                t.start()
                started.append(t)
            deadline = time.monotonic() + 60
            while _queue_depth(url) < depth:
                assert time.monotonic() < deadline, (depth, finished)
    finally:
        clients28_functions.gate(number).touch()
        for t in started:
            t.join()
        clients28_functions.gate(number).unlink()
    assert answers[0].status_code == 200, answers[0].text
    np.testing.assert_allclose(np.array(answers[0].json()["jacobian"]["data"]), np.diag(np.cos([0.5, 1.0])), rtol=1e-6)
    ahead = finished[:finished.index("honest")]
    assert len(ahead) <= 1, finished  # (first come first served: all 24)
    assert finished.count("hostile 200") == 24, finished
