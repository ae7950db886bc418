"""Functions for tests/test_sparse_round20.py. Loaded by module name."""

from __future__ import annotations

import builtins
import concurrent.futures
import sys

import torch

from jacobian_service import Input, register
from tests.sparse19_functions import _coupled  # (u[0] coupled where the check says plain, detached elsewhere)

# ------------------------------------------------------------------ type branches the watch missed
# Round 19's residual: each arm computes the same values; only the plain-tensor arm
# (jacrev's) couples every element to the first. Each reads the type where round 19's watch did not look.

_kind = type  # the builtin under another name


def _plain(u: torch.Tensor) -> bool:
    return type(u) is torch.Tensor


def _unwatched(u: torch.Tensor) -> bool:
    # the profiler taken down around a helper's check, then put back (this code reads no type)
    hook = sys.getprofile()
    sys.setprofile(None)
    try:
        return _plain(u)
    finally:
        sys.setprofile(hook)


def _taken_down(u: torch.Tensor) -> bool:
    # the profiler taken down from C (map calls sys.setprofile: no call event for it), not
    # put back
    list(map(sys.setprofile, [None]))
    return _plain(u)


def _restored_from_c(u: torch.Tensor) -> bool:
    # taken down and put back from C around the check: no call event, and the hook is the
    # watch's again at the next op
    hook = sys.getprofile()
    list(map(sys.setprofile, [None]))
    plain = _plain(u)
    list(map(sys.setprofile, [hook]))
    return plain


_set_hook = sys.setprofile  # (under another name)


def _restored_by_alias(u: torch.Tensor) -> bool:
    hook = sys.getprofile()
    list(map(_set_hook, [None]))
    plain = _plain(u)
    list(map(_set_hook, [hook]))
    return plain


def _in_thread(u: torch.Tensor) -> bool:
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(_plain, u).result()


_made: dict = {}
exec("def _by_exec(u):\n    return type(u).__name__ == 'Tensor'\n", _made)  # code named <string>

_CHECKS = {
    "exec": _made["_by_exec"],
    "builtins_type": lambda u: builtins.type(u) is torch.Tensor,
    "alias": lambda u: _kind(u) is torch.Tensor,
    "setprofile": _unwatched,
    "taken_down": _taken_down,
    "restored_from_c": _restored_from_c,
    "restored_by_alias": _restored_by_alias,
    "thread": _in_thread,
    "argument": lambda u, kind=type: kind(u) is torch.Tensor,
    # what the tracer's tensors have otherwise: their own attributes, the class's
    "vars": lambda u: not vars(u),
    "dispatch_attr": lambda u: u.__torch_dispatch__ is torch._C._disabled_torch_dispatch_impl,
    "module_attr": lambda u: u.__module__ == "torch",
}


def _here(check):
    """Round 19's residual, as a function of this module (register files it under its
    function's module)."""
    residual = _coupled(check)

    def fn(u: torch.Tensor) -> torch.Tensor:
        return residual(u)
    return fn


COUPLED = {  # check's name -> the registered function (for the test's jacrev)
    name: register(inputs=[Input("u", shape=("n",), dtype="float64")], name=f"coupled20_{name}",
                   description=f"Round 19's coupled residual, its type check ({name}) made where the watch "
                               "did not look.")(_here(check))
    for name, check in _CHECKS.items()
}


@register(inputs=[Input("u", shape=("n",), dtype="float64")],
          description="A residual that unwraps its input as code written for wrapped values does "
                      "(getattr(u, 'value', u)): jacrev's tensors have no such attribute.")
def coupled20_unwrapped(u: torch.Tensor) -> torch.Tensor:
    plain = getattr(u, "value", u)
    return u * plain[0] + u.roll(1)


COUPLED["unwrapped"] = coupled20_unwrapped


class _Handle:
    """A resource that warns when dropped unclosed, as anyio's streams do: its finalizer
    reads its own class, whenever the collector or a dropped reference runs it."""

    def __del__(self) -> None:
        self.kind = self.__class__.__name__


@register(inputs=[Input("u", shape=("n",), dtype="float64")],
          description="A chain that drops a handle in the middle (its __del__ runs then).")
def chain20_dropping(u: torch.Tensor) -> torch.Tensor:
    _Handle()  # (dropped at once: its __del__ runs inside the function's call)
    return u * u.roll(1)
