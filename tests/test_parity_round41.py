"""Round 41: test_eager_transforms.py's cases of code that counts on a differentiating
transform, replayed over HTTP (tests/parity41_functions.py) on one real server and
compared with in-process torch.func, route by route: values, dtypes and shapes, or the
function's 500 in the words torch raises.

A gradient hook (``y.register_hook``) or ``assert x.requires_grad`` runs under
``jacrev``, ``torch.func.hessian``, ``vmap(jacrev)`` and an HVP's gradient, where the
floating inputs require grad, and fails in a plain call. The engine called the function
plainly first on those routes (its output's sizes, a check for random draws), so the
Hessian, the batched Jacobian and Hessian, the HVP and the sparse routes were that 500
where torch answers, and ``Tensor.retain_grad()`` (TestComposability) was refused in the
plain call's words ("can't retain_grad on Tensor that has requires_grad=False"), not
torch's ("... inside of a function being transformed by a functorch transform"). Now a
plain call that fails is made again as reverse mode makes it (``calling.look``).

The rest of the cases walked answer as torch does (or as the README documents: a
function that fails in reverse mode fails so whatever ``mode``; where ``vmap`` refuses,
one example at a time; a Hessian torch's forward-over-reverse cannot run, reverse over
reverse checked against differences): saved tensor hooks (TestComposability), a
Function without ``setup_context``, ``torch.autograd.functional`` inside, out= ops and
views of ``unbind`` mutated (TestFunctionalize), a HigherOrderOperator with vmap and
grad rules only (TestHigherOrderOperatorInteraction), ``tolist`` and ``repr`` inside,
an ``nn.Module``'s forward hook and full backward hook (an autograd.Function without
``setup_context``: reverse mode refuses it, forward mode passes it by, as in torch).
"""

from __future__ import annotations

import os
import time
import warnings
from typing import Any, Callable

import httpx
import numpy as np
import pytest
import torch

from . import parity41_functions as F
from .conftest import assert_problem, live_server
from .test_parity_round7 import post, same, t, wire_tree

f = torch.func
X = np.array([0.3, -0.7, 1.1])
XS = np.stack([X, -2 * X])
V = np.array([0.5, 1.5, -1.0])


@pytest.fixture(scope="module")
def c():
    with live_server(functions="tests.parity41_functions", workers=1) as (url, proc):
        with httpx.Client(base_url=url, timeout=120) as client:
            yield client


def hvp(fn: Callable[..., Any]) -> Callable[..., Any]:
    return lambda x, v: f.jvp(f.grad(fn), (x,), (v,))[1]


def cotangent(fn: Callable[..., Any], x: np.ndarray) -> np.ndarray:
    """Ones shaped as the output reverse mode sees (a plain call may refuse to run; where
    reverse mode refuses too, the functions here have one scalar output)."""
    try:
        return np.ones(tuple(f.vjp(fn, t(x))[0].shape), dtype=x.dtype)
    except RuntimeError:
        return np.ones((), dtype=x.dtype)


# (route, request options, torch.func's computation of it) for one function and input
ROUTES: dict[str, tuple[str, str, dict[str, Any], Callable[..., Any]]] = {
    "evaluate": ("evaluate", "output", {}, lambda fn, x: fn(t(x))),
    "jacobian": ("jacobian", "jacobian", {}, lambda fn, x: f.jacrev(fn)(t(x))),
    "jacobian rev": ("jacobian", "jacobian", {"mode": "rev"}, lambda fn, x: f.jacrev(fn)(t(x))),
    # (README: whatever mode asks, jacrev's Jacobian, or jacrev's error)
    "jacobian fwd": ("jacobian", "jacobian", {"mode": "fwd"}, lambda fn, x: f.jacrev(fn)(t(x))),
    "jvp": ("jvp", "jvp", {"tangents": [wire_tree(V)]}, lambda fn, x: f.jvp(fn, (t(x),), (t(V),))[1]),
    "vjp": ("vjp", "vjp", {}, lambda fn, x: f.vjp(fn, t(x))[1](t(cotangent(fn, x)))[0]),
    "hessian": ("hessian", "hessian", {}, lambda fn, x: f.hessian(fn)(t(x))),
    "hvp": ("hvp", "hvp", {"tangents": [wire_tree(V)]}, lambda fn, x: hvp(fn)(t(x), t(V))),
    "batched jacobian": ("jacobian", "jacobian", {"batched": True}, lambda fn, x: f.vmap(f.jacrev(fn))(t(XS))),
    "batched hessian": ("hessian", "hessian", {"batched": True}, lambda fn, x: f.vmap(f.hessian(fn))(t(XS))),
    "sparse jacobian": ("jacobian", "jacobian", {"sparsity": "auto", "sparse_format": "dense"},
                        lambda fn, x: f.jacrev(fn)(t(x))),
    "sparse hessian": ("hessian", "hessian", {"sparsity": "auto", "sparse_format": "dense"}, lambda fn, x: f.hessian(fn)(t(x))),
}


def served(c, name: str, route: str, x: np.ndarray = X) -> httpx.Response:
    endpoint, _, options, _ = ROUTES[route]
    options = dict(options)
    if route == "vjp":
        options["cotangents"] = [wire_tree(cotangent(getattr(F, name), x))]
    return post(c, name, endpoint, [XS if options.get("batched") else x], **options)


def replayed(c, name: str, route: str, x: np.ndarray = X) -> None:
    """The service's answer on ``route`` is torch.func's: its value, or its error's words."""
    _, key, _, compute = ROUTES[route]
    fn = getattr(F, name)
    response = served(c, name, route, x)
    try:
        with warnings.catch_warnings():  # (jvp through a module's backward hook warns of torch.jit.script)
            warnings.simplefilter("ignore")
            want = compute(fn, x)
    except Exception as exc:  # torch raises: the function's 500 in torch's words
        body = assert_problem(response, 500, "function_error")
        words = f"{type(exc).__name__}: {exc}"
        assert body["detail"].startswith(words[:300]), (route, body["detail"], words)
        return
    assert response.status_code == 200, (route, response.text)
    got = wire_tree_decode(response.json()[key])
    if route.startswith("sparse"):  # (its dense form is the 2-D matrix: outputs x inputs)
        want = want.reshape(got.shape)
    same(got, want, route)


def wire_tree_decode(doc: Any) -> Any:
    from jacobian_client import wire

    return wire.decode_tree(doc)


EVERY_ROUTE = list(ROUTES)


@pytest.mark.parametrize("name", ["hooked", "needs_grad"])
def test_code_counting_on_reverse_mode_is_answered_as_torch_on_every_route(c, name):
    # Before: hessian, hvp, batched jacobian/hessian and both sparse routes a 500
    # ("cannot register a hook on a tensor that doesn't require gradient",
    # "AssertionError: x.requires_grad") where torch answers; evaluate and jvp fail in
    # torch too, in the same words
    for route in EVERY_ROUTE:
        replayed(c, name, route)


def test_retain_grad_inside_is_refused_in_torchs_words_on_every_route(c):
    # test_retain_grad_inside_transform. Before: the Hessian, HVP and batched routes said
    # "can't retain_grad on Tensor that has requires_grad=False" (a plain call's words)
    for route in EVERY_ROUTE:
        replayed(c, "retain", route)
    detail = served(c, "retain", "batched hessian").json()["detail"]
    assert "inside of a function being transformed by a functorch transform" in detail


@pytest.mark.parametrize(("name", "routes"), [
    # test_transforms_dont_support_saved_tensor_hooks, test_jvp_supports_saved_tensor_hooks
    ("saved_hooks_sum", ["evaluate", "jacobian", "jacobian fwd", "jvp", "vjp", "hessian", "hvp", "batched jacobian"]),
    # test_autograd_function_no_setup_context
    ("no_setup_context", ["evaluate", "jacobian", "jvp", "vjp", "hessian", "batched jacobian"]),
    # test_autograd_functional_jacrev_inside_transform
    ("autograd_functional_inside", ["evaluate", "jacobian", "jvp", "vjp", "hessian", "batched jacobian"]),
    # test_tolist_with_grad (vmap refuses tolist: the batched route runs each example, README)
    ("tolist_inside", ["evaluate", "jacobian", "jacobian fwd", "jvp", "vjp", "hessian", "hvp"]),
    # test_tensor_print
    ("printed", ["evaluate", "jacobian", "jacobian fwd", "jvp", "hessian", "batched jacobian", "batched hessian"]),
    # TestHigherOrderOperatorInteraction (no jvp rule: torch.func.hessian raises KeyError,
    # reverse over reverse answers, checked: README)
    ("hop_sum_scalar", ["evaluate", "jacobian", "vjp", "jvp", "hvp", "batched jacobian"]),
    # nn.Module hooks: a full backward hook is an autograd.Function without setup_context
    # (reverse mode refuses it, forward mode passes it by), a forward hook is code
    ("module_backward_hook", EVERY_ROUTE),
    ("module_forward_hook", EVERY_ROUTE),
])
def test_the_other_cases_walked_answer_as_torch(c, name, routes):
    for route in routes:
        replayed(c, name, route)


def test_functionalize_cases_answer_as_torch(c):
    # test_functionalize_fx_out_op: an out= op into a tensor of the wrong shape
    x4 = np.array([0.1, 0.2, 0.3, 0.4], dtype=np.float32)
    for route in ("evaluate", "jacobian", "jvp", "hessian"):
        replayed_at(c, "out_op", route, x4)
    # test_multioutput_view_preserves_autograd_metadata: jvp answers, reverse mode refuses
    x23 = np.arange(6.0).reshape(2, 3) / 7
    for route in ("evaluate", "jacobian", "jacobian fwd", "jvp", "hessian"):
        replayed_at(c, "unbind_view_mutated", route, x23)


def replayed_at(c, name: str, route: str, x: np.ndarray) -> None:
    endpoint, key, options, compute = ROUTES[route]
    options = {**options, "tangents": [wire_tree(np.ones_like(x))]} if route == "jvp" else options
    fn = getattr(F, name)
    response = post(c, name, endpoint, [x], **options)
    try:
        with warnings.catch_warnings():  # (torch's deprecation of resizing an out= tensor, as the engine's)
            warnings.simplefilter("ignore", UserWarning)
            want = compute(fn, x) if route != "jvp" else f.jvp(fn, (t(x),), (t(np.ones_like(x)),))[1]
    except Exception as exc:
        body = assert_problem(response, 500, "function_error")
        assert body["detail"].startswith(f"{type(exc).__name__}: {exc}"[:300]), (route, body["detail"])
        return
    assert response.status_code == 200, (route, response.text)
    same(wire_tree_decode(response.json()[key]), want, route)


@pytest.mark.parametrize("route", ["hessian", "hvp"])
def test_a_slow_failure_is_not_called_again_past_the_deadline(route):
    """A plain call that fails is made again (calling.look) only where a second call as
    long as the first fits the request's deadline: one that took 40 s to raise was called
    again, its 500 a 504 and, past the grace, its engine killed as hung. In process: the
    function's call leaves its request 1 ms, as if it had taken the rest. Its calls are
    counted through a pipe, which the engine's kept-state replay does not put back."""
    from jacobian_service.engine.core import Engine
    from jacobian_service.registry import FunctionSpec, Input
    from jacobian_service.types import Call

    said = []
    r, w = os.pipe()

    def slow_failure(x):
        os.write(w, b".")
        said[0].deadline = time.monotonic() + 1e-3
        time.sleep(0.01)
        raise ValueError("failed")

    spec = FunctionSpec("slow_failure", slow_failure, (Input("x", shape=("n",)),))
    request = Call(spec=spec, args=[X], dtypes=["float64"], vectors=[V] if route == "hvp" else None)
    said.append(request)
    try:
        with pytest.raises(Exception, match="ValueError: failed"):
            getattr(Engine(torch.device("cpu"), 1 << 26), route)(request)
        assert os.read(r, 64) == b"."  # called once
    finally:
        os.close(r)
        os.close(w)
