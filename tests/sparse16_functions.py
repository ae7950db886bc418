"""Functions for tests/test_sparse_round16.py. Loaded by module name."""

from __future__ import annotations

import torch

from jacobian_service import Input, register


@register(inputs=[Input("u", shape=("n",), dtype="float64")],
          description="A chain's residual scaled by a buffer the function moves to shared memory (share_memory_): "
                      "jacrev refuses it (torch's error), the tracer must too, not crash.")
def shared_buffer(u: torch.Tensor) -> torch.Tensor:
    scale = torch.full(u.shape, 2.0, dtype=u.dtype).share_memory_()
    return scale * u**2 + u.roll(1)


@register(inputs=[Input("u", shape=("n",), dtype="float64")],
          description="A chain's residual through a DLPack round trip of its input (torch.utils.dlpack): jacrev "
                      "refuses it (torch's error), the tracer must too, not crash.")
def dlpack_round_trip(u: torch.Tensor) -> torch.Tensor:
    v = torch.utils.dlpack.from_dlpack(torch.utils.dlpack.to_dlpack(u))
    return v * u + u.roll(1)

