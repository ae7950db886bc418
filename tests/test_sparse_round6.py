"""Sparse Jacobians (round 6): ops the tracer took as dense (every output on every
input, ``exact: false``) now traced exactly: interpolation, cross products, FFTs,
adaptive pooling, transposed convolutions, unfold/fold, normalization layers, cdist. Each pattern is compared with
the nonzeros of dense ``torch.func.jacrev`` (never missing one, and no longer dense).
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from jacobian_service.sparsity.detect import trace_hessian, trace_jacobian


def test_tracing_does_not_import_torch_dynamo(monkeypatch):
    """torch wraps a TorchDispatchMode's __torch_dispatch__ so that its first call imports
    torch._dynamo (about 2 s): the tracer's mode paid it at the first op of the first
    trace, most of a first GET .../sparsity with warm-up off. Tracing imports it no more
    (checked in this process, with torch._dynamo unloaded and its import refused)."""
    from jacobian_service.sparsity import detect

    class Refuse:
        def find_spec(self, name, path=None, target=None):
            if name == "torch._dynamo" or name.startswith("torch._dynamo."):
                raise ImportError("torch._dynamo imported while tracing")

    for name in [m for m in sys.modules if m == "torch._dynamo" or m.startswith("torch._dynamo.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [Refuse()] + sys.meta_path)
    # (torch's wrapper caches the guard on the function once made: its own, not a call's)
    dispatch = detect._Fresh.__dict__["__torch_dispatch__"]
    assert dispatch.__code__.co_filename == detect.__file__
    p = trace_jacobian(lambda x: (x[1:] - x[:-1]) ** 2 + torch.zeros(4, dtype=x.dtype), (torch.ones(5, dtype=torch.float64),))
    assert p.exact and sorted(zip(p.rows.tolist(), p.cols.tolist())) == [(i, j) for i in range(4) for j in (i, i + 1)]


# ------------------------------------------------------------------ ops traced exactly

G = torch.Generator().manual_seed(6)


def rand(*shape):
    return torch.randn(*shape, generator=G, dtype=torch.float64)


W_T2 = rand(4, 3, 3, 2)  # conv_transpose2d weight: 4 in, 3 out (x groups) channels
W_T2[1, 2] = 0  # constant zero taps add nothing
W_T1 = rand(2, 2, 3)
W_T3 = rand(2, 1, 2, 2, 2)
B_C = torch.tensor([[0.0, 0.0, 1.0], [1.0, 2.0, 0.0]], dtype=torch.float64)

OPS = {
    # interpolation, every mode scientists use to move between grids
    "nearest2d": (lambda x: F.interpolate(x, scale_factor=2, mode="nearest"), (2, 3, 4, 5)),
    "nearest_exact1d": (lambda x: F.interpolate(x, size=7, mode="nearest-exact"), (2, 2, 5)),
    "nearest3d": (lambda x: F.interpolate(x, size=(3, 5, 4), mode="nearest"), (1, 2, 2, 3, 3)),
    "linear1d": (lambda x: F.interpolate(x, scale_factor=1.7, mode="linear"), (2, 3, 6)),
    "linear1d_corners": (lambda x: F.interpolate(x, size=11, mode="linear", align_corners=True), (1, 2, 6)),
    "bilinear": (lambda x: F.interpolate(x, scale_factor=2, mode="bilinear"), (2, 3, 4, 5)),
    "bilinear_down": (lambda x: F.interpolate(x, size=(3, 4), mode="bilinear", align_corners=True), (1, 2, 7, 9)),
    "bicubic": (lambda x: F.interpolate(x, size=(7, 9), mode="bicubic"), (1, 2, 4, 5)),
    "bicubic_corners": (lambda x: F.interpolate(x, scale_factor=(1.5, 2.5), mode="bicubic", align_corners=True), (1, 1, 4, 4)),
    "trilinear": (lambda x: F.interpolate(x, scale_factor=2, mode="trilinear"), (1, 2, 3, 3, 4)),
    "upsample_module": (lambda x: torch.nn.Upsample(size=(5, 6), mode="bilinear")(x), (1, 1, 3, 3)),
    # cross products (rigid bodies, magnetism): the other two components of the same vector
    "cross": (lambda x: torch.linalg.cross(x, x.flip(0) ** 2), (4, 3)),
    "cross_dim0": (lambda x: torch.cross(x, B_C.T, dim=0), (3, 2)),
    "cross_broadcast": (lambda x: torch.linalg.cross(x[:1], x), (5, 3)),
    # FFTs: dense within the transformed dims, block-diagonal across the others
    "rfft": (lambda x: torch.fft.rfft(x, dim=1).abs(), (4, 6)),
    "fft_dim0": (lambda x: torch.view_as_real(torch.fft.fft(x, dim=0)), (4, 6)),
    "irfft": (lambda x: torch.fft.irfft(torch.fft.rfft(x, dim=-1) * torch.arange(4.0), n=6, dim=-1), (3, 6)),
    "rfft2": (lambda x: torch.fft.rfft2(x).abs() ** 2, (2, 4, 4)),
    "spectral_derivative": (lambda x: torch.fft.ifft(1j * torch.fft.fft(x, dim=-1), dim=-1).real, (3, 8)),
    "fft_complex_parts": (lambda x: torch.view_as_real(torch.fft.fft(torch.view_as_complex(x), dim=0)).sum(-1), (4, 2, 2)),
    # adaptive pools
    "adaptive_avg2d": (lambda x: F.adaptive_avg_pool2d(x, (2, 3)), (2, 3, 5, 7)),
    "adaptive_avg1d": (lambda x: F.adaptive_avg_pool1d(x, 3), (2, 3, 7)),
    "adaptive_avg3d": (lambda x: F.adaptive_avg_pool3d(x, (2, 1, 3)), (1, 2, 3, 4, 5)),
    "adaptive_max2d": (lambda x: F.adaptive_max_pool2d(x, (3, 2)), (2, 2, 7, 5)),
    "adaptive_max1d": (lambda x: F.adaptive_max_pool1d(x ** 2, 4), (1, 2, 9)),
    # transposed convolutions (decoders, adjoint operators)
    "conv_transpose2d": (lambda x: F.conv_transpose2d(x, W_T2, stride=2), (2, 4, 3, 4)),
    "conv_transpose2d_groups": (lambda x: F.conv_transpose2d(x, W_T2, stride=(2, 1), padding=1, output_padding=(1, 0),
                                                               groups=2, dilation=(1, 2)), (1, 4, 3, 4)),
    "conv_transpose1d": (lambda x: F.conv_transpose1d(x, W_T1, padding=1, stride=3), (2, 2, 5)),
    "conv_transpose3d": (lambda x: F.conv_transpose3d(x, W_T3, stride=2), (1, 2, 2, 2, 3)),
    # unfold / fold (patches)
    "unfold": (lambda x: F.unfold(x, 2), (2, 3, 4, 5)),
    "unfold_padded": (lambda x: F.unfold(x, (2, 3), dilation=(1, 2), padding=1, stride=2), (1, 2, 5, 6)),
    "fold": (lambda x: F.fold(x, (3, 4), 2), (1, 8, 6)),
    "fold_strided": (lambda x: F.fold(x, (5, 5), (2, 3), padding=1, stride=2), (2, 6, 9)),
    # normalization layers: an element on its group (row, sample's channel group, channel)
    "layer_norm": (lambda x: F.layer_norm(x, (6,)), (4, 6)),
    "layer_norm_affine": (lambda x: F.layer_norm(x, (3, 3), W_T2[0, :, :, 0] + 1, W_T2[1, :, :, 1]), (2, 4, 3, 3)),
    "layer_norm_traced_weight": (lambda x: F.layer_norm(x[:, :3], (3,), x[0, 3:], None), (4, 6)),
    "group_norm": (lambda x: F.group_norm(x, 2, torch.arange(1.0, 5.0, dtype=x.dtype)), (2, 4, 3, 3)),
    "instance_norm": (lambda x: F.instance_norm(x), (2, 3, 5)),
    "batch_norm_training": (lambda x: F.batch_norm(x, None, None, training=True), (3, 4, 2, 2)),
    "batch_norm_eval": (lambda x: F.batch_norm(x, RUNNING[0], RUNNING[1], B_C[1, :2].repeat(2), None, training=False), (2, 4, 3)),
    # pairwise distances (particles, kernels): each on its two points
    "cdist": (lambda x: torch.cdist(x[:3], x[3:], p=1), (7, 3)),
    "cdist_constant": (lambda x: torch.exp(-torch.cdist(x, B_C)), (4, 3)),
    "cdist_batched": (lambda x: torch.cdist(x, x.flip(1) * 2), (2, 4, 3)),
    # constant zeros: multiplied by one, or a constant condition's other branch, no entry
    "kron": (lambda x: torch.kron(x, torch.eye(2, dtype=x.dtype)), (3, 3)),
    "where_boundary": (lambda u: torch.where(INTERIOR, u.roll(1) - 2 * u + u.roll(-1), u - 1.0), (7,)),
    "mask_boundary": (lambda u: (u.roll(1) - 2 * u + u.roll(-1)) * INTERIOR + (u - 1) * ~INTERIOR, (7,)),
    "mask_made_inside": (lambda u: u.clone().mul_(torch.arange(4.0, dtype=u.dtype) % 2), (4,)),
}
INTERIOR = torch.arange(7) % 6 != 0  # a 1-D grid's interior (Dirichlet ends)
RUNNING = (torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64))


def _jac_pattern(f, x, jac):
    p = trace_jacobian(f, (x,))
    got = np.zeros(jac.shape, bool)
    got[p.rows, p.cols] = True
    return p, got


SHARP = {"nearest2d", "bilinear", "bicubic", "linear1d_corners", "cross", "rfft", "adaptive_avg2d", "adaptive_avg3d",
         "conv_transpose2d", "conv_transpose2d_groups", "conv_transpose1d", "unfold_padded", "fold_strided",
         "layer_norm", "layer_norm_affine", "layer_norm_traced_weight", "group_norm", "instance_norm", "batch_norm_training",
         "cdist", "cdist_constant", "cdist_batched", "kron", "where_boundary", "mask_boundary", "mask_made_inside"}


@pytest.mark.parametrize("name", sorted(OPS))
def test_op_is_traced_exactly_and_never_misses_a_nonzero(name):
    """Each of these ops was taken as dense (every output on every input, exact: false:
    as many products as inputs, or outputs). Its pattern now never misses a nonzero of
    dense jacrev at two points and is far from dense (for those in SHARP: exactly
    jacrev's nonzeros)."""
    f, shape = OPS[name]
    # (torch's vmap of cdist's backward is wrong: jacrev's rows all read the first point)
    reference = torch.func.jacrev(f, chunk_size=1) if name.startswith("cdist") else torch.func.jacrev(f)
    x = rand(*shape)
    jac = reference(x).reshape(-1, x.numel()).numpy()
    p, got = _jac_pattern(f, x, jac)
    assert p.exact, p.notes
    assert not [n for n in p.notes if n.startswith("unknown op")], p.notes
    other = rand(*shape)
    jac2 = reference(other).reshape(-1, x.numel()).numpy()
    missing = ((jac != 0) | (jac2 != 0)) & ~got
    assert not missing.any(), np.argwhere(missing)[:5]
    assert got.sum() < 0.6 * got.size or got.sum() <= 2 * max(((jac != 0) | (jac2 != 0)).sum(), 1)
    if name in SHARP:  # none of these ops' entries vanishes at a random point: exactly jacrev's
        np.testing.assert_array_equal(got, (jac != 0) | (jac2 != 0))


HESSIANS = {
    "cross": lambda x: (torch.linalg.cross(x.reshape(-1)[:6].reshape(2, 3), x.reshape(-1)[2:].reshape(2, 3)) ** 2).sum()
    + torch.linalg.cross(x.reshape(-1)[:6].reshape(2, 3), B_C).sum(),
    "rfft_energy": lambda x: (torch.fft.rfft(x, dim=1).abs() ** 2).sum() + x[0, 0] * x[1, 0],
    "bilinear_then_square": lambda x: (F.interpolate(x.reshape(1, 1, 4, 2), scale_factor=2, mode="bilinear") ** 3).sum(),
    "conv_transpose": lambda x: F.conv_transpose1d(x.reshape(1, 2, 4), W_T1, stride=2).sin().sum(),
    "fold_unfold": lambda x: (F.fold(F.unfold(x.reshape(1, 1, 2, 4), 2), (2, 4), 2) ** 2).sum(),
    "adaptive_max": lambda x: F.adaptive_max_pool1d(x.reshape(1, 2, 4), 2).exp().sum(),
    "layer_norm": lambda x: (F.layer_norm(x.reshape(2, 4), (4,)) ** 2).sum() + x[0, 0] * x[3, 1],
    "group_norm": lambda x: F.group_norm(x.reshape(2, 2, 2), 1).sin().sum(),
}


@pytest.mark.parametrize("name", sorted(HESSIANS))
def test_hessian_pattern_never_misses_a_nonzero(name):
    f = HESSIANS[name]
    x = rand(4, 2) if name != "rfft_energy" else rand(2, 4)
    h = torch.func.hessian(f)(x).reshape(x.numel(), x.numel()).numpy()
    p = trace_hessian(f, (x,))
    got = np.zeros(h.shape, bool)
    got[p.rows, p.cols] = True
    assert p.exact, p.notes
    # (torch's double backward of group_norm leaves ~1e-18 between samples: round-off)
    assert not ((np.abs(h) > 1e-12 * np.abs(h).max()) & ~got).any()
    assert got.sum() < got.size or name == "rfft_energy"


def _upsampled_energy(x):
    """A coarse field upsampled bilinearly onto a fine grid, then a local nonlinearity."""
    return F.interpolate(x, scale_factor=2, mode="bilinear") ** 2


def test_sparse_jacobian_through_these_ops_matches_jacrev_with_few_products():
    """The whole path (trace, colouring, products, checks): the Jacobian equals dense
    jacrev's, exact, in 9 products or fewer where it took one per input (64)."""
    from jacobian_service.sparsity.compute import sparse_jacobian

    x = rand(1, 1, 8, 8)
    res = sparse_jacobian(_upsampled_energy, (x,), mode="fwd")
    want = torch.func.jacrev(_upsampled_energy)(x).reshape(-1, x.numel()).numpy()
    assert res.pattern.exact and res.source == "traced", res.pattern.notes
    np.testing.assert_allclose(res.matrix.toarray(), want, rtol=1e-10, atol=1e-12)
    assert res.n_products <= 9, res.n_products  # a 3 x 3 lattice (64 before)


def _kernel_matrix(x):
    """A Gaussian kernel between points and every other point (a radial-basis fit)."""
    return torch.exp(-torch.cdist(x, x[::2] + 0.5))


def test_sparse_jacobian_through_cdist_is_right_where_torch_vmap_is_not():
    """cdist has no forward-mode rule and torch's vmap of its backward is wrong (jacrev's
    rows all read the first point): the sparse path runs reverse mode one product at a
    time and matches autograd's Jacobian, with fewer products than outputs."""
    from jacobian_service.sparsity.compute import sparse_jacobian

    x = rand(8, 2)
    res = sparse_jacobian(_kernel_matrix, (x,))
    want = torch.autograd.functional.jacobian(_kernel_matrix, x).reshape(-1, x.numel()).numpy()
    assert res.pattern.exact, res.pattern.notes
    np.testing.assert_allclose(res.matrix.toarray(), want, rtol=1e-10, atol=1e-12)
    assert res.n_products < 32, res.n_products


def test_zeros_of_an_input_that_is_not_differentiated_still_count():
    """A mask given as an input varies from call to call: its zeros here are no
    structure, so the pattern keeps those entries (and is not value-dependent)."""
    x, m = rand(3), torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)
    p = trace_jacobian(lambda x, m: x * m, (x, m))
    assert sorted(zip(p.rows.tolist(), p.cols.tolist())) == [(0, 0), (1, 1), (2, 2)] and not p.value_dependent
