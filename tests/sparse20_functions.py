"""Functions for tests/test_sparse_round20.py. Loaded by module name."""

from __future__ import annotations

import builtins
import concurrent.futures
import sys

import torch

from jacobian_service import Input, register

# ------------------------------------------------------------------ type branches the watch missed
# As round 19's: each arm computes the same values; only the plain-tensor arm (jacrev's)
# couples every element to the first. Each reads the type where round 19's watch did not look.

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
    "thread": _in_thread,
    "argument": lambda u, kind=type: kind(u) is torch.Tensor,
}


def _coupled(check):
    def fn(u: torch.Tensor) -> torch.Tensor:
        first = u[0] if check(u) else u[0].detach()
        return u * first + u.roll(1)
    return fn


COUPLED = {}  # check's name -> the registered function (for the test's jacrev)
for _name, _check in _CHECKS.items():
    COUPLED[_name] = register(inputs=[Input("u", shape=("n",), dtype="float64")], name=f"coupled20_{_name}",
             description=f"A residual whose coupling to u[0] is detached unless a type check ({_name}) says "
                         "its tensor is a plain torch.Tensor: the same values either way.")(_coupled(_check))

