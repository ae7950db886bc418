"""What the lifespan owns, reached from a request as ``request.app.state.service``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .metrics import Metrics
from .registry import Registry
from .scheduler import Scheduler
from .settings import Settings

__all__ = ["ServiceState"]


@dataclass
class ServiceState:
    settings: Settings
    registry: Registry
    scheduler: Scheduler
    metrics: Metrics
    devices: list[torch.device]
    api_keys: tuple[str, ...] = ()
    ready: bool = False
    draining: bool = False
    # Output rows seen per (function, argnums, shapes, dtypes): lets small .npy
    # Jacobians skip the streaming path (and so join request batches).
    output_rows: dict[tuple[Any, ...], int] = field(default_factory=dict)
