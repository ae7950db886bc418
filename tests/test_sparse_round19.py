"""Sparse Jacobians and Hessians, round 19: functions that branch on their tensors' type
or autograd state (``type(x) is torch.Tensor``, ``x.__class__``, a helper that checks,
functorch's own query, ``grad_fn``, ``is_leaf``) with arms of the same values but not the
same derivative; functions that read their values by ``tolist``. Each answer against
torch.func (jacrev, hessian) in this process.

One in-process app serves every case (no new server process).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests import sparse19_functions as s19

from .conftest import ready_app
from .test_sparse_round17 import sparse_answer  # (a 200's matrix as scipy CSR, and its meta)


@pytest.fixture(scope="module")
def client():
    with ready_app("tests.sparse19_functions") as c:
        yield c


# ------------------------------------------------------------------ a branch on a tensor's type


@pytest.mark.parametrize("check", ["type_is", "class_attr", "type_name", "helper", "functorch_state", "grad_fn", "is_leaf"])
def test_a_type_branch_of_the_same_values_is_jacrevs_branch(client, check):
    """``u[0] if type(u) is torch.Tensor else u[0].detach()`` (and the same through
    ``__class__``, ``type(u).__name__``, a helper that runs no op, functorch's
    ``is_functorch_wrapped_tensor``, ``(u * 2).grad_fn``, ``u[1:].is_leaf``): jacrev's
    tensors are plain ``torch.Tensor`` to Python (wrapped, computed ones with a
    ``grad_fn``), the tracer's a subclass (not wrapped, recording nothing), so the
    trace took the detached arm: the diagonal and its neighbour, where jacrev couples every element to
    the first. Both arms give the same values, so nothing diverged: exact, unchecked, a
    200 with column 0 missing. Now the trace sees the type read and the pattern is
    checked against the products at every request (the second point: the cached
    pattern)."""
    name = f"coupled_{check}"
    fn = s19.COUPLED[check]
    for u in (np.array([0.5, 1.5, -0.7, 2.0, 1.1]), np.array([1.5, -0.5, 0.3, 0.9, -1.2])):
        got, meta = sparse_answer(client, name, [u])
        want = torch.func.jacrev(fn)(torch.from_numpy(u)).numpy()
        assert want[1:, 0].all()  # (the coupling the trace's arm left out)
        np.testing.assert_allclose(got.toarray(), want, rtol=1e-12, atol=1e-12)
        assert any(n.startswith("reads a tensor's type") for n in meta["notes"]), meta


def test_a_hessian_through_a_type_branch_is_torchs(client):
    """The same for a Hessian: an energy whose coupling ``u**2 * u[0]**2`` is detached
    from u[0] unless its tensor is a plain ``torch.Tensor``."""
    u = np.array([0.3, -0.2, 0.9, 0.4, 1.2, -0.7])
    got, meta = sparse_answer(client, "type_energy", [u], "hessian")
    want = torch.func.hessian(s19.type_energy)(torch.from_numpy(u)).numpy()
    assert want[1:, 0].all()
    np.testing.assert_allclose(got.toarray(), want, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ values read as Python lists


def test_a_function_that_reads_tolist_is_traced_at_each_point(client):
    """``u.argsort().tolist()`` (a loop over the values' order) and ``sum(u.tolist())``:
    jacrev's tensors give their values (constants to the derivative), the tracer's raised
    ('.tolist() is not supported for tensor subclasses'), so every request was probed
    (dense derivatives at random points: ``source`` probe), and for the sorted pairs the
    probed pattern was proven wrong by the products at each point and computed densely
    (n products). Now tolist is a value read: traced at each point, exact there, 2
    products for the pairs (each row two entries of the order), and jacrev's at another
    point of another order."""
    for u in (np.array([0.5, 1.5, -0.7, 2.0, 1.1, -0.2]), np.array([2.0, -1.5, 0.7, 0.1, -1.1, 0.9])):
        got, meta = sparse_answer(client, "sorted_pairs", [u])
        np.testing.assert_allclose(got.toarray(), torch.func.jacrev(s19.sorted_pairs)(torch.from_numpy(u)).numpy(), rtol=1e-12, atol=1e-12)
        assert (meta["source"], meta["exact"], meta["value_dependent"], meta["products"]) == ("detected", True, True, 2), meta
        assert any("tolist" in n for n in meta["notes"]), meta
        got, meta = sparse_answer(client, "listed_energy", [u], "hessian")
        np.testing.assert_allclose(got.toarray(), torch.func.hessian(s19.listed_energy)(torch.from_numpy(u)).numpy(), rtol=1e-12, atol=1e-12)
        assert meta["source"] == "detected", meta


def test_the_type_watch_keeps_another_profilers_hook_and_then_checks_every_pattern():
    """The watch is ``sys.setprofile``: under a profiler that holds it already (cProfile,
    an IDE's), the watch steps aside (the profiler's hook stays, and sees the function's
    calls) and every traced pattern is checked, since no type read could be seen; with
    no profiler a function that reads no type is not checked, and the hook is left as it
    was found, after a failed trace too. A guard of the watch's contract (no defect
    found here)."""
    from jacobian_service.sparsity.detect import TYPE_NOTE, TraceError, trace_jacobian

    def chain(u):
        return u * u.roll(1)

    def failing(u):
        raise ValueError("no trace")

    u = torch.linspace(0.5, 1.5, 5, dtype=torch.float64)
    assert not [n for n in trace_jacobian(chain, [u]).notes if n.startswith(TYPE_NOTE)]
    seen = []

    def profiler(frame, event, arg):
        seen.append(frame.f_code.co_name)

    import sys

    sys.setprofile(profiler)
    try:
        notes = trace_jacobian(chain, [u]).notes
        kept = sys.getprofile() is profiler
    finally:
        sys.setprofile(None)
    assert kept and "chain" in seen
    assert [n for n in notes if n.startswith(TYPE_NOTE)] == [f"{TYPE_NOTE} (another profiler was installed: not watched)"]
    with pytest.raises(TraceError, match="no trace"):
        trace_jacobian(failing, [u])
    assert sys.getprofile() is None


def test_type_reads_are_watched_in_installed_packages_too():
    """Only torch's, numpy's, scipy's, the service's and the standard library's code is
    not watched. The standard library's folder (``sysconfig``'s ``stdlib``: a venv's
    ``lib/python3.x``) holds ``site-packages``, so every installed package, a user's
    functions packaged and installed among them, was taken as the standard library and
    its ``type(x)`` branches went unseen: a pattern exact and unchecked."""
    import os
    import sysconfig

    from jacobian_service.sparsity import type_reads

    stdlib = sysconfig.get_paths()["stdlib"]
    src = "def f(u):\n    return u * u[0] if type(u) is object else u\n"

    def code_at(path):
        return next(c for c in compile(src, path, "exec").co_consts if hasattr(c, "co_code"))

    watch = type_reads.TypeWatch()
    watch.codes = {code_at(os.path.join(stdlib, "site-packages", "physics", "residuals.py")),
                   code_at(os.path.join(stdlib, "json", "decoder.py"))}
    assert watch.reads() == ["f (residuals.py:1)"]
