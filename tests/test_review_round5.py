"""Review round 5: defects where two of the last sessions' changes meet.

SciPy's learned shape (``remote_objective``, round 20) on the session's shared server
(``cc``, as the remote-adapter tests).
"""

from __future__ import annotations

import numpy as np
import pytest

from ._remote_support import cc, url  # noqa: F401 (fixtures)

torch = pytest.importorskip("torch")
pytest.importorskip("jacobian_service.app")


# --------------------------------------------------------------------------- SciPy: a symbol named twice


def test_a_square_input_flat_from_scipy_is_sent_square(cc):
    """SciPy hands ``x`` flat; round 20 learns the input's declared shape from the 422 when
    one symbol decides it. ``("n", "n")`` (a matrix: ``det``, ``cholesky``) has one symbol,
    named twice, and each place was given the whole size: a flat 2x2 was reshaped to
    ``(4, 4)``, numpy's ``ValueError: cannot reshape array of size 4 into shape (4,4)``
    out of ``fun``, ``jac`` and every solve. Now the symbol is the size's root (``n = 2``)
    and the least-squares solve is in-process's; a size that is no square (6) is the 422
    that says to pass ``shape=``."""
    optimize = pytest.importorskip("scipy.optimize")
    import jacobian_client as jc
    from jacobian_client.scipy import remote_objective

    from . import user_functions as uf

    det = remote_objective(cc.client, "det")
    x0 = np.array([2.0, 0.5, 0.3, 1.0])
    np.testing.assert_allclose(det.fun(x0), uf.det(torch.tensor(x0).reshape(2, 2)).numpy(), rtol=1e-12)
    want_jac = torch.func.jacrev(lambda v: uf.det(v.reshape(2, 2)))(torch.tensor(x0)).numpy()
    np.testing.assert_allclose(det.jac(x0), want_jac, rtol=1e-12)
    assert cc.take() == ["jacobian+return_output", "det", "jacobian+return_output"]  # (jac: fun's, kept)

    target = np.array([3.0])
    got = optimize.least_squares(lambda x: det.fun(x) - target, x0, jac=det.jac)

    def residual(x):
        return uf.det(torch.tensor(x).reshape(2, 2)).numpy() - target

    want = optimize.least_squares(residual, x0, jac=lambda x: torch.func.jacrev(
        lambda v: uf.det(v.reshape(2, 2)))(torch.tensor(x)).numpy())
    np.testing.assert_allclose(got.x, want.x, rtol=1e-10, atol=1e-12)
    assert got.nfev == want.nfev and got.njev == want.njev

    three = remote_objective(cc.client, "det")  # a 3x3 after a 2x2: n follows the size
    x3 = np.eye(3).ravel() * 2.0
    np.testing.assert_allclose(three.fun(x3), [8.0], rtol=1e-12)
    with pytest.raises(jc.InvalidInput, match=r"SciPy's x is flat \(6 numbers\); pass shape=.*expected shape \(n, n\)"):
        remote_objective(cc.client, "det").fun(np.arange(6.0))


def test_the_one_shape_a_declared_shape_allows():
    """``_resolve``: a symbol named ``k`` times is the size's ``k``-th root, where it has
    one; two symbols, or no root, decide nothing."""
    from jacobian_client.scipy import _resolve

    assert _resolve(("n", "n"), 9) == (3, 3)
    assert _resolve(("n", 2, "n"), 18) == (3, 2, 3)
    assert _resolve(("n", "n", "n"), 27) == (3, 3, 3)
    assert _resolve(("n", "n"), 10**12) == (10**6, 10**6)
    assert _resolve(("n", 3), 12) == (4, 3)
    assert _resolve((), 1) == () and _resolve((2, 3), 6) == (2, 3)
    for declared, size in ((("n", "n"), 8), (("n", "n"), 6), (("m", "n"), 6), ((2, 3), 5), (("n", 3), 7)):
        assert _resolve(declared, size) is None, (declared, size)
    assert _resolve(("n", "n"), 0) == (0, 0) and _resolve((0, "n"), 0) == (0, 0)
