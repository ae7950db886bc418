"""Remote functions inside the caller's torch / JAX / SciPy code, round 14: each case
compared with the same computation in-process (or, where in-process cannot run it, with
its error).

One server: the session's ``jacobian-service serve`` subprocess (``cc``), shared with the
other adapter test files.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import socket
import time

import httpx
import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("jacobian_service.app")

import jacobian_client as jc  # noqa: E402

from ._remote_support import cc, jx, url  # noqa: E402,F401 (fixtures)
from .test_hostile_round11 import _died, _engine, supervisor  # noqa: E402,F401 (a fixture)


# --------------------------------------------------------------------------- a vector refused for its shape: fields


def test_a_vector_refused_for_its_shape_says_so_in_fields(url):
    """A cotangent or tangent of the wrong shape is a 422 whose body carries the shapes as
    members (``field``, ``path``, ``expected_shape``, ``got_shape``), across the engine
    process and the front end (vjp, jvp, hvp; one array, a stack, a tree's leaf): a
    client's code reads them, not the detail's words (jax's adapter told an output whose shape follows the values by
    the word "cotangents")."""
    x = [0.1, 0.2, 0.3]
    cases = [
        ("vjp", {"inputs": [x], "cotangents": [1.0, 2.0]}, ("cotangents", "", [3], [2])),
        ("jvp", {"inputs": [x], "tangents": [[1.0, 2.0, 3.0]]}, ("tangents", "", [3], [1, 3])),
        ("vjp", {"inputs": [x], "cotangents": [[1.0, 2.0]], "batched_vectors": True},
         ("cotangents", "", ["B", 3], [1, 2])),
        ("hvp", {"inputs": {"x": x}, "tangents": [1.0, 2.0, 3.0], "cotangents": [1.0]},
         ("cotangents", "", [3], [1])),
    ]
    for endpoint, body, (field, path, expected, got) in cases:
        r = httpx.post(f"{url}/v1/functions/sin/{endpoint}", json=body, timeout=30)
        assert r.status_code == 422, r.text
        problem = r.json()
        assert problem["code"] == "invalid_input"
        assert problem["detail"] == f"{field}{path}: expected shape {expected}, got {got}"
        assert {k: problem.get(k) for k in ("field", "path", "expected_shape", "got_shape")} == {
            "field": field, "path": path, "expected_shape": expected, "got_shape": got}
    # a leaf of a tree output, by its path
    r = httpx.post(f"{url}/v1/functions/tree_fn/vjp", timeout=30, json={
        "inputs": {"pair": [[1.0, 2.0], {"scale": 2.0, "shift": [0.0, 1.0]}], "x": [0.5, 0.25]},
        "cotangents": [[1.0, 1.0, 1.0], 1.0]})
    assert r.status_code == 422 and r.json()["field"] == "cotangents" and r.json()["path"] == "[0]", r.text
    assert (r.json()["expected_shape"], r.json()["got_shape"]) == ([2], [3])
    # other refusals carry none of them
    r = httpx.post(f"{url}/v1/functions/sin/vjp", json={"inputs": [x]}, timeout=30)
    assert r.status_code == 422 and "field" not in r.json(), r.text


def test_jit_reads_the_refusals_fields_not_its_words(cc, jx):
    """Under ``jit`` a refused vjp is followed by one evaluate only where the service
    refused its cotangents for their shape (an output whose shape follows the values).
    The adapter looked for the word "cotangents" in the detail, so any other 422 that
    said it (here: the integer leaf of a parameter named ``cotangents``, which the service
    will not differentiate) cost an evaluate more before the same error was raised. Now
    it reads the problem's ``field``: the refusal alone, as in-process ``grad`` refuses
    the integer leaf."""
    jax = jx
    jnp = jax.numpy
    from jacobian_client.jax import remote

    f = remote(cc.client, "r14_named_cotangents")
    x, w = jnp.array([0.1, 0.2]), jnp.array([1.5, -0.5])
    loss = jax.jit(jax.grad(lambda w, x: f({"w": w, "k": jnp.asarray(3)}, x).sum()))
    with pytest.raises(jax.errors.JaxRuntimeError, match=r"InvalidInput: 422 invalid_input: .*cotangents\.k"):
        loss(w, x)
    assert cc.take() == ["evaluate", "vjp"]  # the shape probe, the refused vjp: no check after it


# --------------------------------------------------------------------------- a call whose client left


def test_an_engine_running_only_for_clients_that_left_is_replaced_as_planned(supervisor, tmp_path):
    """The supervisor, told by a front end which requests it gave up on past the grace
    (``given_up``), replaces an engine whose running batch (its board's tags) is only
    those, before the batch's deadline: planned (no backoff, what it had not started goes
    on to the next engine), its function struck as a hang's is (else callers that always
    leave early replaced engines for ever, never quarantined). A batch with a request
    still waited for is left to run; so is one with nothing given up
    (test_hostile_round11 covers that)."""
    sup, sub = supervisor
    proc = _engine(sup, tmp_path, "running")  # board: sin for ["1:7"], due in ten minutes
    word = {"t": "overdue", "engine": 0, "pid": proc.pid, "function": "sin", "since": time.monotonic() - 1.1}
    sup._control(sup.channel.sign({**word, "given_up": ["1:8"]}))  # another request: 1:7 is still waited for
    time.sleep(0.1)
    assert proc.poll() is None
    sup._control(sup.channel.sign({**word, "given_up": ["1:8", "1:7"]}))
    assert proc.wait(5) == -9
    died = _died(sub)
    # planned, no one's fault; its batch's requests (every one given up) named, so the front
    # ends answer them (503) rather than send them on to the next engine
    assert died["planned"] and not died["hang"] and died["tags"] == ["1:7"] and died["function"] == "", died
    assert "only for requests whose clients had left" in died["reason"], died
    assert len(sup.strikes.get("sin", ())) == 1


def test_a_call_whose_async_client_was_cancelled_frees_its_engine_soon(url):
    """An ``AsyncClient`` call cancelled while the function runs one call no cancel
    interrupts (``r14_announced_stall``, 30 s): the SDK closes its connection and the
    front end cancels the job (499), but the engine stayed in the call until it returned
    or its deadline (59.5 s) passed, every request behind it waiting. Now the engine,
    running only for requests given up past the hang grace (1 s here), is replaced as
    planned: a request queued behind it goes on to the spare, answered 200 (no retry
    allowed) within seconds, not at 30 s."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.settimeout(30)

    async def main() -> float:
        async with jc.AsyncClient(url, timeout=60, max_retries=0) as ac:
            stall = asyncio.ensure_future(ac.evaluate("r14_announced_stall", np.array([30.0, port])))
            conn, _ = await asyncio.get_running_loop().run_in_executor(None, listener.accept)  # the call has begun
            conn.close()
            started = time.monotonic()
            with jc.Client(url, timeout=60, max_retries=0) as other, concurrent.futures.ThreadPoolExecutor(1) as pool:
                behind = pool.submit(other.evaluate, "sin", np.array([0.1, 0.2]))
                stall.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await stall
                np.testing.assert_allclose(behind.result(60), np.sin([0.1, 0.2]), rtol=1e-6)
            return time.monotonic() - started

    try:
        waited = asyncio.run(main())
    finally:
        listener.close()
    assert waited < 15, waited  # the grace, the front end's next word, the spare's take-over: not the 30 s call
