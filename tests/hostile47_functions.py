"""Hostile functions for tests/test_hostile_round47.py (loaded by name like a user
module): each misbehaves only when its first input is 666 (round 11's ``_armed``), the
second input picking how; otherwise it is ``sin``. Beside them, the functions they harm."""

from __future__ import annotations

import os
import signal
import sys
import time
import warnings

import numpy as np
import torch
import torch.distributions as D
import torch.overrides
from jacobian_service import register

# the input, and the case it asks for (666 first)
from tests.hostile17_functions import X, _armed

# ------------------------------------------------------------ an error whose words lift their bound


def _spin(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


class _OwnHandlerError(ValueError):
    """Its words set a SIGALRM handler of their own (the bound's timer then cuts nothing)."""

    def __str__(self) -> str:
        signal.signal(signal.SIGALRM, lambda *a: None)
        _spin(3600)
        return ""


class _CancelsTimerError(ValueError):
    """Its words cancel the timer (``signal.alarm(0)``)."""

    def __str__(self) -> str:
        signal.alarm(0)
        _spin(3600)
        return ""


class _CatchesAllError(ValueError):
    """Its words catch whatever is raised into them, forever."""

    def __str__(self) -> str:
        while True:
            try:
                _spin(3600)
            except BaseException:
                pass


class _SlyError(ValueError):
    """Its words change a process-wide setting as they are made (here the default dtype),
    then come: words, and a change the engine put back anyway after the batch."""

    def __str__(self) -> str:
        torch.set_default_dtype(torch.float64)
        return "sly words"


class _WordyError(ValueError):
    def __str__(self) -> str:
        return "wordy"


def _error(case: int) -> BaseException:
    if case == 0:
        return _OwnHandlerError("a")
    if case == 1:
        return _CancelsTimerError("b")
    if case == 2:
        return _CatchesAllError("c")
    if case == 3:
        return _SlyError("d")
    if case == 4:  # a fork hook that never returns, in the engine (a fork made for the words would run it)
        os.register_at_fork(before=lambda: _spin(3600))
    elif case == 5:  # a SIGCHLD handler that never returns (a child made for the words would run it as it ends)
        signal.signal(signal.SIGCHLD, lambda *a: _spin(3600))
    return _WordyError("e")


@register(inputs=X, description="sin; armed (666), it raises an error whose words lift their own bound (x[1] picks).")
def raises47(x: torch.Tensor) -> torch.Tensor:
    case = _armed(x)
    if case is not None:
        raise _error(case)
    return torch.sin(x)


# ------------------------------------------------------------ torch's registries edited in place


def _zero_kl(p: D.Normal, q: D.Normal) -> torch.Tensor:
    return torch.zeros(torch.broadcast_shapes(p.batch_shape, q.batch_shape), dtype=p.loc.dtype)


def _edits(case: int) -> None:
    if case == 0:  # its own KL for two Normals, over torch's (register_kl replaces the entry)
        D.register_kl(D.Normal, D.Normal)(_zero_kl)
    elif case == 1:  # the same, planted in the memo kl_divergence reads first
        import torch.distributions.kl as kl
        kl._KL_MEMOIZE[D.Normal, D.Normal] = _zero_kl
    elif case == 2:  # a KL for a pair torch has none for, where others meet NotImplementedError
        D.register_kl(D.Categorical, D.Normal)(lambda p, q: torch.zeros(()))
    elif case == 3:  # a method's results no longer wrapped in a subclass's type
        torch.overrides.get_default_nowrap_functions().add(torch.Tensor.mul)


# One function a case: the engine names each (function, setting) once in its log.
@register(inputs=X, description="sin; armed (666), it registers its own KL for two Normals.")
def kl_replaces47(x: torch.Tensor) -> torch.Tensor:
    _edits(0 if _armed(x) is not None else -1)
    return torch.sin(x)


@register(inputs=X, description="sin; armed (666), it plants its own KL for two Normals in kl_divergence's memo.")
def kl_plants47(x: torch.Tensor) -> torch.Tensor:
    _edits(1 if _armed(x) is not None else -1)
    return torch.sin(x)


@register(inputs=X, description="sin; armed (666), it registers a KL for (Categorical, Normal), which torch lacks.")
def kl_adds47(x: torch.Tensor) -> torch.Tensor:
    _edits(2 if _armed(x) is not None else -1)
    return torch.sin(x)


@register(inputs=X, description="sin; armed (666), it adds Tensor.mul to torch.overrides' no-wrap set.")
def nowrap47(x: torch.Tensor) -> torch.Tensor:
    _edits(3 if _armed(x) is not None else -1)
    return torch.sin(x)


@register(inputs=X, description="The KL divergence of Normal(x, 1) from Normal(0, 1), elementwise: x**2 / 2.")
def kl47(x: torch.Tensor) -> torch.Tensor:
    return D.kl_divergence(D.Normal(x, torch.ones_like(x)), D.Normal(torch.zeros_like(x), torch.ones_like(x)))


@register(inputs=X, description="x, or 0 where torch has a KL of a Categorical from a Normal (it has none).")
def kl_missing47(x: torch.Tensor) -> torch.Tensor:
    try:
        D.kl_divergence(D.Categorical(probs=torch.tensor([0.5, 0.5])), D.Normal(torch.tensor(0.0), torch.tensor(1.0)))
    except NotImplementedError:
        return x * 1.0
    return x * 0.0


class Scaled(torch.Tensor):
    """A subclass whose ``halve`` its results keep (``mul``'s result is a Scaled)."""

    def halve(self) -> torch.Tensor:
        return self / 2


@register(inputs=X, description="x * 3 through a tensor subclass, halved by its own method: 1.5 x.")
def subclass47(x: torch.Tensor) -> torch.Tensor:
    return x.detach().as_subclass(Scaled).mul(3).halve().as_subclass(torch.Tensor) + 0 * x


# ------------------------------------------------------------ torch's and numpy's print options, torch.func's permissions


@register(inputs=X, description="sin; armed (666), it sets torch's and numpy's print options to print whole, at one digit.")
def printopts47(x: torch.Tensor) -> torch.Tensor:
    if _armed(x) is not None:
        torch.set_printoptions(threshold=10**9, precision=1)
        np.set_printoptions(threshold=sys.maxsize, precision=1)
    return torch.sin(x)


@register(inputs=X, description="The lengths of str of a 2,000-element tensor, a 2,000-element array and a third (+ 0 x).")
def printed47(x: torch.Tensor) -> torch.Tensor:
    said = [len(str(torch.zeros(2000))), len(str(np.zeros(2000))), len(str(torch.tensor(1 / 3)))]
    return x * 0 + torch.tensor(said, dtype=x.dtype)


@register(inputs=X, description="sin; armed (666), it allows torch.func's in-place requires_grad and leaves it so.")
def permits47(x: torch.Tensor) -> torch.Tensor:
    if _armed(x) is not None:
        torch._C._functorch.set_inplace_requires_grad_allowed(True)
    return torch.sin(x)


@register(inputs=X, description="2 x, calling x.requires_grad_() first (which torch.func's transforms refuse).")
def requires_grad47(x: torch.Tensor) -> torch.Tensor:
    x.requires_grad_()
    return x * 2


# ------------------------------------------------------------ torch.distributions' names


@register(inputs=X, description="sin; armed (666), it rebinds torch.distributions' names (x[1] picks).")
def distributions47(x: torch.Tensor) -> torch.Tensor:
    case = _armed(x)
    if case == 0:
        D.Normal.log_prob = lambda self, value: torch.zeros_like(value)
    elif case == 1:
        D.Distribution.set_default_validate_args(False)
    elif case == 2:
        D.kl_divergence = lambda p, q: torch.zeros(())
    return torch.sin(x)


@register(inputs=X, description="The log-density of 0 under Normal(x, 1): -x**2 / 2 - log(2 pi) / 2.")
def log_prob47(x: torch.Tensor) -> torch.Tensor:
    return D.Normal(x, torch.ones_like(x)).log_prob(torch.zeros_like(x))


@register(inputs=X, description="x, from a Normal of scale -1 (torch's ValueError: a 500).")
def invalid47(x: torch.Tensor) -> torch.Tensor:
    return D.Normal(x, -torch.ones_like(x)).mean


# ------------------------------------------------------------ warnings' names


def _raises(*args: object, **kwargs: object) -> None:
    raise RuntimeError("a hostile showwarning")


@register(inputs=X, description="sin; armed (666), it sets warnings.showwarning to one that raises.")
def showwarning47(x: torch.Tensor) -> torch.Tensor:
    if _armed(x) is not None:
        warnings.showwarning = _raises
    return torch.sin(x)


_WARNED = [0]


@register(inputs=X, description="x, warning on its way (a new message each call: shown each time).")
def warns47(x: torch.Tensor) -> torch.Tensor:
    _WARNED[0] += 1
    warnings.warn(f"warns47's own warning, call {_WARNED[0]}")
    return x * 1
