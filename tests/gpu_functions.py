"""Functions for the GPU tests of the process layout (tests/test_gpu_processes.py and
tests/test_gpu_memory.py).

Each behaves (sin) on the engines' warm-up; on its trigger it does what only a GPU
makes possible to test for real.
"""

from __future__ import annotations

import torch

from jacobian_service import Input, register

TRIGGER = 666.0


@register(inputs=[Input("x", shape=("n",))], description="Allocates 8 GiB blocks on x's device until it runs out, on the trigger.")
def hogs_the_device(x: torch.Tensor) -> torch.Tensor:
    if float(x.detach().reshape(-1)[0]) == TRIGGER:
        held = []
        while True:  # a CUDA out-of-memory error, raised inside the function
            held.append(torch.empty(2 << 30, device=x.device))
    return x.sin()


@register(inputs=[Input("x", shape=("n",))], description="sin(x x^T) summed by rows: n x n temporaries per Jacobian row.")
def big_outer_rows(x: torch.Tensor) -> torch.Tensor:
    # vmap over all n rows at once needs n^3 floats: 256 GiB at n = 4096, more than an
    # H200 holds, so the engine must cut the rows into chunks that fit.
    return torch.sin(torch.outer(x, x)).sum(1)


_KEPT: list[torch.Tensor] = []


@register(inputs=[Input("x", shape=("n",))], description="Keeps 8 GiB more on x's device at each call, on the trigger (a leak).")
def keeps_on_the_device(x: torch.Tensor) -> torch.Tensor:
    if float(x.detach().reshape(-1)[0]) == TRIGGER:
        _KEPT.append(torch.ones(2 << 30, device=x.device))
    return x.sin()
