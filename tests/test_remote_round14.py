"""Remote functions inside the caller's torch / JAX / SciPy code, round 14: each case
compared with the same computation in-process (or, where in-process cannot run it, with
its error).

One server: the session's ``jacobian-service serve`` subprocess (``cc``), shared with the
other adapter test files.
"""

from __future__ import annotations

import httpx
import pytest

pytest.importorskip("torch")
pytest.importorskip("jacobian_service.app")


from ._remote_support import cc, jx, url  # noqa: E402,F401 (fixtures)


# --------------------------------------------------------------------------- a vector refused for its shape: fields


def test_a_vector_refused_for_its_shape_says_so_in_fields(url):
    """A cotangent or tangent of the wrong shape is a 422 whose body carries the shapes as
    members (``field``, ``path``, ``expected_shape``, ``got_shape``), across the engine
    process and the front end, JSON and ``.npz`` alike: a client's code reads them, not
    the detail's words (jax's adapter told an output whose shape follows the values by
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
