"""Hostile functions for tests/test_hostile_round15.py (loaded by name like a user
module): each misbehaves only when its first input is 666 (round 11's ``_armed``), the
second input picking how; otherwise it is ``sin``."""

from __future__ import annotations

import os
import sys

import torch
from jacobian_service import Input, register

X = [Input("x", shape=("n",))]


def _armed(x: torch.Tensor) -> int | None:
    """The case asked for (the second input), or None: behave."""
    flat = x.detach().reshape(-1)
    if flat.numel() > 1 and float(flat[0]) == 666.0:
        return int(float(flat[1]))
    return None


# ------------------------------------------------------------ what a function writes to stdout/stderr

FLOOD_BYTES = 64 << 20


@register(inputs=X, description="sin; armed (666), it writes 64 MB to its engine's stdout or stderr first.")
def floods_output(x: torch.Tensor) -> torch.Tensor:
    case = _armed(x)
    if case == 1:  # short lines, straight to descriptor 1
        line = b"floods_output: " + b"x" * 64 + b"\n"
        block = line * ((1 << 20) // len(line))
        for _ in range(FLOOD_BYTES // len(block)):
            os.write(1, block)
    elif case == 2:  # one line of 64 MB through sys.stderr, left unended; and a umask the engine puts back
        chunk = "y" * (1 << 20)
        for _ in range(FLOOD_BYTES >> 20):
            sys.stderr.write(chunk)
        sys.stderr.flush()
        os.umask(0o077)
    elif case == 3:  # a line, printed: it reaches serve's log (under the budget)
        print("floods_output says hello")
    return torch.sin(x)


# ------------------------------------------------------------ what a function patches and leaves


def _doubled(original):
    def patched(*args, **kwargs):
        return original(*args, **kwargs) * 2
    return patched


def _patch(case: int) -> None:
    """Rebind (or change in place) something every later function's answer goes through."""
    if case == 1:  # the module torch.einsum calls through (torch.functional: _VF.einsum)
        import torch._VF as VF
        VF.einsum = _doubled(torch._C._VariableFunctions.einsum)
    elif case == 2:  # the C module torch.nn.functional calls through at run time
        torch._C._nn.mse_loss = _doubled(torch._C._nn.mse_loss)
    elif case == 3:  # the engine's table of dtypes: float64 inputs computed in float32
        from jacobian_service.engine import core
        core.TORCH_DTYPES["float64"] = torch.float32
        core._AS_SENT.pop("float64", None)
    elif case == 4:  # every custom autograd.Function
        torch.autograd.Function.apply = classmethod(_doubled(torch.autograd.Function.apply.__func__))
    elif case == 5:  # a constant of the engine's: None in an answer packed as something else
        from jacobian_service import ipc
        ipc._NONE = ("v", 1.0)
    elif case == 7:  # the socket the engine answers on: a 3x3 float64 array's frame sent as zeros
        import socket
        send = socket.socket.sendmsg

        def sendmsg(self, buffers, *args):
            return send(self, [bytes(len(b)) if len(b) == 72 else b for b in buffers], *args)
        socket.socket.sendmsg = sendmsg
    elif case == 8:  # the engine's clock: every later deadline in the past
        import time
        monotonic = time.monotonic
        time.monotonic = lambda: monotonic() + 1e6
    elif case == 9:  # forward-mode AD off for the engine's thread (torch.func keeps its own)
        torch._C._set_fwd_grad_enabled(False)
    elif case == 6:  # the same table, rebound
        from jacobian_service.engine import core
        core.TORCH_DTYPES = {**core.TORCH_DTYPES, "float64": torch.float32}
        core._AS_SENT = {}


@register(inputs=X, description="sin; armed (666), it patches what later functions' answers go through (x[1] picks).")
def patches(x: torch.Tensor) -> torch.Tensor:
    case = _armed(x)
    if case is not None:
        _patch(case)
    return torch.sin(x)


@register(inputs=X, description="x*x through torch.einsum.")
def uses_einsum(x: torch.Tensor) -> torch.Tensor:
    return torch.einsum("i,i->i", x, x)


@register(inputs=X, description="mse_loss(x, 0): mean(x^2).")
def uses_mse_loss(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.mse_loss(x, torch.zeros_like(x))


class _Square(torch.autograd.Function):
    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return x * x

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return 2 * x * grad


@register(inputs=X, description="x*x through a custom autograd.Function.")
def uses_autograd_function(x: torch.Tensor) -> torch.Tensor:
    return _Square.apply(x)


@register(inputs=X, description="sin(x) + cos(x): its value plus its forward-mode derivative along ones (forward_ad).")
def uses_forward_ad(x: torch.Tensor) -> torch.Tensor:
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        out = fwAD.unpack_dual(torch.sin(fwAD.make_dual(x, torch.ones_like(x))))
        return out.primal + out.tangent


@register(inputs=X, description="sin; armed (666), it puts a file of its own over the engine's log pipe first.")
def covers_the_engines_log(x: torch.Tensor) -> torch.Tensor:
    if _armed(x) is not None:
        import tempfile

        fd, path = tempfile.mkstemp(prefix="covers_the_engines_log.")
        os.unlink(path)  # (open, never left behind)
        os.dup2(fd, int(os.environ["JACOBIAN_SERVICE_ENGINE_LOG_FD"]))  # (ipc.LOG_FD_ENV)
        os.close(fd)
    return torch.sin(x)


@register(inputs=X, description="sin; armed (666), it sets the umask to 077 first (the engine puts it back, and says so).")
def sets_the_umask(x: torch.Tensor) -> torch.Tensor:
    if _armed(x) is not None:
        os.umask(0o077)
    return torch.sin(x)
