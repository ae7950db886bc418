"""Hostile functions for tests/test_hostile_round13.py (loaded by name like a user
module): each misbehaves only when its first input is 666 (``_armed``), the second input
picking how; otherwise it is ``sin`` (with ``sin`` as aux where it has one)."""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import torch
from jacobian_service import Input, ipc, register

X = [Input("x", shape=("n",))]


def _armed(x: torch.Tensor) -> int | None:
    """The case asked for (the second input), or None: behave."""
    flat = x.detach().reshape(-1)
    if flat.numel() > 1 and float(flat[0]) == 666.0:
        return int(float(flat[1]))
    return None


# ------------------------------------------------------------ what a function returns runs code


class _InterruptsLen(list):
    def __len__(self) -> int:
        raise KeyboardInterrupt("from aux's __len__")


class _ExitsIter(list):
    def __iter__(self):
        raise SystemExit(3)


class _GeneratorExitIter(dict):
    def __iter__(self):
        raise GeneratorExit()


class _HangsIndex(int):
    def __index__(self) -> int:
        threading.Event().wait()
        return 0

    __int__ = __index__


class _InterruptsFloat(float):
    def __float__(self) -> float:
        raise KeyboardInterrupt("from __float__")


# case -> (aux, what the client gets: a status and the detail, or the aux read back)
AUX_CASES = {
    1: lambda: _InterruptsLen([1]),
    2: lambda: _ExitsIter([1]),
    3: lambda: _GeneratorExitIter(a=1),
    4: lambda: [_HangsIndex(1)],
    5: lambda: [_InterruptsFloat(2.5)],
    6: lambda: list(range(2_000_000)),
}


@register(inputs=X, has_aux=True, description="sin, sin as aux; armed (666), its aux's methods misbehave.")
def hostile_aux(x: torch.Tensor):
    y = x.sin()
    case = _armed(x)
    return y, (y if case is None else AUX_CASES[case]())


class _StrExits(Exception):
    def __str__(self) -> str:
        raise SystemExit(4)

    __repr__ = __str__


class _HugeStr(Exception):
    def __str__(self) -> str:
        return "x" * (16 << 20)


def _cyclic() -> Exception:
    a, b = ValueError("a"), ValueError("b")
    a.__cause__, b.__cause__ = b, a
    return a


RAISES = {
    1: _StrExits,
    2: _HugeStr,
    3: _cyclic,
    4: lambda: ValueError("y" * (16 << 20)),
    5: KeyboardInterrupt,
    6: GeneratorExit,
}


@register(inputs=X, description="sin; armed (666), it raises an exception that misbehaves.")
def hostile_raises(x: torch.Tensor) -> torch.Tensor:
    case = _armed(x)
    if case is not None:
        raise RAISES[case]()
    return x.sin()


class _Function(torch.Tensor):
    """A subclass whose every torch call hangs (0), raises KeyboardInterrupt (1) or ends the
    process (2)."""

    how = 0

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if cls.how == 1:
            raise KeyboardInterrupt("from __torch_function__")
        if cls.how == 2:
            os._exit(6)
        threading.Event().wait()


class _Dispatch(torch.Tensor):
    """A wrapper subclass whose every op raises KeyboardInterrupt (3) or SystemExit (4)."""

    @staticmethod
    def __new__(cls, elem: torch.Tensor, how: int):
        t = torch.Tensor._make_wrapper_subclass(cls, elem.shape, dtype=elem.dtype, device=elem.device)
        t.how = how
        return t

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        if next(a.how for a in args if isinstance(a, _Dispatch)) == 3:
            raise KeyboardInterrupt("from __torch_dispatch__")
        raise SystemExit(2)


@register(inputs=X, description="sin; armed (666), it returns sin as a subclass whose torch calls misbehave.")
def hostile_subclass(x: torch.Tensor) -> torch.Tensor:
    case = _armed(x)
    y = x.sin()
    if case is None:
        return y
    if case >= 3:
        return _Dispatch(y.detach(), case)
    _Function.how = case
    with torch._C.DisableTorchFunctionSubclass():
        return y.as_subclass(_Function)


# ------------------------------------------------------------ what later functions pay for


@register(inputs=X, description="sin, after raising the recursion limit to a million and leaving it so.")
def raises_recursion_limit(x: torch.Tensor) -> torch.Tensor:
    sys.setrecursionlimit(10**6)
    return x.sin()


@register(inputs=X, description="sin, after pointing faulthandler at a file it then closes.")
def points_faulthandler_away(x: torch.Tensor) -> torch.Tensor:
    import faulthandler
    import tempfile

    with tempfile.TemporaryFile() as f:
        faulthandler.enable(file=f)
    return x.sin()


@register(inputs=X, description="sin; armed (666), it says whether faulthandler is on, in a RuntimeError.")
def reports_faulthandler(x: torch.Tensor) -> torch.Tensor:
    import faulthandler

    if _armed(x) is not None:
        raise RuntimeError(f"faulthandler enabled: {faulthandler.is_enabled()}")
    return x.sin()


def _recurse(n: int) -> int:
    """From n up to 0, each level through C (``map`` calls back into Python), so each
    takes C stack as well as a Python frame."""
    return n if n >= 0 else sum(map(_recurse, [n + 1]))


@register(inputs=X, description="sin, after recursing as deep as x[1] asks (armed: 666) and catching the RecursionError.")
def recurses(x: torch.Tensor) -> torch.Tensor:
    case = _armed(x)
    if case is not None:
        try:
            _recurse(-case)
        except RecursionError:
            pass
    return x.sin()


# ------------------------------------------------------------ a hang only the front ends see


def _engine_args() -> tuple[str, int]:
    argv = sys.argv
    return argv[argv.index("--run-dir") + 1], int(argv[argv.index("--index") + 1])


@register(inputs=X, description="sin; armed (666), a thread of it writes the engine's board idle while it hangs.")
def hangs_behind_its_board(x: torch.Tensor) -> torch.Tensor:
    if _armed(x) is not None:
        run_dir, index = _engine_args()
        board = ipc.StatusBoard(Path(run_dir) / f"engine-{index}.status")
        board._ready = 1

        def forge() -> None:
            while True:
                board.idle(time.monotonic())
                time.sleep(0.01)

        threading.Thread(target=forge, daemon=True).start()
        threading.Event().wait()
    return x.sin()


# ------------------------------------------------------------ address space reserved, never touched

_RESERVED: list = []


@register(inputs=X, description="sin; armed (666), it reserves all but 64 MiB of the engine's address-space cap, "
                                "untouched, and keeps it.")
def reserves_address_space(x: torch.Tensor) -> torch.Tensor:
    if _armed(x) is not None:
        import mmap
        import resource

        cap = resource.getrlimit(resource.RLIMIT_AS)[0]
        with open("/proc/self/statm") as f:
            size = int(f.read().split()[0]) * mmap.PAGESIZE
        room = (cap - size - (64 << 20)) // mmap.PAGESIZE * mmap.PAGESIZE
        _RESERVED.append(mmap.mmap(-1, room, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | 0x4000,  # MAP_NORESERVE
                                   prot=mmap.PROT_READ))
    return x.sin()
