"""PyTorch's own torch.func test cases, round 39, replayed over HTTP against
tests/parity39_functions.py and compared with in-process torch.func.

1. State a function keeps across calls that the kept-state walk did not see until this
   round (round 37's lead): an ``array.array`` and a ``bytearray`` written in place, a
   numpy array past the old 64 KiB bound (a 256 x 256 running buffer), and a Python
   generator's paused frame (``next(STEPS)``: a count in a local, a loop over
   ``range``). The engine calls the function several times for one request (a
   Hessian's strategies and checks, forward mode's check, a jvp's output beside its
   products) where torch.func calls it once: each call stepped the state, a Hessian was
   answered up to 13 steps on (``39 x`` where torch's is ``3 x``) and every later
   request saw the steps. And the app's warm-up (a Jacobian of each function before it
   says ready) stepped each once: a first request answered one step on.

One in-process app serves the module, its engine a process of its own (no server start).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import pytest
import torch

from .conftest import ready_app
from .test_parity_round7 import answer, post, wire_tree

f = torch.func
X = np.array([1.0, -2.0, 0.5])
XS = np.stack([X, 2 * X, -0.5 * X])
V = np.array([0.3, 0.1, -1.0])


@pytest.fixture(scope="module")
def c():
    with ready_app("tests.parity39_functions", warmup=True) as client:
        client.first_state = state(client)  # (as the warm-ups left it)
        yield client


def state(c) -> np.ndarray:
    return answer(post(c, "state_of", "evaluate", [np.array(0.0)]), "output")[0]


# name -> (the state's index in state_of, its value after one step from s)
KEPT: dict[str, tuple[int, Callable[[float], float]]] = {
    "arr_count": (0, lambda s: s + 1),
    "bytes_count": (1, lambda s: (s + 1) % 256),
    "big_count": (2, lambda s: s + 1),
    "gen_count": (4, lambda s: s + 1),
    "range_count": (5, lambda s: s + 1),
}
TX, TV = torch.from_numpy(X), torch.from_numpy(V)
ROUTES: list[tuple[str, dict[str, Any], Callable[[Callable], torch.Tensor]]] = [
    ("hessian", {}, lambda g: f.hessian(g)(TX)),
    ("jacobian", {"mode": "fwd"}, lambda g: f.jacfwd(g)(TX)),
    ("jvp", {"tangents": wire_tree(V)}, lambda g: f.jvp(g, (TX,), (TV,))[1]),
    ("hvp", {"tangents": wire_tree(V)}, lambda g: f.jvp(f.grad(g), (TX,), (TV,))[1]),
]


def test_the_warm_ups_leave_the_state_as_the_import_left_it(c):
    """A warm-up's Jacobian is no call a client made: each function's state (and
    ``STEPS``, made at import and not started) as in-process before torch.func's first
    call (before: each stepped once, the generator started, the first request one step
    on)."""
    np.testing.assert_array_equal(c.first_state, np.zeros(6))


@pytest.mark.parametrize("name", list(KEPT))
def test_state_in_a_buffer_or_a_generator_steps_once_a_request_as_torchs_one_call(c, name):
    index, step = KEPT[name]
    for route, options, torchs in ROUTES:
        before = state(c)
        got, _ = answer(post(c, name, route, [X], **options), route)
        after = state(c)
        scale = step(before[index])
        assert after[index] == scale, (route, before[index], after[index])  # before: up to 13 steps
        if name == "big_count":
            assert after[3] == scale  # (the whole buffer, not its first item only)
        want = torchs(lambda z: (z**3).sum() * scale).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-12, err_msg=route)


@pytest.mark.parametrize("route, torchs", [("jacobian", f.jacrev), ("hessian", f.hessian)])
def test_a_batched_request_steps_a_generator_once_as_torchs_vmap(c, route, torchs):
    before = state(c)[4]
    got, _ = answer(post(c, "gen_vec", route, [XS], batched=True), route)
    assert state(c)[4] == before + 1
    scale = before + 1
    want = f.vmap(torchs(lambda z: z**2 * scale))(torch.from_numpy(XS)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-12)
