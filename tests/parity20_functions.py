"""Functions for tests/test_parity_round20.py, round 20 of PyTorch's own torch.func test
cases replayed over HTTP: Hessians of an op without forward AD (index_reduce), tried in
forward mode once per function, and a jacfwd failure that is not a missing forward AD
(vmap of a custom Function without a vmap rule), which must not steer later requests
off forward mode."""

from __future__ import annotations

import torch
from jacobian_service import Input, register

from .parity17_functions import _CubeNoVmap
from .parity18_functions import _CubeNoJvp, _CubeNoJvpDetached
from .parity19_functions import _under_jvp

V = ("n",)
# How many times a registered function here ran under torch.func.jvp (jacfwd, forward
# over reverse), counted by the function itself (read through jvp_runs)
JVP_CALLS = {"n": 0}


@register(inputs=[Input("x", shape=("n", 2))])
def reduced(x):
    """index_reduce has no forward-mode AD ('Trying to use forward AD with index_reduce'):
    torch.func.hessian fails, reverse over reverse answers. Counts its runs under a jvp."""
    JVP_CALLS["n"] += _under_jvp()
    return (x.index_reduce(0, torch.tensor([0, 0, 1]), x * 2, "prod") ** 2).sum()


@register(inputs=[Input("x", shape=V)])
def jvp_runs(x):
    """The count of the runs under a jvp so far (x only gives the dtype)."""
    return torch.tensor(float(JVP_CALLS["n"]), dtype=x.dtype)


@register(inputs=[Input("x", shape=V)])
def cube_no_vmap_past_3(x):
    """outer(x ** 3, x), outputs outnumbering inputs (mode=auto takes forward mode); the
    cube by a Function with a jvp and no vmap rule past 3 elements, so jacfwd (a vmap of
    JVPs) fails there, a vmap failure, and runs for shorter inputs; jacrev runs for all."""
    return torch.outer(_CubeNoVmap.apply(x) if x.shape[0] > 3 else x**3, x)


@register(inputs=[Input("x", shape=V)])
def cut_where_positive(x):
    """sum(cube(x) roll(x)) by a Function with neither jvp nor vmap rule (torch.func.hessian
    cannot run) whose backward cuts its graph where x[0] > 0 (reverse over reverse then
    misses the 6 a roll(a) diagonal: refused) and keeps it elsewhere (answered)."""
    cube = _CubeNoJvpDetached if float(x.detach()[0]) > 0 else _CubeNoJvp
    return (cube.apply(x) * x.roll(1)).sum()
