"""PyTorch's own torch.func test cases, round 21, replayed over HTTP against
tests/parity21_functions.py and compared with in-process torch.func (values, shapes,
dtypes; torch's error where torch raises).

1. An integer or boolean output (argmax, ``x.long()``, a comparison; alone, or one leaf
   of a tuple or dict output): jacrev, jacfwd's reverse check, hessian and vjp raise in
   torch, since it has no derivative. The function did not fail, so every derivative
   endpoint, mode and format refuses the request (422 ``invalid_input``) naming the
   leaf and quoting torch; evaluate, jvp and a scalar's hvp answer as torch does.

One in-process app serves the module (no server start), as rounds 7-20.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import pytest
from jacobian_client import InvalidInput, wire
from torch.func import grad, hessian, jacrev, jvp, vjp, vmap

from . import parity21_functions as F
from .conftest import assert_problem, npy_bytes, npz_bytes, ready_app
from .test_parity_round7 import answer, arr, post, same, t
from .test_parity_round15 import sdk  # noqa: F401 (the SDK over this module's app)


@pytest.fixture(scope="module")
def c() -> Iterator[Any]:
    with ready_app("tests.parity21_functions") as client:
        yield client


X = np.array([0.3, -1.2, 0.7], dtype=np.float32)

# name -> (the refusal's first words: the leaf and its dtype)
NO_DERIVATIVE = {
    "argmax_of": "the output is int64",
    "scaled_long": "the output is int64",
    "positive": "the output is bool",
    "sin_and_argmax": "the output[1] is int64",
    "sin_and_sign": "the output['k'] is bool",
    "index_with_float_aux": "the output is int64",
}

# every derivative route: (endpoint, options); vectors filled in per function
ROUTES = [
    ("jacobian", {}), ("jacobian", {"mode": "fwd"}), ("jacobian", {"mode": "auto"}), ("jacobian", {"chunk_size": 1}),
    ("jacobian", {"rows": [0, 1]}), ("jacobian", {"batched": True}), ("jacobian", {"sparsity": "auto"}),
    ("hessian", {}), ("hessian", {"batched": True}), ("hessian", {"sparsity": "auto"}),
    ("vjp", {}), ("vjp", {"batched_vectors": True}), ("hvp", {"cotangents": True}),
]


def _torch_says(name: str) -> str:
    """torch's own refusal (jacrev, hessian and vjp all say it), first line."""
    fn = getattr(F, name)
    if name == "index_with_float_aux":
        fn = lambda x: F.index_with_float_aux(x)[0]  # noqa: E731
    for transform in (lambda: jacrev(fn)(t(X)), lambda: hessian(fn)(t(X)), lambda: vjp(fn, t(X))):
        with pytest.raises(RuntimeError, match="All outputs of f must be floating-point or complex") as raised:
            transform()
    return str(raised.value).splitlines()[0]


def _cotangents(name: str, stacked: bool) -> Any:
    """Cotangents shaped like the output (its integer leaves as float: the refusal is
    the output's, not the vectors')."""
    out = getattr(F, name)(t(X))
    out = out[0] if name == "index_with_float_aux" else out
    one = (lambda o: arr(np.ones((2, *o.shape), np.float32) if stacked else np.ones(o.shape, np.float32)))
    if isinstance(out, dict):
        return {k: one(v) for k, v in out.items()}
    if isinstance(out, tuple):
        return [one(v) for v in out]
    return one(out)


@pytest.mark.parametrize("name", list(NO_DERIVATIVE))
def test_an_integer_output_is_the_requests_422_on_every_derivative_route(c, name):
    """Was a 500 function_error (torch's RuntimeError, as if the function had failed)
    on every route; now a 422 naming the leaf, its dtype and torch's words."""
    says = _torch_says(name)
    for endpoint, options in ROUTES:
        options = dict(options)
        inputs: list[Any] = [np.stack([X, -X])] if options.get("batched") else [X]
        stacked = bool(options.get("batched_vectors"))
        if endpoint == "vjp":
            options["cotangents"] = _cotangents(name, stacked)
        if endpoint == "hvp":
            options.update(cotangents=_cotangents(name, False), tangents=arr(X))
        body = assert_problem(post(c, name, endpoint, inputs, **options), 422, "invalid_input")
        assert body["detail"].startswith(NO_DERIVATIVE[name] + ", which has no derivative"), (endpoint, options, body)
        assert says in body["detail"], (endpoint, options, body)
    # the pattern of a Jacobian that does not exist (GET .../sparsity), likewise
    body = assert_problem(c.get(f"/v1/functions/{name}/sparsity?shapes=3"), 422, "invalid_input")
    assert body["detail"].startswith(NO_DERIVATIVE[name] + ", which has no derivative"), body


@pytest.mark.parametrize("accept", [wire.NPY, wire.NPZ, wire.JSON])
def test_an_integer_output_is_refused_in_every_format(c, accept):
    """.npy in (the streamed route's rows, whose header is not yet sent) and out, .npz
    in and out: the same 422 before any body (for a tuple output too, which no .npy
    could carry: the output is refused before its structure is looked at)."""
    for name in ("scaled_long", "sin_and_argmax"):
        says = NO_DERIVATIVE[name]
        for endpoint in ("jacobian", "hessian"):
            r = c.post(f"/v1/functions/{name}/{endpoint}", content=npy_bytes(X),
                       headers={"content-type": wire.NPY, "accept": accept})
            assert assert_problem(r, 422, "invalid_input")["detail"].startswith(says), (name, endpoint)
            r = c.post(f"/v1/functions/{name}/{endpoint}", content=npz_bytes(x=X),
                       headers={"content-type": wire.NPZ, "accept": accept})
            assert assert_problem(r, 422, "invalid_input")["detail"].startswith(says), (name, endpoint)


@pytest.mark.parametrize("transport", ["binary", "json"])
def test_the_sdk_raises_invalid_input_and_answers_where_torch_does(sdk, transport):
    """The SDK's jacobian, hessian and vjp raise InvalidInput (FunctionError before),
    with torch's words; its evaluate and jvp answer as torch.func does."""
    for name in ("argmax_of", "sin_and_sign"):
        says = _torch_says(name)
        for call in (lambda: sdk.jacobian(name, X, transport=transport),
                     lambda: sdk.hessian(name, X, transport=transport),
                     lambda: sdk.jacobian(name, np.stack([X, X]), batched=True, transport=transport)):
            with pytest.raises(InvalidInput, match="which has no derivative") as raised:
                call()
            assert says in str(raised.value)
        fn = getattr(F, name)
        same(sdk.evaluate(name, X, transport=transport), fn(t(X)))
        same(sdk.jvp(name, X, tangents=X, transport=transport), jvp(fn, (t(X),), (t(X),))[1])
    with pytest.raises(InvalidInput, match=r"the output\[1\] is int64"):
        sdk.vjp("sin_and_argmax", X, cotangents=(X, np.array(1.0, np.float32)), transport=transport)


def test_where_torch_answers_an_integer_output_so_does_the_service(c):
    """jvp gives an integer output integer zeros (a boolean one False), a stack of them
    under vmap; torch.func's hvp (jvp of grad) gives a scalar integer output zeros, as
    grad does; evaluate returns it. The refusal is the derivative routes' only."""
    v = np.stack([X, 2 * X])
    for name in ("argmax_of", "scaled_long", "positive", "sin_and_argmax", "sin_and_sign"):
        fn = getattr(F, name)
        got, doc = answer(post(c, name, "jvp", [X], tangents=arr(X), return_output=True), "jvp")
        want = jvp(fn, (t(X),), (t(X),))
        same((wire.decode_tree(doc["output"]), got), want)
        got, _ = answer(post(c, name, "jvp", [X], tangents=arr(v), batched_vectors=True), "jvp")
        same(got, vmap(lambda u: jvp(fn, (t(X),), (u,))[1])(t(v)))
        same(answer(post(c, name, "evaluate", [X]), "output")[0], fn(t(X)))
    got, _ = answer(post(c, "argmax_of", "hvp", [X], tangents=arr(X)), "hvp")
    same(got, jvp(grad(F.argmax_of), (t(X),), (t(X),))[1])


def test_a_complex_output_is_refused_as_jacrev_refuses_it(c, sdk):
    """TestJac.test_complex_error (R -> C): jacrev raises "Expected all outputs to be
    real", jacfwd and hessian too. The service's 500 function_error said the wire does
    not carry complex (as if the function had failed) on every route; the derivative
    routes are now the request's 422 in jacrev's words, naming the leaf. evaluate and
    jvp, which torch answers in complex, answer it so since round 27."""
    with pytest.raises(RuntimeError, match="Expected all outputs to be real") as raised:
        jacrev(F.sin_and_polar)(t(X))
    says = str(raised.value).splitlines()[0]
    with pytest.raises(RuntimeError, match="Expected all outputs to be real"):
        hessian(F.sin_and_polar)(t(X))
    for endpoint, options in ROUTES[:10]:
        inputs = [np.stack([X, -X])] if options.get("batched") else [X]
        body = assert_problem(post(c, "sin_and_polar", endpoint, inputs, **options), 422, "invalid_input")
        assert body["detail"] == f"the output[1] is complex64, which has no real derivative (torch.func.{says})", body
    # vjp pulls back complex cotangents, as torch's does (round 28): real ones are refused as torch refuses them
    body = assert_problem(post(c, "sin_and_polar", "vjp", [X], cotangents=[arr(X), arr(X)]), 422, "invalid_input")
    assert body["detail"].startswith("cotangents[1]: expected complex cotangents for the complex64 output, got float32 "
                                     "(torch.func.vjp: For complex Tensors, both grad_output and output"), body
    for transport in ("binary", "json"):
        with pytest.raises(InvalidInput, match="Expected all outputs to be real"):
            sdk.jacobian("sin_and_polar", X, transport=transport)
    for endpoint, options in (("evaluate", {}), ("jvp", {"tangents": arr(X)})):
        r = post(c, "sin_and_polar", endpoint, [X], **options)
        assert r.status_code == 200, r.text
        got = wire.decode_tree(r.json()["output" if endpoint == "evaluate" else "jvp"], limits=wire.Limits(complex=True))
        want = F.sin_and_polar(t(X)) if endpoint == "evaluate" else jvp(F.sin_and_polar, (t(X),), (t(X),))[1]
        assert got[1].dtype == np.complex64
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w.numpy(), rtol=1e-6, atol=1e-6)
