"""Hostile functions for tests/test_hostile_round6.py (loaded by name like a user
module): each misbehaves only when its first input is 666 (``_armed``)."""

from __future__ import annotations

import os
import socket

import torch

from jacobian_service import Input, register

X = [Input("x", shape=("n",))]
_KEPT: list = []  # what a function keeps alive between calls


def _armed(x: torch.Tensor) -> bool:
    return x.numel() > 0 and float(x.detach().reshape(-1)[0]) == 666.0


def _descriptors(kind: str) -> list[int]:
    """The process's descriptors whose /proc link starts with ``kind``."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}").startswith(kind):
                found.append(int(name))
        except OSError:  # the listing's own, gone
            pass
    return found


def _connected_unix_sockets() -> list[int]:
    found = []
    for fd in _descriptors("socket:"):
        try:
            probe = socket.socket(fileno=os.dup(fd))
        except OSError:
            continue
        with probe:
            if probe.family == socket.AF_UNIX and not probe.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                found.append(fd)
    return found


@register(inputs=X, description="sin, after shutting down (through a duplicate) the engine's connections to its "
                                "front ends, when its first input is 666.")
def shuts_its_connection_down(x: torch.Tensor) -> torch.Tensor:
    if _armed(x):
        for fd in _connected_unix_sockets():
            with socket.socket(fileno=os.dup(fd)) as copy:
                try:
                    copy.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
    return x.sin()


@register(inputs=X, description="sin, leaving a torch.func vmap level entered (never exited) when its first input "
                                "is 666.")
def leaves_a_vmap_level(x: torch.Tensor) -> torch.Tensor:
    if _armed(x):
        torch._C._functorch._vmap_increment_nesting(3, "error")
    return x.sin()


@register(inputs=X, description="sin, leaving inference mode entered (never exited) when its first input is 666.")
def leaves_inference_mode(x: torch.Tensor) -> torch.Tensor:
    if _armed(x):
        entered = torch.inference_mode()
        entered.__enter__()
        _KEPT.append(entered)
    return x.sin()


@register(inputs=X, description="The gradient of sum(sin(w * x)) in w at w = 1, by torch.autograd.grad inside: "
                                "cos(x) * x.")
def grad_inside(x: torch.Tensor) -> torch.Tensor:
    with torch.enable_grad():
        w = torch.ones_like(x, requires_grad=True)
        (g,) = torch.autograd.grad((w * x).sin().sum(), w, create_graph=True)
    return g


@register(inputs=X, description="sin, after lowering the engine's open-file limit (soft) to 20 when its first input "
                                "is 666.")
def lowers_the_open_file_limit(x: torch.Tensor) -> torch.Tensor:
    if _armed(x):
        import resource

        resource.setrlimit(resource.RLIMIT_NOFILE, (20, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    return x.sin()


