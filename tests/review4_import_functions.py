"""A user module that, as engine 0 imports it at serve's start, puts a FIFO where the
registry's file is about to be written (tests/test_review_round4.py)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from jacobian_service import Input, register

_argv = sys.argv
if "--run-dir" in _argv and _argv[_argv.index("--index") + 1] == "0":
    _registry = Path(_argv[_argv.index("--run-dir") + 1]) / "registry.json"
    if not _registry.exists():  # (serve's first engine, before it writes the registry)
        os.mkfifo(_registry)


@register(inputs=[Input("x", shape=("n",))], description="sin.")
def plain_sin(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(x)
