"""PyTorch's own torch.func test cases, round 27 (test_eager_transforms.py's TestJvp and
TestJac over functions of real inputs with complex outputs: R -> C, which
torch.func.jvp, vmap and a plain call answer and jacrev refuses), replayed over HTTP
against tests/parity27_functions.py and compared with in-process torch.func and finite
differences.

1. A complex output (or a complex leaf of a tuple output, a complex aux) on ``evaluate``
   and ``jvp``, which torch answers: the function's 500 "the output holds a complex128
   tensor, which the wire does not carry" (JSON, ``.npy`` and ``.npz`` alike); a complex
   aux was that 500 on every route, jacobian included, where torch.func.jacrev(has_aux=True)
   answers it. Complex arrays now travel in answers: ``.npy``/``.npz`` as themselves,
   JSON as ``[real, imag]`` pairs; the SDK decodes them.
2. A complex scalar's ``hvp`` (torch.func.grad refuses it: "grad can be implicitly
   created only for real scalar outputs"): the function's 500 with torch's RuntimeError,
   where a complex output's Hessian is the request's 422. Now that 422 too.
3. ``batched_vectors`` jvp of a complex output: the engine's linearity check of vmap's
   products cast them to float64 (a ComplexWarning in the log, the imaginary parts
   unchecked) with a tolerance of 0, so right products failed it and ran one at a time.
   Now it checks them in complex128, to the parts' round-off.
4. The SDK's ``hessian()`` took no ``return_output``, which the server accepts on
   ``/hessian`` (TestHessian's value-and-Hessian): a TypeError.
5. /openapi.json's array schemas named no complex dtype, so a client validating the
   answers of 1. against it refused them; they name complex64/complex128 now (answers only).

One in-process app serves the module (no server start), as rounds 7-26.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from jacobian_client import wire

from . import parity27_functions as F
from .conftest import assert_problem, ready_app, sdk_over
from .test_parity_round7 import arr, post, t

f = torch.func
RNG = np.random.default_rng(27)
X = RNG.standard_normal(4)
V = RNG.standard_normal(4)


@pytest.fixture(scope="module")
def c() -> Iterator[Any]:
    with ready_app("tests.parity27_functions") as client:
        yield client


@pytest.fixture(scope="module")
def sdk(c) -> Iterator[Any]:
    with sdk_over(c) as client:
        yield client


COMPLEX = wire.Limits(complex=True)  # (an answer's reader: the SDK's)


def answer(response: Any, key: str) -> tuple[Any, dict[str, Any]]:
    assert response.status_code == 200, response.text
    doc = response.json()
    return wire.decode_tree(doc[key], limits=COMPLEX), doc


def close(got: Any, want: Any, path: str = "") -> None:
    """Structure, dtype and values (complex ones too; NaN where torch has NaN)."""
    if isinstance(want, torch.Tensor):
        want = want.detach().numpy()
    if isinstance(want, np.ndarray):
        assert isinstance(got, np.ndarray), (path, got)
        assert got.dtype == want.dtype and got.shape == want.shape, (path, got.dtype, want.dtype, got.shape, want.shape)
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12, equal_nan=True, err_msg=path)
    else:
        assert isinstance(got, (list, tuple)) and len(got) == len(want), (path, got)
        for i, (g, w) in enumerate(zip(got, want)):
            close(g, w, f"{path}[{i}]")


COMPLEX_OUT = ["to_complex", "mixed_complex", "complex_sum", "complex_nonfinite"]


@pytest.mark.parametrize("name", COMPLEX_OUT)
def test_a_complex_output_is_answered_on_evaluate_and_jvp_as_torch_answers(c, name):
    fn = getattr(F, name)
    want_out, want_jvp = f.jvp(fn, (t(X),), (t(V),))
    assert any(leaf.is_complex() for leaf in torch.utils._pytree.tree_leaves(want_out))
    # the math: the jvp is the directional derivative of the complex output
    h = 1e-6
    fd = torch.utils._pytree.tree_map(lambda a, b: (a - b) / (2 * h), fn(t(X + h * V)), fn(t(X - h * V)))
    for got_leaf, fd_leaf in zip(torch.utils._pytree.tree_leaves(want_jvp), torch.utils._pytree.tree_leaves(fd)):
        finite = got_leaf.isfinite() & fd_leaf.isfinite()
        torch.testing.assert_close(got_leaf[finite], fd_leaf[finite], rtol=1e-5, atol=1e-7)
    got, _ = answer(post(c, name, "evaluate", [X]), "output")
    close(got, want_out)
    got, doc = answer(post(c, name, "jvp", [X], tangents=arr(V), return_output=True), "jvp")
    close(got, want_jvp)
    close(wire.decode_tree(doc["output"], limits=COMPLEX), want_out)
    # per example, and a stack of tangents: vmap's answers
    xs, vs = np.stack([X, -X, 2 * X]), np.stack([V, X, -V])
    got, _ = answer(post(c, name, "evaluate", [xs], batched=True), "output")
    close(got, f.vmap(fn)(t(xs)))
    got, _ = answer(post(c, name, "jvp", [X], tangents=arr(vs), batched_vectors=True), "jvp")
    close(got, f.vmap(lambda v: f.jvp(fn, (t(X),), (v,))[1])(t(vs)))


def test_the_engines_check_of_vmaps_products_weighs_imaginary_parts():
    """The engine checks vmap's stacked products by linearity (products.vmap_agrees) and
    runs them one at a time where that fails (torch's vmap can be silently wrong). It
    cast complex products to float64 (a ComplexWarning in the log: the imaginary parts
    never weighed) with a tolerance of 0 (complex is not floating point): vmap's right
    products failed it, and every such stack ran one product at a time."""
    from jacobian_service.engine.products import vmap_agrees

    push = lambda v: f.jvp(F.to_complex, (t(X),), (v,))[1]
    vs = t(np.stack([V, X, -V]))
    right = f.vmap(push)(vs)
    wrong = right + 1j * torch.tensor([[0.0], [0.5], [0.0]], dtype=torch.float64)  # the imaginary parts alone
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (torch warns of the cast once a process: not what is tested)
        assert vmap_agrees(push, (vs,), right)
        assert not vmap_agrees(push, (vs,), wrong)


def test_complex_answers_in_npy_and_npz_and_in_the_sdk(c, sdk):
    want_out, want_jvp = f.jvp(F.to_complex, (t(X),), (t(V),))
    for endpoint, extra, want in (("evaluate", {}, want_out), ("jvp", {"tangents": arr(V)}, want_jvp)):
        r = c.post(f"/v1/functions/to_complex/{endpoint}", json={"inputs": [arr(X)], **extra},
                   headers={"accept": "application/x-npy"})
        assert r.status_code == 200, r.text
        close(np.load(io.BytesIO(r.content)), want)
    r = c.post("/v1/functions/mixed_complex/jvp", json={"inputs": [arr(X)], "tangents": arr(V), "return_output": True},
               headers={"accept": "application/x-npz"})
    assert r.status_code == 200, r.text
    trees, _ = wire.read_result_npz(r.content, COMPLEX)
    out, tan = f.jvp(F.mixed_complex, (t(X),), (t(V),))
    close(trees["jvp"], tan)
    close(trees["output"], out)
    # the service's own request readers still take no complex: its inputs are real
    with pytest.raises(wire.WireError, match="unsupported dtype complex128"):
        wire.read_result_npz(r.content)
    for transport in ("binary", "json"):
        close(sdk.evaluate("to_complex", X, transport=transport), want_out)
        close(sdk.jvp("mixed_complex", X, tangents=V, transport=transport), tan)
        got, output = sdk.jvp("complex_nonfinite", X, tangents=V, return_output=True, transport=transport)
        want_o, want_t = f.jvp(F.complex_nonfinite, (t(X),), (t(V),))
        assert not want_o.isfinite().all()
        close(got, want_t)
        close(output, want_o)


def test_json_spells_complex_data_as_real_imag_pairs(c):
    body = post(c, "complex_nonfinite", "evaluate", [X]).json()["output"]
    want = F.complex_nonfinite(t(X)).numpy()
    assert body["dtype"] == "complex128" and body["shape"] == [4]
    spelled = lambda v: "NaN" if np.isnan(v) else ("Infinity" if v > 0 else "-Infinity") if np.isinf(v) else v
    assert body["data"] == [[spelled(z.real), spelled(z.imag)] for z in want]
    assert "NaN" in str(body["data"]) and "Infinity" in str(body["data"])
    # complex64 is read back as complex64, base64 of interleaved pairs too
    z = (X + 1j * V).astype(np.complex64)
    limits = COMPLEX
    back = wire.decode_tree(wire.encode_tree(z), limits=limits)
    assert back.dtype == np.complex64 and np.array_equal(back, z)
    import base64
    b64 = {"dtype": "complex64", "shape": [4], "base64": base64.b64encode(z.astype("<c8").tobytes()).decode()}
    assert np.array_equal(wire.decode_json_array(b64, limits=limits)[0], z)
    with pytest.raises(wire.WireError, match=r"\[real, imag\] pair"):
        wire.decode_json_array({"dtype": "complex64", "shape": [2], "data": [1, 2]}, limits=limits)


def test_a_complex_aux_is_answered_on_every_route(c):
    out_fn = lambda x: F.complex_aux(x)[0]
    aux = F.complex_aux(t(X))[1]
    jac, got_aux = f.jacrev(F.complex_aux, has_aux=True)(t(X))
    torch.testing.assert_close(got_aux, aux)
    for endpoint, options, want in (
            ("evaluate", {}, out_fn(t(X))), ("jacobian", {}, jac), ("jacobian", {"mode": "fwd"}, jac),
            ("hessian", {}, f.hessian(out_fn)(t(X))), ("jvp", {"tangents": arr(V)}, f.jvp(out_fn, (t(X),), (t(V),))[1]),
            ("vjp", {"cotangents": arr(np.array(1.5))}, f.vjp(out_fn, t(X))[1](torch.tensor(1.5, dtype=torch.float64))[0]),
            ("hvp", {"tangents": arr(V)}, f.jvp(f.grad(out_fn), (t(X),), (t(V),))[1])):
        got, doc = answer(post(c, "complex_aux", endpoint, [X], **options), {"evaluate": "output"}.get(endpoint, endpoint))
        close(got, want, endpoint)
        close(wire.decode_tree(doc["aux"], limits=COMPLEX), aux, endpoint)


REFUSED = [("jacobian", {}), ("jacobian", {"mode": "fwd"}), ("jacobian", {"chunk_size": 1}), ("hessian", {}),
           ("jacobian", {"batched": True})]


@pytest.mark.parametrize("name", ["to_complex", "complex_sum"])
def test_derivatives_torch_refuses_are_422_in_torchs_words(c, name):
    fn = getattr(F, name)
    with pytest.raises(RuntimeError, match="Expected all outputs to be real"):
        f.jacrev(fn)(t(X))
    jacrev_says = ("the output is complex128, which has no real derivative (torch.func.jacrev: Expected all outputs "
                   "to be real but received complex tensor at flattened input idx: 0)")
    shape = fn(t(X)).shape
    cot = np.ones(shape)
    for endpoint, options in REFUSED:
        inputs = [np.stack([X, X])] if options.get("batched") else [X]
        body = assert_problem(post(c, name, endpoint, inputs, **options), 422, "invalid_input")
        assert body["detail"] == jacrev_says, (endpoint, options, body)
    # vjp and c . H t pull back complex cotangents, as torch.func.vjp does (round 28); real
    # ones are refused, as torch's pullback refuses them
    for endpoint, options in (("vjp", {"cotangents": arr(cot)}), ("hvp", {"tangents": arr(V), "cotangents": arr(cot)})):
        body = assert_problem(post(c, name, endpoint, [X], **options), 422, "invalid_input")
        assert body["detail"].startswith("cotangents: expected complex cotangents for the complex128 output, got "
                                         "float64 (torch.func.vjp: For complex Tensors"), (endpoint, body)
    if name == "complex_sum":  # a scalar's hvp is jvp(grad(f)): torch.func.grad refuses it
        with pytest.raises(RuntimeError, match="grad can be implicitly created only for real scalar outputs") as raised:
            f.jvp(f.grad(fn), (t(X),), (t(V),))
        body = assert_problem(post(c, name, "hvp", [X], tangents=arr(V)), 422, "invalid_input")
        assert body["detail"] == ("the output is complex128, which has no real derivative (torch.func.grad: "
                                  f"{str(raised.value).splitlines()[0]})"), body


def test_complex32_is_still_the_wires_refusal(c):
    """numpy has no complex32 (chalf): no format carries it."""
    for endpoint, options in (("evaluate", {}), ("jvp", {"tangents": arr(V)})):
        body = assert_problem(post(c, "complex_half", endpoint, [X], **options), 500, "function_error")
        assert body["detail"] == "the output holds a complex32 tensor, which the wire does not carry", body


@pytest.mark.parametrize("transport", ["binary", "json"])
def test_the_sdks_hessian_returns_the_output_when_asked(sdk, transport):
    """TestHessian over cube_sum: H = diag(6 x), and the value beside it."""
    H, out = sdk.hessian("cube_sum", X, return_output=True, transport=transport)
    want = f.hessian(F.cube_sum)(t(X))
    torch.testing.assert_close(want, torch.diag(6 * t(X)))
    close(H, want)
    close(out, F.cube_sum(t(X)))
    # and per example, beside argnums as a tuple
    xs = np.stack([X, -X])
    H, out = sdk.hessian("cube_sum", xs, batched=True, argnums=(0,), return_output=True, transport=transport)
    close(H, f.vmap(f.hessian(F.cube_sum, argnums=(0,)))(t(xs)))
    close(out, f.vmap(F.cube_sum)(t(xs)))
    assert isinstance(sdk.hessian("cube_sum", X, transport=transport), np.ndarray)


def test_the_openapi_document_describes_complex_answers(c):
    """/openapi.json's array schemas named no complex dtype: a client validating answers
    against it (jsonschema, a generated model) refused every complex one."""
    import jsonschema

    doc = c.get("/openapi.json").json()

    def valid(name: str, instance: Any) -> bool:
        schema = {**doc["components"]["schemas"][name], "components": doc["components"]}
        return not list(jsonschema.Draft202012Validator(schema).iter_errors(instance))

    for name, endpoint, extra, response in (("complex_nonfinite", "evaluate", {}, "EvaluateResponse"),
                                             ("mixed_complex", "jvp", {"tangents": arr(V)}, "JvpResponse"),
                                             ("complex_aux", "jacobian", {}, "JacobianResponse")):
        r = post(c, name, endpoint, [X], **extra)
        assert r.status_code == 200, r.text
        assert valid(response, r.json()), (name, r.json())
    assert valid("ArrayBase64", {"dtype": "complex64", "shape": [1], "base64": "AACAPwAAAEA="})
