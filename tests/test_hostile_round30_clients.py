"""Red team, round thirty: what a JSON body costs the front end by what it holds, not
by its bytes.

A front end parses bodies under 256 KiB on its event loop, and a JSON body's parse costs
by its containers (each a Python object made, walked and judged), not its bytes; and a
request's cotangents or tangents were taken as JSON whatever their number of arrays,
where an ``.npz`` carries at most ``MAX_NPZ_MEMBERS``. Each test names what a user saw.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import numpy as np
import pytest
import torch
from jacobian_client import wire

from . import clients30_functions
from ._rss import front_end_pid, status_bytes
from .conftest import assert_problem, live_server, npz_bytes, ready_app_with

LIMIT = 4  # MAX_NPZ_MEMBERS of the in-process app: fewer than spread's outputs and tree_sum's leaves


@pytest.fixture(scope="module")
def app() -> Iterator[Any]:
    with ready_app_with("jacobian_service.examples,tests.clients30_functions", max_npz_members=LIMIT) as c:
        yield c


def _engine_calls(c: Any) -> float:
    text = c.get("/metrics").text
    return next(float(line.split()[1]) for line in text.splitlines() if line.startswith("jacobian_service_batch_size_count "))


def _array(a: np.ndarray) -> dict[str, Any]:
    return {"dtype": str(a.dtype), "shape": list(a.shape), "data": a.tolist()}


X = np.linspace(-1, 1, 3).astype(np.float32)


def _ragged(leaves: int) -> list[list[float]]:
    """Cotangents of ``leaves`` one- and two-number arrays: the cheapest array each."""
    return [[1.0], [1.0, 2.0]] * (leaves // 2)


# ------------------------------------------------------------ arrays a request's vectors hold


def test_cotangents_past_the_member_limit_are_refused_as_an_npz_is(app) -> None:
    """An .npz carries at most MAX_NPZ_MEMBERS arrays; the same cotangents as JSON were
    taken whatever their number, each leaf decoded on the front end's event loop, framed
    to the engine and decoded there (~50 us together): a 250 KB vjp body of 50,000
    ragged one-number cotangents took 2.9 s, its event loop held throughout (/healthz
    waited up to 4.1 s beside it), then the engine's 422. Now the JSON vectors hold at
    most MAX_NPZ_MEMBERS arrays too (or the function's input arrays, if more): past it
    the .npz's 413, before any leaf past the limit is read and nothing is computed."""
    cots = [np.full(3, i + 1, np.float32) for i in range(clients30_functions.SPREAD)]
    before = _engine_calls(app)
    refusals = {
        "json": app.post("/v1/functions/spread/vjp", json={"inputs": [X.tolist()], "cotangents": [_array(c) for c in cots]}),
        "npz": app.post("/v1/functions/spread/vjp", headers={"content-type": wire.NPZ},
                        content=npz_bytes(x=X, **{f"cotangents/{i}": c for i, c in enumerate(cots)})),
        "hostile": app.post("/v1/functions/sin/vjp", json={"inputs": [X.tolist()], "cotangents": _ragged(50_000)}),
        # hvp's optional cotangents (shaped like the output) are held to it too
        "hvp": app.post("/v1/functions/sum_sin/hvp", json={"inputs": [X.tolist()], "tangents": X.tolist(),
                                                            "cotangents": _ragged(LIMIT + 2)}),
    }
    for how, r in refusals.items():
        detail = assert_problem(r, 413, "payload_too_large")["detail"]
        assert f"the limit is {LIMIT}" in detail, (how, detail)
    assert "cotangents hold more than 4 arrays" in refusals["hostile"].json()["detail"]
    # empty objects are nodes the engine is sent as arrays are: counted as arrays
    r = app.post("/v1/functions/sin/jvp", json={"inputs": [X.tolist()], "tangents": {f"k{i}": {} for i in range(20_000)}})
    assert "tangents hold more than 4 arrays" in assert_problem(r, 413, "payload_too_large")["detail"]
    assert _engine_calls(app) == before  # refused in the front end: the engine saw none of them

    # within the limit, the vjp is torch.func's
    x = torch.from_numpy(X)
    r = app.post("/v1/functions/triple/vjp", json={"inputs": [X.tolist()], "cotangents": [_array(c) for c in cots[:3]]})
    assert r.status_code == 200, r.text
    _, pull = torch.func.vjp(clients30_functions.triple, x)
    want = pull(tuple(torch.from_numpy(c) for c in cots[:3]))[0].numpy()
    np.testing.assert_allclose(np.array(r.json()["vjp"]["data"]), want, rtol=1e-5, atol=1e-6)
    assert _engine_calls(app) == before + 1


def test_tangents_of_a_parameter_of_more_arrays_than_the_limit_are_taken(app) -> None:
    """The bound is the .npz's or the function's own input arrays, whichever is more:
    tangents are shaped like the inputs, so a parameter of six arrays takes six (the
    jvp torch.func computes), while a seventh is the 413."""
    rng = np.random.default_rng(30)
    p = {k: rng.standard_normal(3).astype(np.float32) for k in clients30_functions.LEAVES}
    t = {k: rng.standard_normal(3).astype(np.float32) for k in clients30_functions.LEAVES}
    r = app.post("/v1/functions/tree_sum/jvp", json={"inputs": [{k: v.tolist() for k, v in p.items()}],
                                                     "tangents": {k: v.tolist() for k, v in t.items()}})
    assert r.status_code == 200, r.text
    _, want = torch.func.jvp(clients30_functions.tree_sum, ({k: torch.from_numpy(v) for k, v in p.items()},),
                             ({k: torch.from_numpy(v) for k, v in t.items()},))
    np.testing.assert_allclose(np.array(r.json()["jvp"]["data"]), want.numpy(), rtol=1e-5, atol=1e-6)
    more = {**{k: v.tolist() for k, v in t.items()}, "g": [0.0, 0.0, 0.0]}
    r = app.post("/v1/functions/tree_sum/jvp", json={"inputs": [{k: v.tolist() for k, v in p.items()}],
                                                     "tangents": more})
    assert "tangents hold more than 6 arrays (an empty object counts as one); the limit is 6" in assert_problem(r, 413, "payload_too_large")["detail"]


# ------------------------------------------------------------ JSON parsed by what it holds

N = 240_000  # bytes of each hostile body: under the 256 KiB a front end parsed on its event loop

# (endpoint, function, query, body): every kind, a sparse and a streamed Jacobian; each
# body holds tens of thousands of containers or bare NaNs in under 256 KiB
_HOSTILE = {
    "jacobian dicts": ("jacobian", "sin", "", {"inputs": [[{}] * (N // 3)]}),
    "hessian bare NaN": ("hessian", "sum_sin", "", "NaN"),
    "evaluate empty lists": ("evaluate", "sin", "", {"inputs": [[[]] * (N // 3)]}),
    "vjp ragged cotangents": ("vjp", "sin", "", {"inputs": [[0.5]], "cotangents": _ragged(N // 8)}),
    "jvp dict tangents": ("jvp", "sin", "", {"inputs": [[0.5]], "tangents": {f"k{i}": {} for i in range(N // 12)}}),
    "hvp nested tangents": ("hvp", "sum_sin", "", {"inputs": [[0.5]], "tangents": [[[0.5]]] * (N // 8)}),
    "sparse jacobian rows": ("jacobian", "lorenz96", "?sparsity=auto", {"inputs": [[[0.5]] * (N // 6)]}),
    "streamed jacobian rows": ("jacobian", "softmax", "?chunk_size=16", {"inputs": [[[0.5]] * (N // 6)]}),
}


def _body(doc: Any) -> bytes:
    if doc == "NaN":  # (Python's json.dumps writes bare NaN: a wire.loads rewrite each)
        return b'{"inputs":[[' + b",".join([b"NaN"] * (N // 4)) + b"]]}"
    return json.dumps(doc, separators=(",", ":")).encode()


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, int]]:
    """A real server of one front end: (its URL, the front end's process id)."""
    with live_server(WORKERS=1, WARMUP="false", ENGINE_STANDBY="false",
                     FUNCTIONS="jacobian_service.examples,tests.clients30_functions") as (url, proc):
        yield url, front_end_pid(proc.pid)


def _post(port: int, path: str, body: bytes, accept: str) -> None:
    """One request on a connection of its own, its answer read to the end (a raw client)."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(b"POST %s HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nAccept: %s\r\n"
                  b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (path.encode(), accept.encode(), len(body), body))
        while s.recv(1 << 16):
            pass


def _while_sent(url: str, send: Callable[[], None], probe: Callable[[httpx.Client, int], None], probes: int) -> None:
    """``probe`` ``probes`` times while two connections send ``send`` back to back."""
    stop = threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            send()

    threads = [threading.Thread(target=hammer) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.3)
        with httpx.Client(base_url=url, timeout=60) as c:
            for i in range(probes):
                probe(c, i)
                time.sleep(0.02)
    finally:
        stop.set()
        for t in threads:
            t.join()


def _cpu_s(stat: str) -> float:
    """User and system CPU seconds of a process or thread, from its /proc stat."""
    fields = Path(stat).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.parametrize("case", list(_HOSTILE))
def test_a_json_body_of_many_items_leaves_the_front_end_to_others(server: tuple[str, int], case: str) -> None:
    """Bodies under 256 KiB were parsed on the front end's event loop, as cheap as their
    bytes; but each container of a JSON body is a Python object made and walked, each
    bare NaN a rewrite: 80,000 `{}` in a 240 KB jacobian body, or 60,000 bare NaNs, held
    the loop 0.3-0.8 s per body, every other client's request waiting: two connections
    sending such bodies made /healthz take 0.34-0.6 s (median; 1.1 s at most), 3.7 s at
    most beside ragged cotangents; the loop's thread took 99 % of the front end's CPU.
    Such a body (more than 4,096 items or 256 containers) is now parsed on a worker
    thread, whatever the endpoint: the loop's thread takes a small share (4-13 %
    measured), /healthz, /readyz, /metrics, /docs and another client's Jacobian
    (torch.func's) are answered beside it (/healthz: 15-60 ms median, GIL hand-overs),
    and the front end keeps none of the memory."""
    url, pid = server
    port = int(url.rsplit(":", 1)[1])
    kind, name, query, doc = _HOSTILE[case]
    body = _body(doc)
    assert len(body) < 256 << 10
    accept = wire.NPY if name == "softmax" else wire.JSON
    with httpx.Client(base_url=url, timeout=60) as c:
        r = c.post(f"/v1/functions/{name}/{kind}{query}", content=body, headers={"content-type": wire.JSON, "accept": accept})
        assert 400 <= r.status_code < 500, r.text[:300]  # (each is refused: none of them is a call)
        assert_problem(r, r.status_code, r.json()["code"])
    x = np.linspace(-1, 1, 5, dtype=np.float32)
    want = torch.func.jacrev(torch.sin)(torch.from_numpy(x)).numpy()

    def probe(c: httpx.Client, i: int) -> None:
        path = ("/healthz", "/readyz", "/metrics", "/docs", "/v1/functions/sin/jacobian")[i % 5]
        if path.startswith("/v1"):
            r = c.post(path, json={"inputs": [x.tolist()]})
            assert r.status_code == 200, r.text
            np.testing.assert_allclose(np.array(r.json()["jacobian"]["data"]), want, rtol=1e-6, atol=1e-7)
        else:
            r = c.get(path)
            assert r.status_code == 200, (path, r.text[:300])

    def send() -> None:
        _post(port, f"/v1/functions/{name}/{kind}{query}", body, accept)

    _while_sent(url, send, probe, 5)  # (the first rounds make what the front end keeps for any: its docs, its arenas)
    rss = status_bytes(pid, "VmRSS")
    loop_s, all_s = _cpu_s(f"/proc/{pid}/task/{pid}/stat"), _cpu_s(f"/proc/{pid}/stat")
    _while_sent(url, send, probe, 25)
    loop_s, all_s = _cpu_s(f"/proc/{pid}/task/{pid}/stat") - loop_s, _cpu_s(f"/proc/{pid}/stat") - all_s
    # CPU time, not wall time: what the loop's thread spent beside the front end's other
    # threads, whatever else this host runs (the worker threads parse; the loop reads,
    # counts and answers)
    if all_s < 0.2:
        pytest.skip(f"the front end took {all_s:.2f} s of CPU in all: too little to tell its threads apart")
    assert loop_s < all_s / 3, f"the event loop's thread took {loop_s:.2f} s of the front end's {all_s:.2f} s of CPU"
    grown = status_bytes(pid, "VmRSS") - rss
    assert grown < 24 << 20, f"the front end kept {grown >> 20} MiB"
