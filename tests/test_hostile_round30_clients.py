"""Red team, round thirty: what a JSON body costs the front end by what it holds, not
by its bytes.

A front end parses bodies under 256 KiB on its event loop, and a JSON body's parse costs
by its containers (each a Python object made, walked and judged), not its bytes; and a
request's cotangents or tangents were taken as JSON whatever their number of arrays,
where an ``.npz`` carries at most ``MAX_NPZ_MEMBERS``. Each test names what a user saw.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import pytest
import torch
from jacobian_client import wire

from . import clients30_functions
from .conftest import assert_problem, npz_bytes, ready_app_with

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
