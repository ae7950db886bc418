"""PyTorch's own torch.func test cases, round 16, replayed over HTTP against
tests/parity16_functions.py and compared with in-process torch.func (values, shapes,
dtypes; torch's error where torch raises).

1. test_eager_transforms.py's TestJac cases under vmap (per-example Jacobians, batched
   requests) at values where torch's vmap of a pullback is wrong for some examples and
   right for others of the same shapes (cdist where points coincide).
2. test_vmap.py's out_dims=None for an output that depends on shared inputs alone,
   through the SDK's torch adapter (``remote``) as in-process.

One in-process app serves the module (no server start), as rounds 7-15.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import pytest
import torch
from torch.func import jacrev, vmap

from . import parity16_functions as F
from .conftest import ready_app
from .test_parity_round7 import answer, post, same, t


@pytest.fixture(scope="module")
def c() -> Iterator[Any]:
    with ready_app("tests.parity16_functions") as client:
        yield client


def differences(f: Any, x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Central differences of f at x (float64): the Jacobian, output dims first."""
    cols = [(f(x + eps * e) - f(x - eps * e)) / (2 * eps) for e in torch.eye(x.numel(), dtype=x.dtype)]
    return torch.stack(cols, -1)


def test_every_example_of_a_per_example_jacobian_is_checked(c):
    """vmap(jacrev(f)) of cdist is wrong (1.0 off) at an example with two distinct
    points, right at one whose points all coincide: the service checked the first
    example alone against one VJP, once per signature, so [[0, 0], [0, 1]] answered the
    second example 1.0 off with a 200, and so did every later request of that shape
    ([[0, 1], [1, 0]] after [[0, 0], [0, 0]]). Each example is jacrev(f, chunk_size=1)'s
    (the SPEC: the result never depends on chunk_size), which central differences
    confirm; torch's own vmap(jacrev(f)) is the wrong one."""
    f = F._self_distances
    xs = np.array([[0.0, 0.0], [0.0, 1.0]])
    want = torch.stack([jacrev(f, chunk_size=1)(x) for x in t(xs)])
    assert not torch.allclose(vmap(jacrev(f))(t(xs)), want)  # torch's vmap: the second example off
    assert torch.allclose(want[1], differences(f, t(xs[1])), atol=1e-6)
    got, _ = answer(post(c, "self_distances", "jacobian", [xs], batched=True), "jacobian")
    same(got, want, rtol=1e-12)
    # a later request of the same signature, after one whose examples all pass
    later = np.array([[0.0, 1.0], [1.0, 0.0]])
    answer(post(c, "self_distances_later", "jacobian", [np.zeros((2, 2))], batched=True), "jacobian")
    got, _ = answer(post(c, "self_distances_later", "jacobian", [later], batched=True), "jacobian")
    same(got, torch.stack([jacrev(f, chunk_size=1)(x) for x in t(later)]), rtol=1e-12)
