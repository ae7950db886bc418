"""A functions module that configures logging as it is imported, as application code
does: ``logging.config.dictConfig`` disables every logger made before it (its
``disable_existing_loggers`` is True by default), the service's own among them."""

from __future__ import annotations

import logging.config

import torch

from jacobian_service.registry import Input, register

logging.config.dictConfig({"version": 1, "root": {"level": "WARNING"}})


@register(inputs=[Input("x", shape=("n",))], description="sin, after making float64 the default dtype (logged).")
def sets_float64_default_too(x: torch.Tensor) -> torch.Tensor:
    torch.set_default_dtype(torch.float64)
    return x.sin()
