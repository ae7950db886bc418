"""Hostile functions for tests/test_hostile_round21.py (loaded by name like a user
module): each misbehaves only when its first input is 666 (round 11's ``_armed``), the
second input picking how; otherwise it is ``sin``. Beside them, the functions they harm."""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import sys

import torch
from jacobian_service import register

from tests.hostile17_functions import X, _armed  # the input, and the case it asks for (666 first)

# ------------------------------------------------------------ torch's random generator

_KEPT: list[torch.Tensor] = []  # the generator's state as rewinds_torch first found it


@register(inputs=X, description="sin; armed (666), it rewinds torch's random generator to the state it found at its "
                                "first call (torch.set_rng_state), the seed left as it was.")
def rewinds_torch(x: torch.Tensor) -> torch.Tensor:
    if _armed(x) is not None:
        if not _KEPT:
            _KEPT.append(torch.get_rng_state())
        torch.set_rng_state(_KEPT[0])
    return torch.sin(x)


@register(inputs=X, description="x + torch.rand (one draw each): a Monte Carlo step.")
def torch_noise(x: torch.Tensor) -> torch.Tensor:
    return x + torch.rand(x.shape, dtype=x.dtype)


# ------------------------------------------------------------ torch's profiler

_PROFILER: list[torch.profiler.profile] = []


@register(inputs=X, description="sin; armed (666), case 0 enters torch's profiler and leaves it so; case 1 stops it "
                                "and fails naming the operators it recorded (RuntimeError 'seen: ...').")
def profiles(x: torch.Tensor) -> torch.Tensor:
    case = _armed(x)
    if case == 0:
        _PROFILER[:] = [torch.profiler.profile(record_shapes=True)]
        _PROFILER[0].__enter__()
    elif case == 1:
        _PROFILER[0].__exit__(None, None, None)
        raise RuntimeError(f"seen: {sorted({event.name for event in _PROFILER[0].events()})}")
    return torch.sin(x)


@register(inputs=X, description="erf(x) / 2: an operator nothing else here runs.")
def erf_half(x: torch.Tensor) -> torch.Tensor:
    return torch.erf(x) / 2


# ------------------------------------------------------------ the run directory's notes

PLANTED = 300  # notes for the pids allocated next: the next engines' and spares'


def next_pids() -> range:
    """The pids the system allocates next, in turn (its last one read)."""
    with open("/proc/sys/kernel/ns_last_pid") as f:
        last = int(f.read())
    return range(last + 1, last + 1 + PLANTED)


@register(inputs=X, description="sin; armed (666), it leaves notes in the run directory saying that the next processes' "
                                "warm-up of erf_half began long ago, then ends its engine (os._exit).")
def plants_notes(x: torch.Tensor) -> torch.Tensor:
    case = _armed(x)
    if case is not None:
        run_dir = sys.argv[sys.argv.index("--run-dir") + 1]
        for pid in [*next_pids(), *([os.getpid()] if case == 1 else [])]:  # (1: its own engine's pid too)
            with open(os.path.join(run_dir, f"warming-{pid}"), "w") as f:  # (ipc.warming_path's name)
                f.write("0 erf_half")
        os._exit(1)
    return torch.sin(x)


@register(inputs=X, description="sin; armed (666), it rewrites the run directory's registry.json: erf_half declared as "
                                "taking 2 numbers, with a description of its own.")
def rewrites_registry(x: torch.Tensor) -> torch.Tensor:
    if _armed(x) is not None:
        path = os.path.join(sys.argv[sys.argv.index("--run-dir") + 1], "registry.json")
        with open(path) as f:
            doc = json.load(f)
        for function in doc["functions"]:
            if function["name"] == "erf_half":
                function["description"] = "forged"
                function["inputs"][0]["shape"] = [2]
        with open(path, "w") as f:
            json.dump(doc, f)
    return torch.sin(x)


# ------------------------------------------------------------ signals


@register(inputs=X, description="sin; armed (666), it registers faulthandler on SIGTERM, not chained: the signal then "
                                "writes a traceback and stops nothing.")
def holds_off_sigterm(x: torch.Tensor) -> torch.Tensor:
    if _armed(x) is not None:
        faulthandler.register(signal.SIGTERM, chain=False)
    return torch.sin(x)
