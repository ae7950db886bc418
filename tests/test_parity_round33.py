"""PyTorch's own torch.func test cases, round 33 (test_eager_transforms.py's test_conj_bit,
TestJvp / TestVjp / TestJac over functions of real inputs with complex results),
replayed over HTTP against tests/parity33_functions.py and compared with in-process
torch.func.

1. A complex result torch left lazily conjugated (``z.conj()`` sets the conjugate bit, no
   copy), as the output, a leaf of a pytree output, an aux leaf or a jvp's tangent:
   ``.numpy()`` refuses such a tensor ("Can't call numpy() on Tensor that has conjugate
   bit set"), and every answer carrying one was a 500 ``internal_error`` (a traceback
   in the log) where torch answers: ``evaluate`` and ``jvp`` (JSON, ``.npy``, ``.npz``,
   per example, stacked tangents), and every route of a has_aux function (jacobian in
   every mode, hessian, vjp, jvp, hvp). The conjugation is resolved as the result
   leaves the engine, as the negative bit (``z.conj().imag``) already was. The SDK's
   torch adapter (``remote``) under torch.func.jvp / vmap / grad rides on those answers.
2. A guard, no fix needed: vjp and hvp (``c . H t``) of complex cotangents through the
   conjugated output (stacked ones row by row: torch's own vmap of that pullback raises,
   "Batching rule not implemented for aten::_neg_view") and jacrev's 422.

One in-process app serves the module (no server start), as rounds 7-32.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from jacobian_client import wire

from . import parity33_functions as F
from .conftest import assert_problem, ready_app, sdk_over
from .test_parity_round7 import arr, post, t

f = torch.func
tree_leaves = torch.utils._pytree.tree_leaves
RNG = np.random.default_rng(33)
X = RNG.standard_normal(4)
V = RNG.standard_normal(4)
COMPLEX = wire.Limits(complex=True)  # (an answer's reader: the SDK's)


@pytest.fixture(scope="module")
def c() -> Iterator[Any]:
    with ready_app("tests.parity33_functions") as client:
        yield client


def answer(response: Any, key: str) -> tuple[Any, dict[str, Any]]:
    assert response.status_code == 200, response.text
    doc = response.json()
    return wire.decode_tree(doc[key], limits=COMPLEX), doc


def close(got: Any, want: Any, path: str = "") -> None:
    """Structure, dtype and values (complex ones too); dicts by key, tuples as lists."""
    if isinstance(want, torch.Tensor):
        want = want.detach().resolve_conj().numpy()
    if isinstance(want, np.ndarray):
        assert isinstance(got, np.ndarray), (path, got)
        assert got.dtype == want.dtype and got.shape == want.shape, (
            path,
            got.dtype,
            want.dtype,
            got.shape,
            want.shape,
        )
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12, err_msg=path)
    elif isinstance(want, dict):
        assert isinstance(got, dict) and list(got) == list(want), (path, got)
        for k in want:
            close(got[k], want[k], f"{path}.{k}")
    elif isinstance(want, (list, tuple)):
        assert isinstance(got, (list, tuple)) and len(got) == len(want), (path, got)
        for i, (g, w) in enumerate(zip(got, want)):
            close(g, w, f"{path}[{i}]")
    else:
        assert got == want, (path, got, want)


def lazily_conjugated(tree: Any) -> bool:
    """The premise: some leaf of torch's own answer has the conjugate bit set, which
    ``.numpy()`` refuses."""
    lazy = [
        leaf
        for leaf in tree_leaves(tree)
        if isinstance(leaf, torch.Tensor) and leaf.is_conj()
    ]
    for leaf in lazy:
        with pytest.raises(RuntimeError, match="conjugate bit set"):
            leaf.numpy()
    return bool(lazy)


@pytest.mark.parametrize("name", ["conj_out", "conj_pair", "conj_adjoint"])
def test_a_lazily_conjugated_output_is_answered_on_evaluate_and_jvp(c, name):
    fn = getattr(F, name)
    want_out, want_jvp = f.jvp(fn, (t(X),), (t(V),))
    assert lazily_conjugated(want_out) and lazily_conjugated(want_jvp)
    # the math: the jvp is the directional derivative of the complex output
    h = 1e-6
    fd = [
        (a - b) / (2 * h)
        for a, b in zip(tree_leaves(fn(t(X + h * V))), tree_leaves(fn(t(X - h * V))))
    ]
    for got_leaf, fd_leaf in zip(tree_leaves(want_jvp), fd):
        torch.testing.assert_close(
            got_leaf.resolve_conj(), fd_leaf.resolve_conj(), rtol=1e-6, atol=1e-8
        )
    got, _ = answer(post(c, name, "evaluate", [X]), "output")
    close(got, want_out)
    got, doc = answer(
        post(c, name, "jvp", [X], tangents=arr(V), return_output=True), "jvp"
    )
    close(got, want_jvp)
    close(wire.decode_tree(doc["output"], limits=COMPLEX), want_out)
    # per example, and a stack of tangents: vmap's answers
    xs, vs = np.stack([X, -X, 2 * X]), np.stack([V, X, -V])
    got, _ = answer(post(c, name, "evaluate", [xs], batched=True), "output")
    close(got, f.vmap(fn)(t(xs)))
    got, _ = answer(
        post(c, name, "jvp", [X], tangents=arr(vs), batched_vectors=True), "jvp"
    )
    close(got, f.vmap(lambda v: f.jvp(fn, (t(X),), (v,))[1])(t(vs)))
    # .npz (and .npy for a single array), as the SDK reads them
    r = c.post(
        f"/v1/functions/{name}/jvp",
        json={"inputs": [arr(X)], "tangents": arr(V), "return_output": True},
        headers={"accept": "application/x-npz"},
    )
    assert r.status_code == 200, r.text
    trees, _ = wire.read_result_npz(r.content, COMPLEX)
    close(trees["jvp"], want_jvp)
    close(trees["output"], want_out)
    if name != "conj_pair":
        for endpoint, extra, want in (
            ("evaluate", {}, want_out),
            ("jvp", {"tangents": arr(V)}, want_jvp),
        ):
            r = c.post(
                f"/v1/functions/{name}/{endpoint}",
                json={"inputs": [arr(X)], **extra},
                headers={"accept": "application/x-npy"},
            )
            assert r.status_code == 200, r.text
            close(np.load(io.BytesIO(r.content)), want)


def test_a_lazily_conjugated_outputs_pullback_and_refusals_are_torchs(c):
    """vjp of complex cotangents (torch.func.vjp's pullback; its vmap over a stack of them
    raises in torch, "Batching rule not implemented for aten::_neg_view", so the stack is
    compared with one pullback per cotangent), and jacrev's refusal of the complex output."""
    fn = F.conj_out
    cts = RNG.standard_normal((2, 4)) + 1j * RNG.standard_normal((2, 4))
    _, pull = f.vjp(fn, t(X))
    want = torch.stack([pull(torch.from_numpy(ct))[0] for ct in cts])
    # the math: Re(conj(c) . dz/dx) by finite differences
    h = 1e-6
    dz = (fn(t(X + h)) - fn(t(X - h))).resolve_conj().numpy() / (2 * h)
    np.testing.assert_allclose(
        want.numpy(), (np.conj(cts) * dz).real, rtol=1e-6, atol=1e-8
    )
    spelled = lambda z: {
        "dtype": "complex128",
        "shape": list(z.shape),
        "data": np.stack([z.real, z.imag], -1).tolist(),
    }
    got, _ = answer(post(c, "conj_out", "vjp", [X], cotangents=spelled(cts[0])), "vjp")
    close(got, want[0])
    got, _ = answer(
        post(c, "conj_out", "vjp", [X], cotangents=spelled(cts), batched_vectors=True),
        "vjp",
    )
    close(got, want)
    # hvp's c . H t: the jvp of that pullback, as torch.func composes them
    ct = torch.from_numpy(cts[0])
    want_hvp = f.jvp(lambda x: f.vjp(fn, x)[1](ct)[0], (t(X),), (t(V),))[1]
    got, _ = answer(
        post(c, "conj_out", "hvp", [X], cotangents=spelled(cts[0]), tangents=arr(V)),
        "hvp",
    )
    close(got, want_hvp)
    with pytest.raises(RuntimeError, match="Expected all outputs to be real"):
        f.jacrev(fn)(t(X))
    body = assert_problem(post(c, "conj_out", "jacobian", [X]), 422, "invalid_input")
    assert "Expected all outputs to be real" in body["detail"], body


def test_a_lazily_conjugated_aux_is_answered_on_every_route(c):
    out_fn = lambda x: F.conj_aux(x)[0]
    aux = F.conj_aux(t(X))[1]
    jac, got_aux = f.jacrev(F.conj_aux, has_aux=True)(t(X))
    assert lazily_conjugated(aux) and lazily_conjugated(got_aux)
    torch.testing.assert_close(got_aux, aux)
    xs = np.stack([X, -X])
    batched_jac, batched_aux = f.vmap(f.jacrev(F.conj_aux, has_aux=True))(t(xs))
    routes = (
        ("evaluate", {}, out_fn(t(X))),
        ("jacobian", {}, jac),
        ("jacobian", {"mode": "fwd"}, jac),
        ("jacobian", {"chunk_size": 1}, jac),
        ("hessian", {}, f.hessian(out_fn)(t(X))),
        ("jvp", {"tangents": arr(V)}, f.jvp(out_fn, (t(X),), (t(V),))[1]),
        (
            "vjp",
            {"cotangents": arr(np.array(1.5))},
            f.vjp(out_fn, t(X))[1](torch.tensor(1.5, dtype=torch.float64))[0],
        ),
        ("hvp", {"tangents": arr(V)}, f.jvp(f.grad(out_fn), (t(X),), (t(V),))[1]),
    )
    for endpoint, options, want in routes:
        got, doc = answer(
            post(c, "conj_aux", endpoint, [X], **options),
            {"evaluate": "output"}.get(endpoint, endpoint),
        )
        close(got, want, endpoint)
        close(wire.decode_tree(doc["aux"], limits=COMPLEX), aux, endpoint)
    got, doc = answer(post(c, "conj_aux", "jacobian", [xs], batched=True), "jacobian")
    close(got, batched_jac)
    close(wire.decode_tree(doc["aux"], limits=COMPLEX), batched_aux)
    r = c.post(
        "/v1/functions/conj_aux/jacobian",
        json={"inputs": [arr(X)]},
        headers={"accept": "application/x-npz"},
    )
    assert r.status_code == 200, r.text
    trees, _ = wire.read_result_npz(r.content, COMPLEX)
    close(trees["jacobian"], jac)
    close(trees["aux"]["phase"], aux["phase"])


@pytest.mark.parametrize("transport", ["binary", "json"])
def test_the_sdk_reads_them_as_torch_answers(c, transport):
    with sdk_over(c) as sdk:
        close(sdk.evaluate("conj_out", X, transport=transport), F.conj_out(t(X)))
        jac, aux = sdk.jacobian("conj_aux", X, transport=transport)
        want_jac, want_aux = f.jacrev(F.conj_aux, has_aux=True)(t(X))
        close(jac, want_jac)
        close(aux["phase"], want_aux["phase"])


def test_the_torch_adapter_runs_them_under_torch_func_as_in_process(c):
    """``remote(client, name)`` under torch.func: jvp (and vmap of it), and the pullback
    of a real loss of the conjugated output (|z|^2's gradient), as the function in-process."""
    from jacobian_client.torch import remote

    tx, tv = t(X), t(V)
    with sdk_over(c) as sdk:
        for name in ("conj_out", "conj_pair"):
            g, fn = remote(sdk, name), getattr(F, name)
            torch.testing.assert_close(f.jvp(g, (tx,), (tv,)), f.jvp(fn, (tx,), (tv,)))
            got = f.vmap(lambda v, g=g: f.jvp(g, (tx,), (v,))[1])(t(np.stack([V, X])))
            want = f.vmap(lambda v, fn=fn: f.jvp(fn, (tx,), (v,))[1])(
                t(np.stack([V, X]))
            )
            torch.testing.assert_close(got, want)
        g = remote(sdk, "conj_out")
        loss = lambda h: lambda x: (h(x).abs() ** 2).sum()
        torch.testing.assert_close(f.grad(loss(g))(tx), f.grad(loss(F.conj_out))(tx))
