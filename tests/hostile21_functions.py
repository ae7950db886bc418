"""Hostile functions for tests/test_hostile_round19.py (loaded by name like a user
module): each misbehaves only when its first input is 666 (round 11's ``_armed``), the
second input picking how; otherwise it is ``sin``. Beside them, the functions they harm."""

from __future__ import annotations

import decimal
import importlib
import importlib.machinery
import locale
import logging
import os
import random
import subprocess
import sys
import tempfile
import types

import numpy as np
import torch
from jacobian_service import register

from tests.hostile17_functions import X, _armed  # the input, and the case it asks for (666 first)

# ------------------------------------------------------------ the import system

# What ``imports_lazily`` imports at its first call, by x[1]: modules nothing else imports.
LAZY = ("tests.hostile21_lazy", "tests.hostile21_lazy_cached", "graphlib", "tests.hostile21_lazy_blind")
ALIAS = "tests.hostile21_alias"  # no module's file: an alias as libraries make them


def _impostor(name: str) -> types.ModuleType:
    module = types.ModuleType(name)
    module.SCALE = 2.0
    return module


class _Blind:
    """A path entry's finder that finds nothing."""

    def find_spec(self, name, target=None):
        return None


class _Finder:
    """A path entry's finder serving its own module in place of ``LAZY[1]``."""

    def find_spec(self, name, target=None):
        return importlib.machinery.ModuleSpec(name, self) if name == LAZY[1] else None

    def create_module(self, spec):
        return _impostor(spec.name)

    def exec_module(self, module) -> None:
        pass


@register(inputs=X, description="sin; armed (666), it plants a module of its own where a later import finds it.")
def plants_a_module(x: torch.Tensor) -> torch.Tensor:
    case = _armed(x)
    if case == 0:  # a sys.modules entry for a module not yet imported
        sys.modules[LAZY[0]] = _impostor(LAZY[0])
    elif case == 1:  # a finder of its own for the tests package's directory
        tests_dir = os.path.dirname(os.path.abspath(__file__))
        sys.path_importer_cache[tests_dir] = _Finder()
    elif case == 2:  # a directory of its own first on sys.path, holding a module of the standard library's name
        where = tempfile.mkdtemp(prefix="hostile21-")
        with open(os.path.join(where, LAZY[2] + ".py"), "w") as f:
            f.write("SCALE = 2.0\n")
        sys.path.insert(0, where)
    elif case == 3:  # both: a sys.modules entry, and a blind finder for the directory the real module is in
        sys.path_importer_cache[os.path.dirname(os.path.abspath(__file__))] = _Blind()
        sys.modules[LAZY[3]] = _impostor(LAZY[3])
    return torch.sin(x)


@register(inputs=X, description="x * the SCALE of a module it imports at its first call (1.0); x[1] picks the module "
                                "(4: its own alias, found at the second call).")
def imports_lazily(x: torch.Tensor) -> torch.Tensor:
    which = int(float(x.detach().reshape(-1)[1]))
    if which == 4:  # a library's way: a module of its own under a name no finder finds, imported by name later
        if ALIAS in sys.modules:
            return x * importlib.import_module(ALIAS).SCALE
        sys.modules[ALIAS] = _impostor(ALIAS)
        importlib.import_module("tests.hostile21_lazy_aliased")
        return x
    module = importlib.import_module(LAZY[which])
    return x * getattr(module, "SCALE", 1.0)  # (the standard library's graphlib has none)


# ------------------------------------------------------------ state of the standard library and numpy


@register(inputs=X, description="sin; armed (666), it changes a global state of a library first (x[1] picks).")
def changes_a_state(x: torch.Tensor) -> torch.Tensor:
    case = _armed(x)
    if case == 0:
        decimal.getcontext().prec = 3
    elif case == 1:
        decimal.setcontext(decimal.Context(prec=3, traps=[decimal.Inexact]))
    elif case == 2:
        random.seed(0)
    elif case == 3:
        np.random.seed(0)
    elif case == 4:
        locale.setlocale(locale.LC_ALL, "C")
    elif case == 5:  # a variable the engine did not start with, read by the programs functions start
        os.environ["PYTHONHOME"] = "/nonexistent"
    elif case == 6:
        os.umask(0o077)
    elif case == 7:
        sys.setswitchinterval(0.25)
    elif case == 8:
        sys.set_int_max_str_digits(1000)
    elif case == 9:  # past os.environ: what programs get, not what Python shows
        os.putenv("PYTHONHOME", "/nonexistent")
    return torch.sin(x)


@register(inputs=X, description="x * sqrt(2), the root taken in decimal at the context's precision.")
def decimal_scale(x: torch.Tensor) -> torch.Tensor:
    return x * float(decimal.Decimal(2).sqrt())


@register(inputs=X, description="x + Python's random.random() (one draw each).")
def python_noise(x: torch.Tensor) -> torch.Tensor:
    return x + torch.tensor([random.random() for _ in range(x.numel())], dtype=x.dtype)


@register(inputs=X, description="x + numpy's np.random.rand (one draw each).")
def numpy_noise(x: torch.Tensor) -> torch.Tensor:
    return x + torch.from_numpy(np.random.rand(x.numel())).to(x.dtype)


@register(inputs=X, description="x * (the characters of a UTF-8 text file it reads / 2), read with open()'s default.")
def reads_text(x: torch.Tensor) -> torch.Tensor:
    with open(os.environ["HOSTILE21_TEXT"]) as f:
        return x * (len(f.read()) / 2)


@register(inputs=X, description="x * what a Python program it starts prints (1.0).")
def runs_python(x: torch.Tensor) -> torch.Tensor:
    done = subprocess.run([sys.executable, "-S", "-c", "print(1.0)"], capture_output=True, check=True, timeout=20)
    return x * float(done.stdout)


@register(inputs=X, description="sin; armed (666), it rebinds a global (1) or a closure's variable (2) of another module's "
                                "functions first.")
def rebinds_a_global(x: torch.Tensor) -> torch.Tensor:
    case = _armed(x)
    victims = sys.modules["tests.hostile21_victims"]
    if case == 1:
        victims.SCALE = 2.0
    elif case == 2:  # a variable of another function's closure
        victims.closure_scaled.__closure__[0].cell_contents = 2.0
    return torch.sin(x)


def _blank(make):
    def factory(*args, **kwargs):
        record = make(*args, **kwargs)
        record.msg, record.args = "", ()
        return record
    return factory


@register(inputs=X, description="sin; armed (666), it silences the service's log first (x[1] picks how).")
def silences_the_log(x: torch.Tensor) -> torch.Tensor:
    case = _armed(x)
    service = logging.getLogger("jacobian_service")
    if case == 1:  # a filter that drops every record
        service.addFilter(lambda record: False)
    elif case == 2:  # the handler's stream set to nowhere
        for handler in service.handlers:
            handler.setStream(open(os.devnull, "w"))
    elif case == 3:  # a record factory blanking every message
        logging.setLogRecordFactory(_blank(logging.getLogRecordFactory()))
    return torch.sin(x)
