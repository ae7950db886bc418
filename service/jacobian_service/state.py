"""What the lifespan owns, reached from a request as ``request.app.state.service``."""

from __future__ import annotations

from dataclasses import dataclass

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
    ready: bool = False
    draining: bool = False
