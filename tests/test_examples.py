"""The built-ins mean what SPEC 2 says, checked from their definitions, not from themselves."""

from __future__ import annotations

import math

import numpy as np
import torch

from jacobian_service.examples import add_square, lorenz96, mlp, no_grad_square, planar_arm, polar, sin, sin_aux, softmax, sum_sin

X = torch.tensor([0.3, -1.2, 2.0, 0.7], dtype=torch.float64)


def test_elementwise_and_argnums_examples():
    np.testing.assert_allclose(torch.func.jacrev(sin)(X), torch.diag(torch.cos(X)))
    out, aux = sin_aux(X)
    assert torch.equal(out, aux) and torch.equal(out, torch.sin(X))
    np.testing.assert_allclose(torch.func.hessian(sum_sin)(X), torch.diag(-torch.sin(X)))
    jx, jy = torch.func.jacrev(add_square, argnums=(0, 1))(X, 2 * X)
    np.testing.assert_allclose(jx, torch.eye(4))
    np.testing.assert_allclose(jy, torch.diag(4 * X))
    np.testing.assert_allclose(torch.func.jacrev(no_grad_square)(X), torch.eye(4))
    np.testing.assert_allclose(no_grad_square(X), X - X**2)


def test_polar_and_softmax():
    r, th = X.abs() + 1, X
    x, y = polar(r, th)
    np.testing.assert_allclose(x, r * torch.cos(th))
    np.testing.assert_allclose(y, r * torch.sin(th))
    s = torch.softmax(X, -1)
    np.testing.assert_allclose(torch.func.jacrev(softmax)(X), torch.diag(s) - torch.outer(s, s), atol=1e-15)


def test_planar_arm_is_the_end_effector_of_unit_links():
    angles = [0.3, -1.2, 2.0]
    x = y = total = 0.0
    for a in angles:
        total += a
        x, y = x + math.cos(total), y + math.sin(total)
    got = planar_arm(torch.tensor(angles, dtype=torch.float64))
    assert got.shape == (2,)
    np.testing.assert_allclose(got, [x, y])


def test_mlp_weights_follow_the_seeded_generator():
    gen = torch.Generator().manual_seed(0)
    w1 = torch.randn(256, 128, generator=gen) / math.sqrt(128)
    w2 = torch.randn(64, 256, generator=gen) / 16
    x = torch.randn(128, generator=torch.Generator().manual_seed(1))
    np.testing.assert_allclose(mlp(x), w2 @ torch.tanh(w1 @ x), rtol=1e-6)


def test_lorenz96_is_one_rk4_step():
    x = torch.linspace(-3, 8, 10, dtype=torch.float64)
    n, dt, forcing = 10, 0.01, 8.0

    def rhs(v: np.ndarray) -> np.ndarray:
        return np.array([(v[(i + 1) % n] - v[i - 2]) * v[i - 1] - v[i] + forcing for i in range(n)])

    v = x.numpy()
    k1 = rhs(v)
    k2 = rhs(v + dt / 2 * k1)
    k3 = rhs(v + dt / 2 * k2)
    k4 = rhs(v + dt * k3)
    np.testing.assert_allclose(lorenz96(x), v + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4), rtol=1e-12)
    # I + dt * (the RHS's banded Jacobian) to first order in dt
    jac = torch.func.jacrev(lorenz96)(x).numpy()
    rhs_jac = np.zeros((n, n))
    for i in range(n):
        rhs_jac[i, (i + 1) % n] += v[i - 1]
        rhs_jac[i, i - 2] -= v[i - 1]
        rhs_jac[i, i - 1] += v[(i + 1) % n] - v[i - 2]
        rhs_jac[i, i] -= 1
    np.testing.assert_allclose(jac, np.eye(n) + dt * rhs_jac, atol=5 * dt**2 * np.abs(rhs_jac).max() ** 2)
