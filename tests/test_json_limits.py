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


@pytest.fixture(scope="module")
def server():
    # One front end, so that its RSS is the one that encodes; a 64 MiB result allowed.
    with live_server(WORKERS=1, WARMUP="false", MAX_RESULT_BYTES=128 * MiB, STREAM_THRESHOLD_BYTES=1 << 40,
                     MAX_REQUEST_BYTES=4 * MiB, BODY_BUDGET_BYTES=16 * MiB) as (url, proc):
        yield url, proc


def _jacobian_json(url: str, x: list) -> int:
    """POST a softmax Jacobian for JSON and read the answer through, counting bytes."""
    size = 0
    with httpx.stream("POST", f"{url}/v1/functions/softmax/jacobian", json={"inputs": [x]},
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


@pytest.mark.parametrize("values", ["finite", "nan"])
def test_64_mib_json_jacobian_costs_about_its_size(server, values):
    """softmax, n = 4096, float32: a 64 MiB Jacobian, ~190 MB of JSON text (all-NaN:
    every number spelled "NaN"). The front end's peak RSS may grow by the result it
    receives from the engine plus encoding pieces; before streaming it grew by 299 MiB
    (finite) and 642 MiB (NaN)."""
    url, proc = server
    n = 4096
    x = ["NaN"] * n if values == "nan" else np.linspace(-2, 2, n).tolist()
    pid = front_end_pid(proc.pid)
    _jacobian_json(url, x)  # once to warm: first-use allocations are not the encoder's
    growth, size = peak_growth(pid, lambda: _jacobian_json(url, x))
    assert size > 64 * MiB
    result = n * n * 4
    assert growth < 2 * result, f"peak RSS grew by {growth / MiB:.0f} MiB for a {result / MiB:.0f} MiB result"


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
