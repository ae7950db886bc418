"""Sparse Jacobians, round 20: type branches round 19's watch did not see (code made by
``exec``, ``builtins.type``, ``type`` under another name, a function that takes the
profiler down around its check, a thread that checks or computes). Each answer against
torch.func.jacrev in this process.

One in-process app serves every case (no new server process).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests import sparse20_functions as s20

from .conftest import ready_app
from .test_sparse_round17 import sparse_answer  # (a 200's matrix as scipy CSR, and its meta)


@pytest.fixture(scope="module")
def client():
    with ready_app("tests.sparse20_functions") as c:
        yield c


# ------------------------------------------------------------------ type reads the watch missed


@pytest.mark.parametrize("check", sorted(s20.COUPLED))
def test_a_type_branch_the_watch_could_not_see_is_checked(client, check):
    """``u[0] if <u's type is torch.Tensor> else u[0].detach()``, the check made where
    round 19's watch did not look: in code ``exec`` made (named ``<string>``, taken as a
    library's), through ``builtins.type``, ``type`` bound to a module global or to an
    argument's default, in a helper called while the function had taken the profiler
    down (``sys.setprofile(None)``, then put back; or from C, by ``map``, put back or not, by
    its name or another), or in a thread the function starts; or through what the tracer's tensors have
    otherwise than jacrev's (``vars(u)``, ``u.__torch_dispatch__``, ``u.__module__``, and
    ``getattr(u, "value", u)``, an unwrapping that took the tracer's own plain value,
    whose derivative is nothing). Each was an exact,
    unchecked 200 with column 0 missing (the tracer's tensors are a subclass: the
    detached arm). Now the name, the binding, the profiler's replacement, the thread
    started and the attribute read are seen, and the pattern is checked against the
    products at every request (the second point: the cached pattern)."""
    fn = s20.COUPLED[check]
    for u in (np.array([0.5, 1.5, -0.7, 2.0, 1.1]), np.array([1.5, -0.5, 0.3, 0.9, -1.2])):
        got, meta = sparse_answer(client, f"coupled20_{check}", [u])
        want = torch.func.jacrev(fn)(torch.from_numpy(u)).numpy()
        assert want[1:, 0].all()  # (the coupling the trace's arm left out)
        np.testing.assert_allclose(got.toarray(), want, rtol=1e-12, atol=1e-12)
        assert any(n.startswith("reads a tensor's type") for n in meta["notes"]), meta


def test_names_arguments_and_exec_code_that_are_no_type_leave_the_pattern_unchecked():
    """The other side: globals, closure variables and arguments bound to anything but
    ``type``, and ``exec``'s code that reads no type, leave an exact pattern unchecked
    (no more products than it needs), and the hook is left as found."""
    import sys

    from jacobian_service.sparsity.detect import TYPE_NOTE, trace_jacobian

    made: dict = {}
    exec("def scale(u):\n    return u * 2.0\n", made)
    shift = 1

    def chain(u, k=3):
        return made["scale"](u) * u.roll(shift) + k

    u = torch.linspace(0.5, 1.5, 5, dtype=torch.float64)
    p = trace_jacobian(chain, [u])
    assert p.exact and not [n for n in p.notes if n.startswith(TYPE_NOTE)], p.notes
    assert sys.getprofile() is None


def test_a_finalizer_run_during_the_trace_is_not_the_functions_type_read(client):
    """A ``__del__`` that reads its object's class (anyio's memory streams warn so when
    dropped unclosed) ran inside the trace, from a dropped reference or the collector, and
    the watch took it for the function's: a chain got ``TYPE_NOTE`` and one more product
    at every request (test_sparse_round7's implicit steps failed so, now and then, when the
    collector ran an anyio stream's ``__del__`` mid-trace). A finalizer computes nothing
    the function returns: it is not watched. The chain is exact, unchecked, 3 products (no checking one)."""
    u = np.array([0.5, 1.5, -0.7, 2.0, 1.1])
    got, meta = sparse_answer(client, "chain20_dropping", [u])
    np.testing.assert_allclose(got.toarray(), torch.func.jacrev(s20.chain20_dropping)(torch.from_numpy(u)).numpy(), rtol=1e-12, atol=1e-12)
    assert (meta["exact"], meta["notes"], meta["products"]) == (True, [], 3), meta  # (an odd ring: 3 colours)
