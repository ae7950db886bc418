"""JSON costs what the limits say (issue 10, item 11).

* Output: large JSON results are written and sent in pieces (``responses.json_pieces``),
  so a front end encoding a 64 MiB Jacobian as JSON grows by about the result, not by
  the several times it took to build the whole text (and far more for non-finite values,
  spelled out as strings).
* Input: a JSON body is charged its parse cost (a Python object per number) against the
  body budget before it is parsed: one that could never fit is 413, with a hint to send
  binary arrays.
"""

from __future__ import annotations

import httpx
import numpy as np
import orjson
import pytest
import torch

from jacobian_client import wire
from jacobian_service.responses import json_pieces

from ._rss import front_end_pid, peak_growth
from .conftest import assert_problem, assert_tree_close, live_server

MiB = 1 << 20


def _trees():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((700, 600)).astype(np.float32)
    a[3, 4], a[10] = np.nan, np.inf  # non-finite values in some blocks only
    return {
        "function": "f",
        "jacobian": [a, {"x": rng.standard_normal(400_000), "y": (rng.standard_normal((3, 300, 200)), np.float32(2))}],
        "aux": {"k": [1, 2, "s"], "empty_rows": np.zeros((300_000, 0))},
        "meta": {"device": "cpu"},
    }


def test_json_pieces_parse_to_the_one_shot_document():
    doc = _trees()
    pieces = list(json_pieces(doc))
    assert len(pieces) > 20 and max(len(p) for p in pieces) < 8 * MiB  # pieces, each bounded
    whole = wire.decode_tree(orjson.loads(wire.dumps(wire.encode_tree(doc))))
    streamed = wire.decode_tree(orjson.loads(b"".join(pieces)))
    assert_tree_close(streamed, whole, rtol=0, atol=0)  # NaN and infinities included


@pytest.fixture(scope="module", params=["gathered", "streamed"])
def server(request):
    """Both ways a large JSON Jacobian leaves: gathered by the engine and encoded in
    pieces by the front end, or streamed from the engine row chunk by row chunk (over
    STREAM_THRESHOLD_BYTES, as .npy is). One front end, so that its RSS is the one that
    encodes; a 64 MiB result allowed."""
    threshold = 1 << 40 if request.param == "gathered" else MiB
    with live_server(WORKERS=1, WARMUP="false", ENGINE_STANDBY="false", MAX_RESULT_BYTES=128 * MiB, STREAM_THRESHOLD_BYTES=threshold,
                     MAX_REQUEST_BYTES=4 * MiB, BODY_BUDGET_BYTES=16 * MiB) as (url, proc):
        yield url, proc


def _jacobian_json(url: str, x: list, **options) -> int:
    """POST a softmax Jacobian for JSON and read the answer through, counting bytes."""
    size = 0
    with httpx.stream("POST", f"{url}/v1/functions/softmax/jacobian", json={"inputs": [x], **options},
                      headers={"accept": wire.JSON}, timeout=120) as r:
        assert r.status_code == 200, r.read()[:500]
        tail = b""
        for chunk in r.iter_bytes():
            size += len(chunk)
            tail = (tail + chunk)[-64:]
    assert tail.endswith(b"}}")
    return size


def test_large_json_result_is_streamed_and_correct(server):
    url, _ = server
    x = np.linspace(-2, 2, 600, dtype=np.float32)
    r = httpx.post(f"{url}/v1/functions/softmax/jacobian", json={"inputs": [x.tolist()]}, timeout=60)
    assert r.status_code == 200 and "content-length" not in r.headers  # 1.4 MB: streamed
    got = wire.decode_tree(r.json()["jacobian"])
    want = torch.func.jacrev(torch.softmax, argnums=0)(torch.tensor(x), 0).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_large_json_jacobian_of_a_2d_output_nests_as_jacrev(server):
    """reaction_diffusion: a (40, 40) grid -> (40, 40); its Jacobian (40, 40, 40, 40),
    10 MB: the output's rows cross both output dimensions in every streamed chunk."""
    url, _ = server
    u = np.random.default_rng(0).random((40, 40)).astype(np.float32)
    r = httpx.post(f"{url}/v1/functions/reaction_diffusion/jacobian", json={"inputs": [u.tolist()], "chunk_size": 7},
                   timeout=60)
    assert r.status_code == 200, r.text[:500]
    doc = r.json()
    got = np.array(doc["jacobian"]["data"], dtype=np.float32)  # nested as the shape says, not flat
    from jacobian_service.registry import Registry

    fn = Registry.from_modules().get("reaction_diffusion").fn
    want = torch.func.jacrev(fn)(torch.from_numpy(u)).numpy()
    assert got.shape == want.shape == tuple(doc["jacobian"]["shape"])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert set(doc) == {"function", "jacobian", "meta"} and doc["meta"]["mode"] == "rev"


@pytest.mark.parametrize("values", ["finite", "nan"])
def test_64_mib_json_jacobian_costs_about_its_size(server, values):
    """softmax, n = 4096, float32: a 64 MiB Jacobian, ~220 MB of JSON text (all-NaN:
    every number spelled "NaN"). Before, the front end's peak RSS grew by 219 MiB
    (finite) and 640 MiB (NaN) encoding it whole. Now, gathered: by the result it
    receives from the engine, plus a block's text; streamed from the engine in chunks of
    256 rows (4 MiB): by a couple of chunks, whatever the result's size."""
    url, proc = server
    n = 4096
    x = ["NaN"] * n if values == "nan" else np.linspace(-2, 2, n).tolist()
    pid = front_end_pid(proc.pid)
    _jacobian_json(url, x, chunk_size=256)  # once to warm: first-use allocations are not the encoder's
    growth, size = peak_growth(pid, lambda: _jacobian_json(url, x, chunk_size=256))
    assert size > 64 * MiB
    result = n * n * 4
    bound = result // 2 if _streams(url) else result * 3 // 2
    assert growth < bound, f"peak RSS grew by {growth / MiB:.0f} MiB for a {result / MiB:.0f} MiB result"


def _streams(url: str) -> bool:
    return httpx.get(f"{url}/v1/info", timeout=10).json()["limits"]["stream_threshold_bytes"] < 64 * MiB


def test_json_body_is_charged_its_parse_cost(server):
    url, _ = server
    # 1.6 MB of "0," is 800 k numbers: about 32 MB of Python objects once parsed, over
    # the 16 MiB budget on its own (413), though the body is under max_request_bytes.
    body = b'{"inputs": [[' + b"0," * 800_000 + b'0]]}'
    r = httpx.post(f"{url}/v1/functions/sin/jacobian", content=body, headers={"content-type": wire.JSON}, timeout=30)
    problem = assert_problem(r, 413, "payload_too_large")
    assert "JSON" in problem["detail"] and "binary" in problem["detail"]
    # The same array as .npy costs its size and is served.
    npy = wire.write_npy(np.zeros(800_001, np.float32))
    r = httpx.post(f"{url}/v1/functions/sin/evaluate", content=b"".join(bytes(p) for p in npy),
                   headers={"content-type": wire.NPY, "accept": wire.NPY}, timeout=30)
    assert r.status_code == 200, r.text


def test_streamed_json_keeps_the_result_limit(server):
    """Streamed .npy has no result limit (the client asked for a stream); JSON keeps
    MAX_RESULT_BYTES, streamed or not: 6000^2 float32 = 137 MiB > 128 MiB."""
    url, _ = server
    r = httpx.post(f"{url}/v1/functions/softmax/jacobian", json={"inputs": [[0.0] * 6000]}, timeout=60)
    assert_problem(r, 413, "result_too_large")
    assert httpx.post(f"{url}/v1/functions/sin/jacobian", json={"inputs": [[0.5]]}, timeout=10).status_code == 200


@pytest.mark.parametrize("case", ["aux", "two_inputs", "return_output"])
def test_large_json_jacobian_that_is_not_one_array_keeps_every_part(server, case):
    """Only a bare single-array Jacobian streams from the engine: with aux, several
    differentiated inputs or the output asked for, the document keeps all its parts."""
    url, _ = server
    n = 800  # 2.4 MB per Jacobian block: over the streamed server's 1 MiB threshold
    x = np.linspace(-1, 1, n, dtype=np.float32)
    y = np.linspace(0, 2, n, dtype=np.float32)
    from jacobian_service.registry import Registry

    registry = Registry.from_modules()
    if case == "aux":
        body, fn = {"inputs": [x.tolist()]}, registry.get("sin_aux").fn
        want, want_aux = torch.func.jacrev(fn, has_aux=True)(torch.from_numpy(x))
    elif case == "two_inputs":
        body, fn = {"inputs": [x.tolist(), y.tolist()], "argnums": [0, 1]}, registry.get("add_square").fn
        want = torch.func.jacrev(fn, argnums=(0, 1))(torch.from_numpy(x), torch.from_numpy(y))
    else:
        body, fn = {"inputs": [x.tolist()], "return_output": True}, registry.get("softmax").fn
        want = torch.func.jacrev(fn)(torch.from_numpy(x))
    r = httpx.post(f"{url}/v1/functions/{fn.__name__}/jacobian", json=body, timeout=60)
    assert r.status_code == 200, r.text[:500]
    doc = r.json()
    assert_tree_close(wire.decode_tree(doc["jacobian"]), want, rtol=1e-5, atol=1e-6)
    if case == "aux":
        assert_tree_close(wire.decode_tree(doc["aux"]), want_aux, rtol=1e-6, atol=1e-6)
    if case == "return_output":
        assert_tree_close(wire.decode_tree(doc["output"]), fn(torch.from_numpy(x)), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("media", ["npy", "json"])
def test_a_stream_left_by_its_client_leaves_no_unretrieved_failure(media):
    """Found by a red team: a client that left a streamed Jacobian mid-way made the front
    end log "Task exception was never retrieved" with a traceback, about once in 15: the
    chunk asked for ahead failed when its stream closed, and nobody took the failure."""
    import asyncio
    import gc
    from types import SimpleNamespace

    from jacobian_service import routes
    from jacobian_service.errors import ServiceError
    from jacobian_service.scheduler import StreamHead
    from jacobian_service.types import JobInfo

    async def scenario() -> list[dict]:
        loop = asyncio.get_running_loop()
        reported: list[dict] = []
        loop.set_exception_handler(lambda _loop, context: reported.append(context))
        closed = asyncio.Event()
        calls = 0

        async def next_chunk(head, deadline):
            nonlocal calls
            calls += 1
            if calls == 1:
                return np.ones((2, 4), np.float32)
            await closed.wait()  # the next chunk fails once the stream is closed
            raise ServiceError("the stream was closed")

        engines = SimpleNamespace(next_chunk=next_chunk, close_stream=lambda head: closed.set())
        state = SimpleNamespace(engines=engines, settings=SimpleNamespace(request_timeout_s=60),
                                metrics=SimpleNamespace(streamed_bytes=SimpleNamespace(inc=lambda n: None)))
        head, info = StreamHead(1, (4, 4), "float32", 2, 64), JobInfo(device="cpu")
        if media == "npy":
            response = routes._stream(state, None, SimpleNamespace(spec=SimpleNamespace(name="f")), head, info, lambda: None)
        else:
            response = routes._stream_json(state, "f", head, info, lambda: None)
        body = response.body_iterator
        await body.__anext__()  # the head
        await body.__anext__()  # the first chunk; the second is asked for
        await body.aclose()  # the client has gone
        for _ in range(5):
            await asyncio.sleep(0)
        gc.collect()  # a failed task's "never retrieved" is reported when it is collected
        await asyncio.sleep(0)
        return reported

    reported = asyncio.run(scenario())
    assert not any("never retrieved" in str(c.get("message", "")) for c in reported), reported
