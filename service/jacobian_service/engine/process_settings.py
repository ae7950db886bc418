"""Process-wide settings a function may change, put back after each batch.

A function runs in the engine process that serves every other function, so what it
changes of the process's settings and leaves so would change every later request of
every function, for as long as the engine lives. Measured or reproduced:

- ``torch.set_default_dtype(torch.float64)``: every later ``evaluate`` of a function that
  builds ``torch.ones(3)`` answered float64, not float32;
- ``warnings.simplefilter("error")``: every other function that warns on its way (as
  much user code does) failed with 500 ``function_error`` "UserWarning: ...";
- anomaly detection (every later backward pass slower), 64 threads, TF32 matmuls (every
  later result on the GPU less precise), autocast left entered (every later function's
  matmuls in bfloat16: an ``mlp`` Jacobian 1e-3 off, against 1e-7 in float32),
  denormals flushed to zero (``torch.set_flush_denormal``: every later function's tiny
  values zero), attention's backends switched off (``enable_math_sdp(False)`` and
  ``enable_flash_sdp(False)``: every later function's ``scaled_dot_product_attention``
  failed, "No viable backend"), ``gc.disable()`` (memory held by reference
  cycles never freed), ``gc.set_debug(gc.DEBUG_SAVEALL)`` (every later function's
  cyclic garbage kept for good), ``gc.unfreeze()`` (what ``heap.freeze_heap`` took out of the
  collector's sight walked again by every full collection, ~0.2 s each), a low recursion limit (a raised one: a later function's deep recursion through C overflowed the
  engine's stack, SIGSEGV, where it raised RecursionError), ``numpy.seterr(all="raise")``;
- ``signal.alarm(2)`` (or any interval timer): two seconds later SIGALRM killed the
  engine, in the middle of whichever function's request was running then, which took
  the blame; a CPU-time or file-size limit does the same with SIGXCPU / SIGXFSZ, and a
  ``faulthandler.dump_traceback_later(t, exit=True)`` watchdog by its own thread;
- ``sys.setprofile(f)``: every later call of every function ran through ``f`` (40 %
  slower for a small one), as would a trace function;
- a guard of torch's over the thread's dispatch keys entered and kept
  (``torch._C._DisableFuncTorch()``: every later Jacobian of every function all zeros,
  with a 200; the Python key included: every later request a 500), and
  ``torch.DisableTorchFunction()`` kept (every later subclass's ``__torch_function__``
  skipped, silently);
- a torch function mode entered and never exited (``mode.__enter__()``): every later
  torch call of every function went through it (one that doubled ``sin`` made every
  later Jacobian of ``sin`` twice the truth); a forward-AD dual level left entered:
  every later forward-mode Jacobian failed, "Nested forward mode AD is not supported";
- signal handlers and the signal mask (SIGTERM ignored or blocked, and the engine would
  no longer stop when told), signals ignored through libc, which Python does not see
  (SIGCHLD: every later ``subprocess.run`` said 0 for a program that failed), the
  core-file size limit (a later crash wrote a 536 MB core file), the umask, the niceness, ``sys.stdout`` and ``sys.stderr``,
  descriptors 0-2 (redirected to ``/dev/null``, the engine's log went with them) and the
  engine's own log pipe (a file ``dup2``-ed over it took every later line the engine logged);
- the environment: ``PATH`` emptied, and every later function that ran a program
  (``subprocess``, ``shutil.which``) failed; ``TZ`` set and ``time.tzset()``, and every
  later function's local time, and the engine's log, moved to that zone;
- new threads' stack size and the default socket timeout (1 ms: every later function's
  connections timed out);
- memory locking: ``mlockall(MCL_FUTURE)`` locked every mapping made after it, and, run
  unprivileged, every later allocation of every function past ``RLIMIT_MEMLOCK`` (8 MiB)
  failed (a 507 ``out_of_memory``); as root, each was faulted in whole at once;
- the execution domain (``personality(UNAME26)``: every later ``os.uname()`` named
  kernel 2.6.78; ``READ_IMPLIES_EXEC``: every later readable mapping executable);
- in an engine run as root, its root directory and namespaces (``chroot``,
  ``unshare(CLONE_NEWNET)``: every later function's network unreachable; ``CLONE_NEWUTS``
  and ``sethostname``: every later ``gethostname`` the function's);
- torch.nn's global module hooks (one doubling every output doubled every later
  ``nn.Module``'s Jacobian, silently), fork hooks (``os.register_at_fork``: one ending the
  child ran in every later function's ``os.fork``, whose children all exited at once) and the thread's timer slack (30 s of it made the
  idle engine oversleep its heartbeat, and the supervisor killed it as hung);
- the standard library's and numpy's global state (decimal's context, the locale, the
  global random generators: ``library_state``) and what a function planted for another's
  first import (``imports``).

The engine takes these settings as it starts and, after each batch, puts back what the
batch changed, naming the function in the log once per setting. Where a library may
legitimately change a setting as it is lazily imported (warning filters), only the harmful
direction counts: warnings made errors (or filters reset), a lower int-string digit limit,
environment variables the engine started with changed or removed (torch itself adds ``TORCHINDUCTOR_CACHE_DIR`` on a first use). A few cannot always be put
back: a lowered hard resource limit or a raised niceness need a privilege the engine
may lack, descriptors a function closed (all of them: ``os.closerange``) are gone, an
engine started as root that a function switched to another user for good (``os.setuid``)
or that gave up capabilities cannot take them back (every later function ran as
``nobody``), and no process can lift a seccomp filter (one failing ``uname`` failed every later
function's ``os.uname()``), no_new_privs or memory-deny-write-execute it set on itself.
Then :attr:`ProcessSettings.unrestorable` names the function and the setting, and the
engine process leaves (as for a stray thread) for one with its settings whole.
"""

from __future__ import annotations

import _signal
import ctypes
import errno
import faulthandler
import fcntl
import functools
import gc
import io
import itertools
import logging
import operator
import os
import resource
import select
import signal
import socket
import sys
import threading
import time
import warnings
from typing import Any, Callable, NamedTuple

import numpy as np
import torch
import torch.autograd.forward_ad as _forward_ad

from ..heap import collector_enabled, put_collector, refreeze, thawed
from ..ipc import LOG_FD_ENV
from ..logs import service_loggers
from ..procfs import descriptor_identity
from .imports import Imports, path_changed, path_entries, put_path
from .library_state import DecimalContext, Generator, ProgramEnvironment, generators, locale_now, put_locale
from .torch_kernels import KERNELS
from .torch_tables import KLTables, NoWrap

__all__ = ["ProcessSettings", "fork_hook_lists"]

log = logging.getLogger("jacobian_service.engine")


class _Setting(NamedTuple):
    what: str
    get: Callable[[], Any]  # each a call of a microsecond or less
    put: Callable[[Any], None]
    changed: Callable[[Any, Any], bool] = operator.ne  # (now, taken)
    # For the pass that finds nothing changed (nearly every one): the lines of
    # /proc/self/status, as (first field, last field) of each run of lines, that tell
    # this setting's value whole. That pass reads them from the one text it reads anyway,
    # in place of ``get``'s own system calls; the same lines mean the same value, and
    # lines that differ send the pass to ``get`` (``ProcessSettings._unchanged``).
    status: tuple[tuple[bytes, bytes], ...] = ()
    # Given the value taken, a cheaper stand-in for ``get`` in that pass, whose reading
    # equal to the one taken means the setting unchanged (None: none for that value,
    # ``get`` is read); with ``status``, a getter of what those lines do not tell (None:
    # nothing).
    quick: Callable[[Any], Callable[[], Any] | None] | None = None
    # What the log says the setting was changed to, and put back to (value now, value
    # taken): where the values themselves tell nothing (a table's version tag).
    shown: tuple[Callable[[Any, Any], Any], Any] | None = None


# Each getter of a tuple called, as ``tuple(map(_call, getters))``: a generator
# expression in its place cost ~3x the instructions (frames resumed one item at a time).
_call: Callable[[Callable[[], Any]], Any] = getattr(operator, "call", lambda f: f())  # (3.11+)


# The default device as torch keeps it: the context ``torch.set_default_device`` installs
# (None: the CPU), read in a tenth of a microsecond; ``torch.get_default_device()`` takes
# 4 us. (Private; the public getter stands in if a torch lacks it.)
_DEVICE_CONTEXT = getattr(torch, "_GLOBAL_DEVICE_CONTEXT", None)


def _default_device() -> Any:
    if _DEVICE_CONTEXT is None:
        return torch.get_default_device()
    # From the thread's own dict of the (thread-local) context: the attribute exists only
    # once a default device is set, and ``getattr`` with a default raised and caught an
    # AttributeError at every batch.
    return _DEVICE_CONTEXT.__dict__.get("device_context")


def _set_default_device(taken: Any) -> None:
    if taken is None or taken == torch.device("cpu"):
        # None, not "cpu": an explicit device installs a mode every torch call then passes through.
        torch.set_default_device(None)
    else:
        torch.set_default_device(taken if isinstance(taken, torch.device) else taken.device)


def _setter(obj: Any, name: str) -> Callable[[Any], None]:
    return lambda value: setattr(obj, name, value)


def _flag(module: Any, name: str) -> Callable[[], Any]:
    """What ``module.name`` reads, for a flag of ``torch.backends`` (a ``ContextProp`` of
    the module's class): its getter, torch's own C function. Through the attribute, the
    module's Python descriptor took ~1 us a read, five reads a batch."""
    getter = getattr(vars(type(module)).get(name), "getter", None)
    if callable(getter) and type(getter).__name__ == "builtin_function_or_method":
        return getter
    return lambda: getattr(module, name)


def _filters() -> list[Any]:
    return list(warnings.filters)


def _repaired(now: list[Any], taken: list[Any]) -> list[Any]:
    """The filters as taken, under any new filter that makes no error (a library's
    "ignore", added as it was lazily imported, stays): filters that made warnings errors,
    a reset, or a reordering that put an "error" above the filters it was under, undone."""
    return [f for f in now if f[0] != "error" and f not in taken] + taken


def _filters_changed(now: list[Any], taken: list[Any]) -> bool:
    return now != taken and _repaired(now, taken) != now


def _put_filters(taken: list[Any]) -> None:
    warnings.filters[:] = _repaired(list(warnings.filters), taken)
    _filters_mutated()  # what warnings' own functions call


# Autocast's state is the thread's own (the engine's thread runs the functions), on the
# CPU and on CUDA: (is it on, get its dtype, turn it, set its dtype) for each. torch 2.4
# takes the device as an argument; 2.3, which pyproject allows, has a pair of each.
if hasattr(torch, "get_autocast_dtype"):
    _AUTOCAST = tuple((functools.partial(torch.is_autocast_enabled, d), functools.partial(torch.get_autocast_dtype, d),
                       functools.partial(torch.set_autocast_enabled, d), functools.partial(torch.set_autocast_dtype, d))
                      for d in ("cpu", "cuda"))
else:  # pragma: no cover - torch 2.3
    _AUTOCAST = ((torch.is_autocast_cpu_enabled, torch.get_autocast_cpu_dtype, torch.set_autocast_cpu_enabled,
                  torch.set_autocast_cpu_dtype),
                 (torch.is_autocast_enabled, torch.get_autocast_gpu_dtype, torch.set_autocast_enabled,
                  torch.set_autocast_gpu_dtype))


_AUTOCAST_GETTERS = tuple(get for enabled, dtype, _, _ in _AUTOCAST for get in (enabled, dtype))


def _autocast() -> tuple[tuple[bool, Any], ...]:
    cpu_on, cpu_dtype, cuda_on, cuda_dtype = map(_call, _AUTOCAST_GETTERS)
    return (cpu_on, cpu_dtype), (cuda_on, cuda_dtype)


def _put_autocast(taken: tuple[tuple[bool, Any], ...]) -> None:
    for (_, _, turn, set_dtype), (enabled, dtype) in zip(_AUTOCAST, taken):
        turn(enabled)
        set_dtype(dtype)
    torch.clear_autocast_cache()  # the weights it cast, kept while autocast was entered


# Scaled-dot-product attention's backends, switched on and off for the whole process
# (``torch.backends.cuda.enable_math_sdp`` and its siblings, which the CPU's attention
# obeys too): those this torch has.
_SDP = tuple((getattr(torch.backends.cuda, f"{name}_sdp_enabled"), getattr(torch.backends.cuda, f"enable_{name}_sdp"))
             for name in ("flash", "mem_efficient", "math", "cudnn")
             if hasattr(torch.backends.cuda, f"{name}_sdp_enabled"))


_SDP_GETTERS = tuple(enabled for enabled, _ in _SDP)


def _sdp() -> tuple[bool, ...]:
    return tuple(map(_call, _SDP_GETTERS))


def _put_sdp(taken: tuple[bool, ...]) -> None:
    for (_, enable), on in zip(_SDP, taken):
        enable(on)


# Flush-to-zero is a flag of the thread's floating-point unit, which torch sets and cannot
# read back; Python's own float arithmetic runs on the same unit, so a denormal times one
# tells (50 ns). (Module globals: a constant expression would be folded at compile time.)
_DENORMAL, _ONE = 5e-324, 1.0


def _flushes_denormals() -> bool:
    return _DENORMAL * _ONE == 0.0


def _put_flush_denormals(taken: bool) -> None:
    torch.set_flush_denormal(taken)


# float32 precision, as torch 2.9+ sets it per backend and operation
# (``torch.backends.fp32_precision = "tf32"``, ``torch.backends.mkldnn.matmul.fp32_precision
# = "bf16"``: the API torch's documentation now recommends), beside the legacy
# ``set_float32_matmul_precision``. Once the two disagree the legacy getter raises
# ("mix of the legacy and new APIs"): read here, that ended the engine after the
# batch, and a functions module that set it as it was imported kept every engine from
# starting. Parents first: setting one sets those under it.
_FP32_PRECISIONS = tuple(
    obj for obj in (torch.backends, getattr(torch.backends, "mkldnn", None),
                    *(getattr(getattr(torch.backends, "mkldnn", None), op, None) for op in ("matmul", "conv", "rnn")),
                    getattr(getattr(torch.backends, "cuda", None), "matmul", None),
                    getattr(torch.backends, "cudnn", None),
                    *(getattr(getattr(torch.backends, "cudnn", None), op, None) for op in ("conv", "rnn")))
    if isinstance(getattr(obj, "fp32_precision", None), str))




def _fp32_getter(obj: Any) -> Callable[[], str]:
    """What ``obj.fp32_precision`` reads, as a call of torch's own getter: through the
    attribute, torch's Python property machinery (a module's descriptor, or a
    ``__getattr__``) cost ~1 us a read, nine reads a batch; the getter alone ~0.1 us.
    Where this torch lays it out otherwise, the attribute."""
    getter = getattr(torch._C, "_get_fp32_precision_getter", None)
    own = getattr(obj, "__dict__", {})
    where = (own.get("backend"), own.get("op"))  # torch.backends._FP32Precision
    prop = vars(type(obj)).get("fp32_precision")
    inner = getattr(prop, "getter", None)  # a module's ContextProp: a closure over (backend, op)
    if getattr(getattr(inner, "__code__", None), "co_freevars", None) == ("backend", "op"):
        where = tuple(cell.cell_contents for cell in inner.__closure__)
    if getter is not None and all(isinstance(name, str) for name in where):
        return functools.partial(getter, *where)
    return lambda: obj.fp32_precision


_FP32_GETTERS = tuple(_fp32_getter(obj) for obj in _FP32_PRECISIONS)
_LEGACY_FP32 = getattr(torch._C, "_get_float32_matmul_precision", torch.get_float32_matmul_precision)


def _float32_precision() -> tuple[str | None, tuple[str, ...]]:
    """The legacy matmul precision (None where the per-backend ones disagree with it),
    and each per-backend one."""
    try:
        legacy: str | None = _LEGACY_FP32()
    except RuntimeError:  # "mix of the legacy and new APIs"
        legacy = None
    return legacy, tuple(map(_call, _FP32_GETTERS))


def _put_float32_precision(taken: tuple[str | None, tuple[str, ...]]) -> None:
    legacy, precisions = taken
    if legacy is not None:
        torch.set_float32_matmul_precision(legacy)
    for obj, precision in zip(_FP32_PRECISIONS, precisions):
        obj.fp32_precision = precision


def _gc_debug() -> tuple[int, int]:
    """``gc.set_debug(gc.DEBUG_SAVEALL)`` kept every later function's cyclic garbage in
    ``gc.garbage`` for as long as the engine lived (memory only a restart gave back);
    ``DEBUG_STATS`` wrote a report to stderr at every collection. The flags, and how
    long ``gc.garbage`` was."""
    return gc.get_debug(), len(gc.garbage)


def _gc_debug_changed(now: tuple[int, int], taken: tuple[int, int]) -> bool:
    return now[0] != taken[0]


def _digits_lowered(now: int, taken: int) -> bool:
    return now != 0 and (taken == 0 or now < taken)  # 0 is no limit


def _put_gc_debug(taken: tuple[int, int]) -> None:
    gc.set_debug(taken[0])
    del gc.garbage[taken[1]:]  # what the flags kept meanwhile: the batch's own garbage, freed


def _cwd() -> str:
    try:
        return os.getcwd()
    except OSError:  # removed under us: nothing to compare with
        return ""


def _chdir(path: str) -> None:
    try:
        os.chdir(path)
    except OSError:
        pass


def _umask() -> int:
    mask = os.umask(0o022)  # no getter: set and set back, two system calls of 0.2 us
    os.umask(mask)
    return mask


def _function_modes() -> int:
    return torch._C._len_torch_function_stack()


def _pop_function_modes(taken: int) -> None:
    while torch._C._len_torch_function_stack() > taken:
        torch._C._pop_torch_function_stack()


def _dispatch_modes() -> int:
    return torch._C._len_torch_dispatch_stack()


def _pop_dispatch_modes(taken: int) -> None:
    from torch.utils._python_dispatch import _pop_mode

    while torch._C._len_torch_dispatch_stack() > taken:
        _pop_mode()


def _saved_tensors_hooks() -> Any:
    return torch._C._autograd._top_saved_tensors_default_hooks(False)


def _pop_saved_tensors_hooks(taken: Any) -> None:
    while torch._C._autograd._top_saved_tensors_default_hooks(False) is not None:  # none when taken
        torch._C._autograd._pop_saved_tensors_default_hooks()


# torch.func's transforms keep their levels on a stack of the thread's (vmap, grad, jvp,
# functionalize; ``_vmap_increment_nesting`` and its kin without the decrement): one left
# there made every later torch.func call of every function fail, "layer.key() ==
# TransformType::Grad INTERNAL ASSERT FAILED" for the function, 500 internal_error for
# every other, for as long as the engine lived.
_functorch = torch._C._functorch


def _transform_levels() -> int:
    return _functorch.get_dynamic_layer_stack_depth()


def _pop_transform_levels(taken: int) -> None:
    _functorch.pop_dynamic_layer_stack_and_undo_to_depth(taken)


# Inference mode entered and never exited (``torch.inference_mode().__enter__()``): every
# later tensor an inference tensor, and every later function that takes a gradient itself
# (``torch.autograd.grad``) failed, "element 0 of tensors does not require grad".
# Its guard cannot be reached to exit it; a guard of "off" entered over it, and kept
# (one per time it is found), puts the thread back as it was.
_OUT_OF_INFERENCE: list[Any] = []


def _leave_inference_mode(taken: bool) -> None:
    if not taken and torch.is_inference_mode_enabled():
        _OUT_OF_INFERENCE.append(torch._C._InferenceMode(False))


# torch's dispatch keys of the thread, those it adds to every call (included) and those
# it skips (excluded), as a guard of torch's own sets them: ``torch._C._DisableFuncTorch()``
# entered and kept (a global, a generator suspended in its ``with``) made every later
# Jacobian of every function all zeros, with a 200, for as long as the engine lived; the
# Python key included (``_IncludeDispatchKeyGuard``) failed every later request of every
# function, 500 ``internal_error``; the CPU's excluded, the same. Read after the settings
# whose own guards set keys (inference mode, autocast, torch.func's levels, dispatch
# modes), which each put theirs back first. Their guards cannot be reached to exit them;
# a guard forcing the keys taken, entered over them and kept for the process's life (its
# end would set the keys it found), puts the thread back as it was.
_FORCED_KEYS: list[Any] = []
_KEY_SET = torch._C.DispatchKeySet
_INCLUDED, _EXCLUDED = torch._C._dispatch_tls_local_include_set, torch._C._dispatch_tls_local_exclude_set


def _dispatch_keys() -> tuple[int, int]:
    """Both sets' bits (~1.4 us on the 2-core VM: four calls of pybind's)."""
    return _INCLUDED().raw_repr(), _EXCLUDED().raw_repr()


def _put_dispatch_keys(taken: tuple[int, int]) -> None:
    guard = torch._C._ForceDispatchKeyGuard(_KEY_SET.from_raw_repr(taken[0]), _KEY_SET.from_raw_repr(taken[1]))
    guard.__enter__()
    _FORCED_KEYS.append(guard)
    if _dispatch_keys() != taken:
        raise RuntimeError("torch did not take the keys back")


def _shown_keys(keys: tuple[int, int], taken: tuple[int, int]) -> str:
    """The keys added and taken away, by name (not the sets' bits)."""
    def names(raw: int) -> list[str]:
        return [name for name in str(_KEY_SET.from_raw_repr(raw)).partition("(")[2].rstrip(")").split(", ") if name]

    parts = []
    for what, now, was in (("included", keys[0], taken[0]), ("excluded", keys[1], taken[1])):
        added = sorted(set(names(now)) - set(names(was)))
        gone = sorted(set(names(was)) - set(names(now)))
        if added:
            parts.append(f"{what} {', '.join(added)}")
        if gone:
            parts.append(f"no longer {what} {', '.join(gone)}")
    return "; ".join(parts) or "other backend bits"


def _dual_level() -> int:
    return _forward_ad._current_level  # -1: none entered


def _exit_dual_levels(taken: int) -> None:
    while _forward_ad._current_level > taken:
        _forward_ad.exit_dual_level()


def _any_replaced(now: tuple[Any, ...], taken: tuple[Any, ...]) -> bool:
    return any(a is not b for a, b in zip(now, taken))


def _identities(get: Callable[[], tuple[Any, ...]]) -> Callable[[], tuple[int, ...]]:
    """A stand-in for a setting of objects tested by identity (hooks, handlers, streams):
    their ids, compared as values in one step with the rest (``_Setting.quick``). The
    objects taken are kept alive by the values taken, so no other object takes one of
    their ids: the same ids are the same objects, whatever their ``__eq__`` says."""
    return lambda: tuple(map(id, get()))


def _hook_changed(now: Any, taken: Any) -> bool:
    # Only a hook a function added counts: under the in-process layout the engine's thread
    # may have been made without the hook its maker's thread had (a debugger's).
    return now is not None and now is not taken


# Signals whose handler a function could change to the harm of the engine (SIGTERM
# ignored: it no longer stops when told; SIGALRM/SIGXCPU caught elsewhere...). Read
# through _signal: signal.getsignal wraps each answer in an enum, 0.6 us a signal.
_SIGNALS = tuple(int(getattr(signal, name)) for name in (
    "SIGHUP", "SIGINT", "SIGQUIT", "SIGTERM", "SIGALRM", "SIGVTALRM", "SIGPROF", "SIGUSR1", "SIGUSR2",
    "SIGPIPE", "SIGCHLD", "SIGXCPU", "SIGXFSZ", "SIGTSTP", "SIGTTIN", "SIGTTOU") if hasattr(signal, name))
_getsignal = _signal.getsignal
# Those that tell a process to stop, which faulthandler can take over unseen (``restore``).
_STOP_SIGNALS = tuple(int(getattr(signal, name)) for name in ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT")
                      if hasattr(signal, name))


def _handlers() -> tuple[Any, ...]:
    return tuple(map(_getsignal, _SIGNALS))


def _put_handlers(taken: tuple[Any, ...]) -> None:
    if threading.current_thread() is not threading.main_thread():
        return  # only the main thread can set them, and so a function on another cannot have
    for number, now, handler in zip(_SIGNALS, _handlers(), taken):
        if now is not handler and handler is not None:  # None: set outside Python, nothing to put back
            signal.signal(number, handler)


# /proc/self/status, read once per pass over the settings (15 us a read; two settings
# take a field of it): emptied as each pass starts.
_STATUS: list[bytes] = []


class _NoDescriptor(Exception):
    """No descriptor free to read a file with: what a setting read from it is unknown
    this pass, not changed (the descriptor watch recycles an engine left so)."""


def _status(field: bytes) -> bytes | None:
    """A field of /proc/self/status as this pass read it; None where there is none (or
    no file to read: not Linux, or a function's filter refused the read).

    A function that used up the open-file limit failed the read too; taken for a file
    refused, every field then read as changed (the seccomp state, the capabilities, the
    ignored signals), and the engine left naming "a seccomp filter" that no function
    had set: :class:`_NoDescriptor` instead."""
    data = _status_data()
    start = data.find(b"\n" + field + b":")
    if start < 0:
        return None
    start += len(field) + 2
    end = data.find(b"\n", start)
    return data[start:end if end >= 0 else None].strip()


def _status_data() -> bytes:
    """/proc/self/status as this pass read it (read now if not yet), after a newline:
    every field's line starts with one."""
    if not _STATUS:
        try:
            _STATUS.append(b"\n" + _status_text())
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                raise _NoDescriptor() from exc
            _STATUS.append(b"")
    return _STATUS[0]


def _status_line_numbers(runs: tuple[tuple[bytes, bytes], ...]) -> dict[tuple[bytes, bytes], range]:
    """Where each run of lines of /proc/self/status, given as its (first, last) field,
    is in the text read now, by line number: those it has."""
    numbers = {line.split(b":", 1)[0]: n for n, line in enumerate(_status_data().split(b"\n"))}
    return {(first, last): range(numbers[first], numbers[last] + 1) for first, last in runs
            if first in numbers and last in numbers and numbers[first] <= numbers[last]}


def _status_lines(numbers: list[int]) -> Callable[[], Any]:
    """A reader of lines of /proc/self/status by number: one comparison of these stands
    for the settings they tell (``_Setting.status``). By number, in one split and one
    pick: which lines a process's status has, and in what order, is the kernel's build's
    (its Vm lines, whose numbers change width, move the lines' offsets, never their
    numbers); a line is compared with its field's name, so another field at that number
    is a difference, sent to the full pass, as is a text with fewer lines (IndexError).
    Looked for by name instead, each line took a bytes.find (~2 k instructions a call,
    most of it parsing its arguments): ~48 k a pass, more than the system calls saved."""
    pick = operator.itemgetter(*numbers, 0)  # (two at least: a tuple, always)
    return lambda: pick(_status_data().split(b"\n"))


# A descriptor of this process's /proc/<pid>/status kept open by an engine process
# (``keep_status_open``), read again from its start at each pass: one system call where
# opening the file again (a lookup through /proc) and closing it took three more, most of
# the read's cost (~2/3 of it on the 2-core VM).
_STATUS_FD: list[int] = []


def keep_status_open() -> None:
    """Keep /proc/self/status open for the passes to come (an engine process, which owns
    its descriptors: opened before its descriptor watch takes its count)."""
    if not _STATUS_FD:
        try:
            _STATUS_FD.append(os.open("/proc/self/status", os.O_RDONLY | os.O_CLOEXEC))
        except OSError:  # not Linux, or refused: each pass opens the file
            pass


def _status_text() -> bytes:
    """/proc/self/status now: through the kept descriptor while it is still this
    process's status file, else opened afresh (and kept again). A function may close the
    kept descriptor, or put another file at its number (``os.closerange``, ``dup2``):
    what is read there must name this process (its ``Pid`` line), or it is not used. A
    forked child's copy names its parent, and is not used either."""
    if _STATUS_FD:
        fd = _STATUS_FD[0]
        try:
            text = os.pread(fd, 1 << 16, 0)
        except OSError:
            text = b""
        if len(text) < 1 << 16 and f"\nPid:\t{os.getpid()}\n".encode() in text:
            return text
        _STATUS_FD.clear()  # not ours any more: its number is left alone (it may be the function's now)
        text = _read_file("/proc/self/status")
        keep_status_open()
        return text
    return _read_file("/proc/self/status")


def _read_file(path: str) -> bytes:
    """A small file whole, through the descriptor alone: ``open()``'s buffered file
    object asks the kernel four more things (fstat twice, isatty, a seek) and builds
    two objects, at every batch."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        parts = []
        while chunk := os.read(fd, 1 << 16):
            parts.append(chunk)
        return b"".join(parts)
    finally:
        os.close(fd)


def _status_number(field: bytes) -> int | None:
    try:
        return int(_status(field))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def _ignored() -> int:
    """The signals the kernel ignores for this process (``SigIgn``), as a bit mask. Python
    knows only the handlers set through it: ``libc.signal(SIGCHLD, SIG_IGN)`` through
    ctypes changed nothing it reads, and every later function's ``subprocess.run(...)``
    then said 0 for a program that failed (ignored SIGCHLD: no exit status to wait for)."""
    try:
        return int(_status(b"SigIgn") or b"0", 16)
    except ValueError:
        return 0


def _put_ignored(taken: int) -> None:
    if threading.current_thread() is not threading.main_thread():
        return
    changed = _ignored() ^ taken
    for number in _SIGNALS:
        if changed & (1 << (number - 1)):
            handler = _getsignal(number)  # what Python set (or found at start), set again
            signal.signal(number, signal.SIG_DFL if handler is None else handler)


# The bits of the signals above in a mask of /proc/self/status (signal n: bit n - 1).
_SIGNAL_BITS = sum(1 << (number - 1) for number in _SIGNALS)


def _caught() -> int:
    """Which of the signals above the kernel hands to a handler (``SigCgt``), as a bit
    mask. A handler of C's installed through ctypes (``libc.signal(SIGTERM, f)``, or
    ``sigaction``) is no handler Python knows of: its table still said the default, and
    SIGTERM then ran ``f`` and stopped nothing: the supervisor's restart and serve's
    stop waited for an engine that never ended (serve's stop killed it 10 s later).
    (Signals outside those above are left alone: a library's handlers of its own.)"""
    try:
        return int(_status(b"SigCgt") or b"0", 16) & _SIGNAL_BITS
    except ValueError:
        return 0


def _caught_shown(now: int, taken: int) -> str:
    """For the log: the signals whose handler changed, by name."""
    return "a handler of its own on " + ", ".join(signal.Signals(n).name for n in _SIGNALS
                                                   if (now ^ taken) & (1 << (n - 1)))


def _put_caught(taken: int) -> None:
    """Each signal whose handler changed outside Python given the one Python has (or
    the default): ``signal.signal`` sets the kernel's too."""
    if threading.current_thread() is not threading.main_thread():
        return
    changed = _caught() ^ taken
    for number in _SIGNALS:
        if changed & (1 << (number - 1)):
            handler = _getsignal(number)
            signal.signal(number, signal.SIG_DFL if handler is None else handler)


def _mask() -> set[Any]:
    return signal.pthread_sigmask(signal.SIG_BLOCK, ())


def _put_mask(taken: set[Any]) -> None:
    signal.pthread_sigmask(signal.SIG_SETMASK, taken)


# A timer a function armed fires later, in the middle of another function's request, and
# its signal's default action ends the engine: disarmed, whatever it was.
_TIMERS = tuple(getattr(signal, name) for name in ("ITIMER_REAL", "ITIMER_VIRTUAL", "ITIMER_PROF") if hasattr(signal, name))


def _timers() -> tuple[tuple[float, float], ...]:
    return tuple(map(signal.getitimer, _TIMERS))


def _disarm(taken: Any) -> None:
    for which in _TIMERS:
        signal.setitimer(which, 0.0)


def _armed(now: Any, taken: Any) -> bool:
    return any(delay or interval for delay, interval in now) and not any(d or i for d, i in taken)


_LIMITS = tuple(getattr(resource, name) for name in (
    "RLIMIT_CPU", "RLIMIT_FSIZE", "RLIMIT_DATA", "RLIMIT_STACK", "RLIMIT_AS", "RLIMIT_NOFILE", "RLIMIT_NPROC",
    "RLIMIT_CORE")
    if hasattr(resource, name))


def _limits() -> tuple[tuple[int, int], ...]:
    return tuple(map(resource.getrlimit, _LIMITS))


def _put_limits(taken: tuple[tuple[int, int], ...]) -> None:
    for which, now, limits in zip(_LIMITS, _limits(), taken):
        if now != limits:  # a raised hard limit needs CAP_SYS_RESOURCE: ValueError without it
            resource.setrlimit(which, limits)


def _niceness() -> int:
    return os.getpriority(os.PRIO_PROCESS, 0)


def _set_niceness(taken: int) -> None:
    os.setpriority(os.PRIO_PROCESS, 0, taken)  # lowering it needs CAP_SYS_NICE: PermissionError without it


def _no_descriptor(exc: OSError) -> None:
    """A file not opened for want of a descriptor (a function holding them all) tells
    nothing of the setting: not read this pass (``_NoDescriptor``), where the value that
    stands for "no such file" was taken for a change that could not be put back, and the
    engine replaced for it (hostile round 6's descriptor hog, named for the autogroup)."""
    if exc.errno in (errno.EMFILE, errno.ENFILE):
        raise _NoDescriptor() from exc


# The out-of-memory killer's score adjustment, which the engine raises as it starts
# (``process._first_for_the_oom_killer``: the engine, the one process restarted without
# loss, is the killer's first choice). Lowering it again needs no privilege down to the
# value its parent had: a function that wrote 0 to ``/proc/self/oom_score_adj`` (measured,
# as an unprivileged user) left the engine no likelier a choice than ``serve`` or a front
# end for as long as it lived. Only the lowered direction is put back.
def _oom_score_adj() -> int:
    try:
        fd = os.open("/proc/self/oom_score_adj", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:  # not Linux, or no /proc: nothing to keep
        _no_descriptor(exc)
        return 0
    try:
        return int(os.read(fd, 16) or 0)
    except (OSError, ValueError):
        return 0
    finally:
        os.close(fd)


def _put_oom_score_adj(taken: int) -> None:
    with open("/proc/self/oom_score_adj", "w") as f:  # raising it needs no privilege
        f.write(str(taken))


# The niceness of the engine's scheduling autogroup (its session's: where the kernel has
# ``sched_autogroup_enabled``, the CPU is shared between sessions first). A function that
# wrote 19 to ``/proc/self/autogroup`` (no privilege needed) left the engine a 15/1024
# weight against ``serve``'s session for as long as it lived, as a raised niceness would;
# back to 0 needs none either. Read as -100 where there is no autogroup (nothing to keep).
def _autogroup_nice() -> int:
    try:
        fd = os.open("/proc/self/autogroup", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        _no_descriptor(exc)
        return -100
    try:
        return int(os.read(fd, 64).rsplit(b"nice", 1)[1])
    except (OSError, ValueError, IndexError):
        return -100
    finally:
        os.close(fd)


def _put_autogroup_nice(taken: int) -> None:
    if taken != -100:
        with open("/proc/self/autogroup", "w") as f:
            f.write(str(taken))


# The engine's thread's scheduling policy: SCHED_IDLE (``os.sched_setscheduler``) left
# it to run every later request of every function only when the CPU has nothing else to
# do (the front ends under load starve it), as a raised niceness would. Back to
# SCHED_OTHER needs no privilege within RLIMIT_NICE; a real-time policy it never had.
def _scheduling() -> tuple[int, int]:
    return os.sched_getscheduler(0), os.sched_getparam(0).sched_priority


def _put_scheduling(taken: tuple[int, int]) -> None:
    os.sched_setscheduler(0, taken[0], os.sched_param(taken[1]))


# Descriptors 0-2 and the engine's own log pipe (serve's ``output_relay``; its number in
# LOG_FD_ENV, where it has one), and duplicates of each as the engine process started
# with them (made when it takes its settings). A function that closes or redirects
# stdout/stderr would send the engine's log to nowhere, or, once a new socket took
# descriptor 2, into that socket; one that ``dup2``-ed a file over the log pipe had every
# later line the engine logged (the changes it puts back, naming their functions)
# written into that file.
_WATCHED_FDS: list[int] = []
_SAVED_STDIO: list[int] = []


def _stack_size() -> int:
    """New threads' stack size, read without changing it: ``threading.stack_size()``
    sets it back to the default as it answers. (As the getter, that read put it back
    itself, before the pass could see and name the change: a pass that reads twice,
    ``ProcessSettings._unchanged`` then the full one, saw nothing the second time.)"""
    size = threading.stack_size()
    threading.stack_size(size)
    return size


def _open(fd: int) -> bool:
    try:
        fcntl.fcntl(fd, fcntl.F_GETFD)  # a third of an fstat's cost
    except OSError:
        return False
    return True


def _own_log_fd() -> list[int]:
    try:
        return [int(os.environ.get(LOG_FD_ENV, ""))]
    except ValueError:
        return []


def _stdio() -> tuple[Any, ...]:
    """What descriptors 0-2 and the engine's log pipe are, and whether their duplicates
    are still open: a function that closed every descriptor (``os.closerange``) closed
    those, and the engine's sockets with them."""
    if not _SAVED_STDIO:
        _WATCHED_FDS[:] = [0, 1, 2, *_own_log_fd()]
        for fd in _WATCHED_FDS:
            try:
                _SAVED_STDIO.append(os.dup(fd))  # not inherited by children (O_CLOEXEC)
            except OSError:  # started closed: nothing to keep
                _SAVED_STDIO.append(-1)
        _SAVED_STDIO.extend(_PLACES)  # (the root's and namespaces' kept descriptors: closed with them, as surely)
        for fd in _SAVED_STDIO:
            if fd >= 0:
                _SAVED_POLL.register(fd, 0)
    # Which duplicates are closed, in one poll (POLLNVAL) where three fcntl calls took three.
    closed = [fd for fd, events in _SAVED_POLL.poll(0) if events & select.POLLNVAL]
    return (*map(descriptor_identity, _WATCHED_FDS), *[fd >= 0 and fd not in closed for fd in _SAVED_STDIO])


_SAVED_POLL = select.poll()


def _put_stdio(taken: tuple[Any, ...]) -> None:
    for fd, saved, was in zip(_WATCHED_FDS, _SAVED_STDIO, taken):
        if descriptor_identity(fd) != was and saved >= 0:
            # EBADF when the duplicate was closed too. The log pipe stays out of what the
            # engine's functions start (0-2 are theirs to inherit)
            os.dup2(saved, fd, inheritable=fd < 3)
    if list(map(_open, _SAVED_STDIO)) != list(taken[len(_WATCHED_FDS):]):
        raise OSError(errno.EBADF, "the engine's own descriptors were closed")


def _streams() -> tuple[Any, Any, Any]:
    return sys.stdin, sys.stdout, sys.stderr


def _put_streams(taken: tuple[Any, Any, Any]) -> None:
    sys.stdin, sys.stdout, sys.stderr = taken


# The engine's own sys.stdin, sys.stdout and sys.stderr, as first read (``_closed_streams``).
_OWN_STREAMS: list[Any] = []


def _closed_streams() -> tuple[bool, ...]:
    """Whether the engine's own standard streams are closed. ``sys.stdout.close()`` in a
    function keeps the object in its place (the identity ``_streams`` reads), and every
    later function's ``print`` failed, 500 ``ValueError: I/O operation on closed file.``,
    for the engine's life (so did its ``.buffer``'s close). ~0.1 us a stream."""
    if not _OWN_STREAMS:
        _OWN_STREAMS[:] = _streams()
    return tuple(bool(getattr(stream, "closed", False)) for stream in _OWN_STREAMS)


def _reopen_streams(taken: tuple[bool, ...]) -> None:
    """Each stream a function closed, opened again on its descriptor (0-2, which stay
    open: Python's standard streams never close them) as the same object, re-initialised
    in place with its own settings: whoever holds it (``sys.__stdout__``, a logging
    handler) writes again, and ``_streams`` still finds the object it took."""
    for fd, (stream, was) in enumerate(zip(_OWN_STREAMS, taken)):
        if was or not getattr(stream, "closed", False):
            continue
        # Buffered as it was (stderr's may be a raw FileIO, written through at once).
        raw = isinstance(getattr(stream, "buffer", None), io.RawIOBase)
        binary = open(fd, "rb" if fd == 0 else "wb", buffering=0 if raw else -1, closefd=False)
        stream.__init__(binary, encoding=stream.encoding, errors=stream.errors,
                        line_buffering=stream.line_buffering, write_through=stream.write_through)


class _Environment(dict):
    """The environment's variables as bytes, as the process has them. Shown in the log
    by the names that differ, never by value (a value may be a secret)."""


# os.environ's own bytes mapping: copied in 0.3 us, against 12 us through os.environb,
# which converts every key and value on the way.
_ENVIRON_DATA: dict[bytes, bytes] | None = getattr(os.environ, "_data", None) if os.supports_bytes_environ else None


def _environ() -> _Environment:
    return _Environment(_ENVIRON_DATA if _ENVIRON_DATA is not None else os.environb)


# Variables that steer the programs a function starts rather than describe anything
# (the dynamic loader's, the interpreter's, glibc's tunables, what a shell sources first).
# One added by a function went to every later program of every function that ran one:
# ``PYTHONHOME=/nonexistent`` made every later ``subprocess.run([sys.executable, ...])``
# fail ("Fatal Python error: init_fs_encoding"), and an ``LD_PRELOAD`` of its own would
# have loaded its library into each. Other variables a function adds stay, as a library
# adds its own (torch's TORCHINDUCTOR_CACHE_DIR, at a first use).
_STEERING_PREFIXES = (b"LD_", b"PYTHON")
_STEERING = frozenset({b"GLIBC_TUNABLES", b"GCONV_PATH", b"BASH_ENV", b"ENV", b"MALLOC_CHECK_", b"MALLOC_PERTURB_"})


def _steers(key: bytes) -> bool:
    return key.startswith(_STEERING_PREFIXES) or key in _STEERING


def _steering_added(now: _Environment, taken: _Environment) -> list[bytes]:
    return [key for key in now if key not in taken and _steers(key)]


def _environ_changed(now: _Environment, taken: _Environment) -> bool:
    return now != taken and (any(now.get(key) != value for key, value in taken.items())
                             or bool(_steering_added(now, taken)))


def _put_environ(taken: _Environment) -> None:
    for key, value in taken.items():
        if os.environb.get(key) != value:
            os.environb[key] = value  # putenv too: for the programs a function starts
    for key in _steering_added(_environ(), taken):
        del os.environb[key]  # unsetenv too


def _time_zone() -> tuple[bytes | None, tuple[str, str], int]:
    return (_ENVIRON_DATA if _ENVIRON_DATA is not None else os.environb).get(b"TZ"), time.tzname, time.timezone


def _put_time_zone(taken: tuple[bytes | None, tuple[str, str], int]) -> None:
    if taken[0] is None:
        os.environb.pop(b"TZ", None)
    else:
        os.environb[b"TZ"] = taken[0]
    time.tzset()


def _stop_profiler() -> None:
    """Stops torch's profiler on this thread, its events dropped (the legacy one, which
    torch's own stop refuses, by its own)."""
    try:
        torch.autograd._disable_profiler()
    except RuntimeError:
        if torch.autograd._profiler_enabled():
            torch.autograd._disable_profiler_legacy()


_PRINT_FIELDS = ("precision", "threshold", "edgeitems", "linewidth", "sci_mode")
_print_fields = operator.attrgetter(*_PRINT_FIELDS)


def _torch_print_options() -> tuple[Any, ...]:
    return _print_fields(torch._tensor_str.PRINT_OPTS)


def _put_torch_print_options(taken: tuple[Any, ...]) -> None:
    for name, value in zip(_PRINT_FIELDS, taken):  # (set_printoptions reads None as "as it is")
        setattr(torch._tensor_str.PRINT_OPTS, name, value)


# numpy 2's options are a context variable's dict (read in ~15 ns; np.get_printoptions
# copies and converts it, ~2 us); a copy is compared (the dict may be edited in place).
_NP_FORMAT = getattr(getattr(getattr(np, "_core", None), "arrayprint", None), "format_options", None)


def _numpy_print_options() -> dict[str, Any]:
    return dict(_NP_FORMAT.get()) if _NP_FORMAT is not None else np.get_printoptions()


def _put_numpy_print_options(taken: dict[str, Any]) -> None:
    if _NP_FORMAT is not None:
        _NP_FORMAT.set(dict(taken))
    else:
        np.set_printoptions(**taken)


def _functorch_permissions() -> tuple[bool, bool]:
    return (torch._C._functorch.get_inplace_requires_grad_allowed(),
            torch._C._functorch.get_single_level_autograd_function_allowed())


def _put_functorch_permissions(taken: tuple[bool, bool]) -> None:
    torch._C._functorch.set_inplace_requires_grad_allowed(taken[0])
    torch._C._functorch.set_single_level_autograd_function_allowed(taken[1])


# Taken as imported: warnings' names are put back after the batch (``namespaces``), but
# after these settings are; one a function rebound would be called here first.
_filters_mutated = warnings._filters_mutated  # type: ignore[attr-defined]


_KL = KLTables()
_NOWRAP = NoWrap()

_SETTINGS: tuple[_Setting, ...] = (
    # First: leaving them restores the grad mode each saved, which the grad mode's own
    # setting, after, then checks.
    _Setting("torch.func's transform levels (vmap, grad, jvp entered, not exited)", _transform_levels,
             _pop_transform_levels, operator.gt),
    _Setting("inference mode (entered, not exited)", torch.is_inference_mode_enabled, _leave_inference_mode),
    _Setting("torch's default dtype", torch.get_default_dtype, torch.set_default_dtype),
    _Setting("torch's default device", _default_device, _set_default_device),
    _Setting("torch's grad mode", torch.is_grad_enabled, torch.set_grad_enabled),
    # Switches of the engine's thread that torch.func does not read but the functions'
    # own autograd does: forward-mode AD off (``torch._C._set_fwd_grad_enabled(False)``)
    # left every later function's ``forward_ad`` tangent None (its 500), saved-tensor
    # hooks disabled (``_saved_tensors_hooks_disable``) every later checkpoint refused.
    _Setting("forward-mode AD (torch._C._set_fwd_grad_enabled)", torch._C._is_fwd_grad_enabled,
             torch._C._set_fwd_grad_enabled),
    _Setting("saved-tensor hooks (disabled)", torch._C._autograd._saved_tensors_hooks_is_enabled,
             lambda taken: torch._C._autograd._saved_tensors_hooks_enable()),
    # torch.func's permissions of the thread, which its transforms set for their own
    # call: ``set_inplace_requires_grad_allowed(True)`` left so made every later
    # function's ``x.requires_grad_()`` under a Jacobian answer 200 where it is torch's
    # RuntimeError (500), and so for autograd.Functions without setup_context.
    _Setting("torch.func's permissions (set_inplace_requires_grad_allowed, "
             "set_single_level_autograd_function_allowed)", _functorch_permissions, _put_functorch_permissions),
    _Setting("vmap's fallback for operators without a batching rule", torch._C._functorch._is_vmap_fallback_enabled,
             torch._C._functorch._set_vmap_fallback_enabled),
    _Setting("torch's number of threads", torch.get_num_threads, torch.set_num_threads),
    _Setting("torch's anomaly detection", torch.is_anomaly_enabled, torch.set_anomaly_enabled),
    _Setting("torch's deterministic algorithms", torch.are_deterministic_algorithms_enabled,
             torch.use_deterministic_algorithms),
    _Setting("torch's float32 precision (set_float32_matmul_precision, backends' fp32_precision)",
             _float32_precision, _put_float32_precision),
    _Setting("cuDNN's TF32", _flag(torch.backends.cudnn, "allow_tf32"), _setter(torch.backends.cudnn, "allow_tf32")),
    _Setting("cuDNN's benchmark mode", _flag(torch.backends.cudnn, "benchmark"), _setter(torch.backends.cudnn, "benchmark")),
    _Setting("cuDNN (enabled)", _flag(torch.backends.cudnn, "enabled"), _setter(torch.backends.cudnn, "enabled")),
    _Setting("cuDNN's deterministic mode", _flag(torch.backends.cudnn, "deterministic"),
             _setter(torch.backends.cudnn, "deterministic")),
    _Setting("oneDNN (enabled)", _flag(torch.backends.mkldnn, "enabled"), _setter(torch.backends.mkldnn, "enabled")),
    _Setting("autocast (entered, not exited)", _autocast, _put_autocast),
    _Setting("scaled-dot-product attention's backends", _sdp, _put_sdp),
    _Setting("flushing denormals to zero", _flushes_denormals, _put_flush_denormals),
    _Setting("the warning filters", _filters, _put_filters,
             _filters_changed),
    # As beneath the service's own pauses (a colouring's, on any engine's thread): not a change of the batch's.
    _Setting("the garbage collector (disabled)", collector_enabled, put_collector),
    # A first threshold of 0 disables automatic collection as surely, with isenabled() True.
    _Setting("the garbage collector's thresholds", gc.get_threshold, lambda taken: gc.set_threshold(*taken)),
    _Setting("the garbage collector's debug flags (gc.set_debug)", _gc_debug, _put_gc_debug,
             _gc_debug_changed),
    # A callback appended there runs at every later collection, in whichever function's
    # request it falls (one sleeping 0.2 s took mlp's worst latency from 27 to 220 ms).
    _Setting("the garbage collector's callbacks", lambda: tuple(gc.callbacks),
             lambda taken: gc.callbacks.__setitem__(slice(None), taken)),
    # Raised counts too: Python's limit is what keeps a deep recursion through C (a
    # built-in calling back into Python, torch's ops) a RecursionError rather than a
    # stack overflow. One function left it at 10**6, and a later function that recursed
    # 100,000 levels through ``map`` and caught its RecursionError segfaulted the engine
    # instead, and was struck for it (8 MiB of stack held 10,000 such levels, not
    # 20,000). The libraries that raise it do so for their own call (networkx puts it
    # back; inductor sets its 2000 again at each compilation).
    _Setting("the recursion limit", sys.getrecursionlimit, sys.setrecursionlimit),
    # 0 is no limit: lowered means a limit where there was none, or a smaller one.
    _Setting("the digit limit of int-string conversions (lowered)", sys.get_int_max_str_digits,
             sys.set_int_max_str_digits, _digits_lowered),
    _Setting("the thread switch interval", sys.getswitchinterval, sys.setswitchinterval),
    _Setting("numpy's floating-point error handling", np.geterr, lambda taken: np.seterr(**taken)),
    # RTLD_GLOBAL (sys.setdlopenflags) left every later extension a function imports
    # sharing its symbols with all others: the clashes of libraries bundling their own
    # copies (protobuf, LLVM) that crash far from their cause.
    _Setting("the dlopen flags of later imports (sys.setdlopenflags)", sys.getdlopenflags, sys.setdlopenflags),
    _Setting("torch's warn-always mode (torch.set_warn_always)", torch.is_warn_always_enabled, torch.set_warn_always),
    # ``torch.set_printoptions(threshold=10**9)`` (``np.set_printoptions``): every later
    # function's str of a tensor (an array) printed whole, a 2,000-element one 8,672
    # characters for 38 (the words of an f-string, a log line, an error) and a million-
    # element one 41 s for 1 ms (its request a 504, its engine killed as hung, the
    # innocent function struck); ``precision=1`` changed every number said.
    _Setting("torch's print options (torch.set_printoptions)", _torch_print_options, _put_torch_print_options),
    _Setting("numpy's print options (np.set_printoptions)", _numpy_print_options, _put_numpy_print_options),
    _Setting("logging (disabled)", lambda: logging.root.manager.disable, logging.disable),
    _Setting("the working directory", _cwd, _chdir),
    # Left entered by ``__enter__`` without ``__exit__``. Modes and hooks are the thread's own.
    _Setting("torch function modes (entered, not exited)", _function_modes, _pop_function_modes, operator.gt),
    _Setting("torch dispatch modes (entered, not exited)", _dispatch_modes, _pop_dispatch_modes, operator.gt),
    _Setting("saved-tensor hooks (entered, not exited)", _saved_tensors_hooks, _pop_saved_tensors_hooks,
             lambda now, taken: now is not None and taken is None),
    # This thread's hooks: the engine's thread is the one the functions run on.
    _Setting("the trace function", sys.gettrace, sys.settrace, _hook_changed),
    _Setting("the profile function", sys.getprofile, sys.setprofile, _hook_changed),
    # torch's profiler left entered (``torch.profiler.profile().__enter__()``, ``start()``
    # without ``stop()``; the engine's thread's own): every later function's operators were
    # recorded into it, their names, input shapes and stacks, held without end (memory
    # grown at every request), for the function to read at its next call.
    _Setting("torch's profiler (entered, not exited)", torch.autograd._profiler_enabled, lambda taken: _stop_profiler(),
             operator.gt),
    _Setting("kernels of torch's own operators (torch.library)", KERNELS.count, KERNELS.put, KERNELS.changed),
    # Tables torch's own Python reads as it runs, edited in place (``torch_tables``).
    _Setting("torch.distributions' KL registry (register_kl) or its memo", _KL.get, _KL.put, _KL.changed,
             shown=(_KL.shown, "torch's own entries")),
    _Setting("torch.overrides' default no-wrap functions (get_default_nowrap_functions)", _NOWRAP.get, _NOWRAP.put,
             shown=(_NOWRAP.shown, "torch's own")),
    # torch.DisableTorchFunction() (or its Subclass kind) entered and kept: every later
    # tensor subclass's and torch function mode's ``__torch_function__`` skipped, silently
    # (a subclass that scales its results answered unscaled, a 200).
    _Setting("torch's __torch_function__ handling (a DisableTorchFunction guard entered, not exited)",
             torch._C._get_torch_function_state, torch._C._set_torch_function_state),
    # Last: the settings above whose guards set keys (inference mode, autocast, torch.func's
    # levels, dispatch modes) have put theirs back, and are named for them.
    _Setting("torch's dispatch keys of the thread (a dispatch-key guard entered, not exited: "
             "torch._C._DisableFuncTorch, _IncludeDispatchKeyGuard...)", _dispatch_keys, _put_dispatch_keys,
             shown=(_shown_keys, "the keys the engine started with")),
)

# torch.nn's global module hooks (register_module_forward_hook and its kin): one that
# doubled every output doubled every later nn.Module function's Jacobian, silently.
_NN_HOOKS = tuple(name for name in (
    "_global_backward_hooks", "_global_backward_pre_hooks", "_global_buffer_registration_hooks",
    "_global_forward_hooks", "_global_forward_hooks_always_called", "_global_forward_hooks_with_kwargs",
    "_global_forward_pre_hooks", "_global_module_registration_hooks", "_global_parameter_registration_hooks",
) if isinstance(getattr(torch.nn.modules.module, name, None), dict))


def _nn_hooks() -> tuple[dict[Any, Any], ...]:
    module = torch.nn.modules.module
    return tuple(map(dict, map(getattr, itertools.repeat(module, len(_NN_HOOKS)), _NN_HOOKS)))


def _put_nn_hooks(taken: tuple[dict[Any, Any], ...]) -> None:
    module = torch.nn.modules.module
    for name, hooks in zip(_NN_HOOKS, taken):
        live = getattr(module, name)  # the same dict: handles remove from it
        live.clear()
        live.update(hooks)


def _nn_hooks_changed(now: tuple[dict[Any, Any], ...], taken: tuple[dict[Any, Any], ...]) -> bool:
    """Hooks added or removed, or one put in place of another under its key (by the
    dict's own assignment: no handle was made), which doubled every later module's
    output as surely. By identity: a hook equal to the one taken is not it."""
    return any(len(a) != len(b) or any(a.get(key, _NO_HOOK) is not hook for key, hook in b.items())
               for a, b in zip(now, taken))


_NO_HOOK = object()


def _nn_hook_counts() -> list[int]:
    module = vars(torch.nn.modules.module)
    return [len(module[name]) for name in _NN_HOOKS]


def _nn_hooks_quick(taken: tuple[dict[Any, Any], ...]) -> Callable[[], list[int]] | None:
    """Where the engine started with no global hook (nearly always), how many each dict
    holds now tells it all: none, and nothing can have changed; copying the nine dicts
    at every batch took 43 k instructions. With hooks of its own, the copies."""
    return None if any(taken) else _nn_hook_counts


_PR_SET_TIMERSLACK, _PR_GET_TIMERSLACK = 29, 30


@functools.cache
def _prctl() -> Any:
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux
        return None


def _timer_slack() -> int:
    """How late the kernel may wake this thread (``PR_SET_TIMERSLACK``): 30 s of it made
    the engine's 100 ms idle poll oversleep its heartbeat, and the supervisor killed it as
    hung, blaming nothing."""
    prctl = _prctl()
    return int(prctl(_PR_GET_TIMERSLACK, 0, 0, 0, 0)) if prctl is not None else 0


def _put_timer_slack(taken: int) -> None:
    prctl = _prctl()
    if prctl is not None and taken > 0:
        prctl(_PR_SET_TIMERSLACK, ctypes.c_ulong(taken), 0, 0, 0)


# The service's own loggers (``logs.configure_logging``), as the engine started: a
# function that raised their level, disabled them (``logging.config.dictConfig``, whose
# ``disable_existing_loggers`` is True by default, does that to every logger made
# before it) or took their handlers silenced the engine's log for as long as it lived:
# its errors, the functions it names for what they left behind.
_LOGGERS: list[logging.Logger] = []  # those that existed when the engine took its settings


# And what every record goes through on its way: a filter added to a logger or a handler
# (``addFilter(lambda record: False)``), a handler's stream set elsewhere
# (``setStream(open(os.devnull, "w"))``) or the record factory (``logging.setLogRecordFactory``)
# silenced the engine's log as surely, its lines naming what later functions changed gone.
def _service_logging() -> tuple[Any, ...]:
    if not _LOGGERS:
        _LOGGERS.extend(service_loggers())
    return (logging.getLogRecordFactory(),
            *[(lg.level, lg.disabled, lg.propagate, tuple(lg.filters),
               tuple([(h, h.level, getattr(h, "stream", None), h.formatter, tuple(h.filters)) for h in lg.handlers]))
              for lg in _LOGGERS])


def _put_service_logging(taken: tuple[Any, ...]) -> None:
    logging.setLogRecordFactory(taken[0])
    for logger, (level, disabled, propagate, filters, handlers) in zip(_LOGGERS, taken[1:]):
        logger.setLevel(level)
        logger.disabled, logger.propagate = disabled, propagate
        logger.filters[:] = filters
        logger.handlers[:] = [h for h, *_ in handlers]
        for handler, handler_level, stream, formatter, handler_filters in handlers:
            handler.setLevel(handler_level)
            handler.setFormatter(formatter)
            handler.filters[:] = handler_filters
            if stream is not None and getattr(handler, "stream", None) is not stream:
                try:
                    handler.setStream(stream)  # (flushes the one set: a closed one raises)
                except ValueError:
                    handler.stream = stream


def _exception_hooks() -> tuple[Any, Any, Any]:
    return sys.excepthook, sys.unraisablehook, threading.excepthook


def _put_exception_hooks(taken: tuple[Any, Any, Any]) -> None:
    sys.excepthook, sys.unraisablehook, threading.excepthook = taken


_PR_SET_CHILD_SUBREAPER, _PR_GET_CHILD_SUBREAPER = 36, 37


def _subreaper() -> int:
    """Whether orphaned descendants come to this process (``orphans``): an engine is the
    subreaper of what its functions detach, to kill it as it stops with ``serve``; a
    function that turned it off sent them to ``serve``, out of reach once it is killed."""
    prctl = _prctl()
    if prctl is None:
        return 0
    _SUBREAPER_FLAG.value = 0
    prctl(_PR_GET_CHILD_SUBREAPER, _SUBREAPER_FLAG_REF, 0, 0, 0)
    return _SUBREAPER_FLAG.value


_SUBREAPER_FLAG = ctypes.c_int(0)  # what the kernel writes to, made once (the engine's one thread reads it)
_SUBREAPER_FLAG_REF = ctypes.byref(_SUBREAPER_FLAG)


def _put_subreaper(taken: int) -> None:
    prctl = _prctl()
    if prctl is not None:
        prctl(_PR_SET_CHILD_SUBREAPER, taken, 0, 0, 0)


# Memory locking. ``mlockall(MCL_FUTURE)`` (through ctypes) marks every mapping the
# process makes from then on locked, which no line of /proc/self/status shows until one is
# made: run as a user of its own (the image's), every later allocation past the
# locked-memory limit (RLIMIT_MEMLOCK, 8 MiB by default) failed, and every request of
# every other function that needed 10 MB was a 500 ``MemoryError``, for as long as the
# engine lived; as root, every later allocation was faulted in at once (an untouched
# 512 MB ``torch.empty`` took 0.9 s and its whole size in RAM). ``mlockall(MCL_CURRENT)``
# or ``mlock`` left pins what it locked. Seen as ``VmLck``, read while a page made for it
# (``_LockProbe``) is in place, and undone with ``munlockall``.
_PROT_NONE, _MAP_PRIVATE, _MAP_FIXED, _MAP_ANONYMOUS = 0, 0x02, 0x10, 0x20  # (the same on x86-64 and arm64)
_PAGE = 4096


@functools.cache
def _memory_calls() -> tuple[Any, Any] | None:
    """libc's ``mmap`` and ``munlockall`` (None: not there)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        mmap, munlockall = libc.mmap, libc.munlockall
    except (OSError, AttributeError):
        return None
    mmap.restype = ctypes.c_void_p
    mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    return mmap, munlockall


class _LockProbe:
    """A page of the engine's own, made anew (``MAP_FIXED`` over itself, one system call,
    ~3 us of CPU: a new page and the old one unmapped took ~5.5) before each pass reads
    /proc/self/status: a mapping made while every later one is to be locked is locked
    too, and ``VmLck`` counts it; past the locked-memory limit the kernel refuses to make
    it (``refused``). ``PROT_NONE``: a locked page with no access is never faulted in."""

    def __init__(self) -> None:
        self.page: int | None = None
        self.refused = False

    def remake(self) -> None:
        calls = _memory_calls()
        if calls is None:
            return
        flags = _MAP_PRIVATE | _MAP_ANONYMOUS | (_MAP_FIXED if self.page is not None else 0)
        page = calls[0](self.page, _PAGE, _PROT_NONE, flags, -1, 0)
        self.refused = page is None or page == _MAP_FAILED
        if not self.refused:
            self.page = page


_MAP_FAILED = ctypes.c_void_p(-1).value
_LOCK_PROBE = _LockProbe()


def _locked() -> int:
    """Memory locked now (kB), the probe's page included; a probe refused reads as more
    than any (``_LOCK_PROBE``: made before this pass read the status)."""
    if _LOCK_PROBE.refused:
        return 1 << 62
    try:
        return int(_status(b"VmLck").split()[0])  # type: ignore[union-attr]
    except (AttributeError, IndexError, ValueError):
        return 0  # no such line (not Linux): nothing to put back


def _locked_shown(now: int, taken: int) -> str:
    return "every later mapping, past the locked-memory limit" if now >= 1 << 62 else f"{now} kB"


def _unlock(taken: int) -> None:
    calls = _memory_calls()
    if calls is None or calls[1]() != 0:
        raise OSError(ctypes.get_errno(), "munlockall failed")
    _LOCK_PROBE.remake()  # (the status read next is of the pages now)
    _STATUS.clear()


class _Credentials(NamedTuple):
    uids: tuple[int, int, int]  # real, effective, saved
    gids: tuple[int, int, int]
    groups: tuple[int, ...]
    capabilities: tuple[bytes | None, ...]  # inheritable, permitted, effective, bounding, ambient


def _credentials() -> _Credentials:
    """Who the engine runs as: its user and group ids (real, effective, saved), its
    supplementary groups, and its capabilities (``/proc/self/status``). A function run by
    an engine started as root that switched to ``nobody`` (``os.setuid``) or dropped
    capabilities left every later function of every other user without the files,
    devices and caches the engine's own user may use."""
    return _Credentials(os.getresuid(), os.getresgid(), tuple(sorted(os.getgroups())),
                        tuple(_status(field) for field in (b"CapInh", b"CapPrm", b"CapEff", b"CapBnd", b"CapAmb")))


def _put_credentials(taken: _Credentials) -> None:
    """The user first: an effective id given up while the saved one is still root takes
    root's privileges back, which the groups then need. A user, group or capability
    given up for good (all three ids) cannot be: PermissionError."""
    uids, gids, groups, _ = taken
    if os.getresuid() != uids:
        os.setresuid(*uids)
    if os.getresgid() != gids:
        os.setresgid(*gids)
    if tuple(sorted(os.getgroups())) != groups:
        os.setgroups(groups)
    _STATUS.clear()  # read again: the kernel may have given back capabilities with the user
    if _credentials() != taken:
        raise PermissionError(errno.EPERM, "capabilities given up cannot be taken back")


# The root directory and the namespaces of the engine's thread, which an engine with the
# privilege (run as root: CAP_SYS_ADMIN, CAP_SYS_CHROOT) lets a function change for every
# later function: ``unshare(CLONE_NEWNET)`` through ctypes left every later function's
# network unreachable ("Network is unreachable", loopback too), ``CLONE_NEWUTS`` and
# ``sethostname`` every later ``gethostname`` the function's, ``CLONE_NEWNS`` and a
# ``mount`` over a directory every later function's files there the function's, and
# ``chroot`` every later import and open of a path outside its new root refused. Read only
# where the engine may change them (no user namespace can be entered by a process of
# several threads, as an engine is, so nothing else can): five ``stat`` calls of /proc
# (~15 us), through a descriptor of the thread's own /proc directory, which a ``chroot``
# or a mount over /proc does not move. Put back through descriptors kept of each
# namespace and of the root (``setns``; ``fchdir`` and ``chroot(".")``), checked to be
# the ones taken (a function may put other files at their numbers).
_NAMESPACES = (("ns/mnt", 0x00020000), ("ns/net", 0x40000000), ("ns/uts", 0x04000000), ("ns/ipc", 0x08000000))
_CAP_SYS_CHROOT, _CAP_SYS_ADMIN = 18, 21
_PLACES: list[int] = []  # the thread's /proc directory, the root, then each namespace's (kept by ``_keep_places``)


def _may_move() -> bool:
    """Whether this process may change its root or namespaces (the capabilities it may
    take up: permitted, not only effective)."""
    try:
        permitted = int(_status(b"CapPrm") or b"0", 16)
    except ValueError:
        return False
    return bool(permitted & ((1 << _CAP_SYS_CHROOT) | (1 << _CAP_SYS_ADMIN)))


def _keep_places() -> None:
    """Keep descriptors of this thread's /proc directory, root and namespaces (an engine
    process's main thread with the privilege to change them; else none, nothing read)."""
    if _PLACES or not _may_move():
        return
    kept: list[int] = []
    try:
        # (not O_PATH: ``_stdio`` polls them with the engine's own, and poll takes an O_PATH one for closed)
        kept.append(os.open(f"/proc/self/task/{threading.get_native_id()}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
        kept.append(os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
        kept.extend(os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=kept[0]) for name, _ in _NAMESPACES)
    except OSError as exc:  # no /proc: nothing to read them by
        log.debug("the root and namespaces not watched: %s", exc)
        for fd in kept:
            os.close(fd)
        return
    _PLACES.extend(kept)


def _places() -> tuple[Any, ...]:
    """The thread's root (device, inode) and each namespace's inode now; () where not kept."""
    if not _PLACES:
        return ()
    task = _PLACES[0]
    try:
        root = os.stat("root", dir_fd=task)
        return ((root.st_dev, root.st_ino), *(os.stat(name, dir_fd=task).st_ino for name, _ in _NAMESPACES))
    except OSError as exc:
        if exc.errno in (errno.EBADF, errno.ENOTDIR):
            # Closed (``os.closerange``): unknown, and the engine's own descriptors setting's
            # to name (it polls these with its own), not a root or namespace changed.
            raise _NoDescriptor() from exc
        raise


def _put_places(taken: tuple[Any, ...]) -> None:
    """Each namespace that differs entered again (the mount namespace first: entering one
    moves the root and the working directory to its root), then the root (the working
    directory is put back after: ``the working directory``, a later setting)."""
    now = _places()
    setns = ctypes.CDLL(None, use_errno=True).setns
    for (name, kind), fd, was, is_ in zip(_NAMESPACES, _PLACES[2:], taken[1:], now[1:]):
        if was == is_:
            continue
        if os.fstat(fd).st_ino != was:
            raise OSError(errno.EBADF, f"the descriptor kept of {name} is another file now")
        if setns(fd, kind) != 0:
            raise OSError(ctypes.get_errno(), f"setns({name})")
    if _places()[0] != taken[0]:
        kept = os.fstat(_PLACES[1])
        if (kept.st_dev, kept.st_ino) != taken[0]:
            raise OSError(errno.EBADF, "the descriptor kept of the root is another file now")
        os.fchdir(_PLACES[1])
        os.chroot(".")
    if _places() != taken:
        raise OSError(errno.EPERM, "the root or a namespace still differs")



# The execution domain (``personality(2)``, the thread's): ``UNAME26`` made every later
# function's ``os.uname()`` (``platform.release()``) name kernel 2.6.78 for 6.18.44, to
# every library that checks it for a feature; ``READ_IMPLIES_EXEC`` made every later
# readable mapping of every function executable too. One call reads it (~0.6 us).
_PERSONALITY_QUERY = 0xFFFFFFFF


def _personality() -> int:
    libc = _libc_calls()
    return int(libc.personality(_PERSONALITY_QUERY)) if libc is not None else 0


def _put_personality(taken: int) -> None:
    # (checked: a refusal unseen, every later function kept the function's domain while the
    # engine took it for put back, and named it once)
    libc = _libc_calls()
    if libc is not None and libc.personality(taken) == -1:
        raise OSError(ctypes.get_errno(), "personality refused the engine's execution domain")


@functools.cache
def _libc_calls() -> Any:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:  # not Linux
        return None

_PR_GET_MDWE = 66


class _Confinement(NamedTuple):
    """What the kernel lets a process confine itself with and never lift (each None
    where this kernel does not say)."""

    seccomp: int | None  # 0 none, 1 strict, 2 filters
    seccomp_filters: int | None  # how many filters (Linux 5.9+): under a container's own, one more
    no_new_privs: int | None
    mdwe: int | None  # memory-deny-write-execute's flags (Linux 6.3+)


def _confinement() -> _Confinement:
    """A seccomp filter a function installs (``prctl(PR_SET_SECCOMP)`` or ``seccomp(2)``
    through ctypes) filters every later system call of every function in the engine
    (one returning EPERM for ``uname`` failed every later ``platform.uname()``; one
    that kills breaks the engine); no_new_privs (which an unprivileged filter needs)
    and memory-deny-write-execute (``PR_SET_MDWE``: every later JIT's writable code
    refused) are for ever too. None of it can be undone: the engine leaves. (A Landlock
    ruleset, as final, shows in no field: it is seen by the no_new_privs it needs, or
    when it refuses this very read, not where the engine may do without the flag
    (CAP_SYS_ADMIN: root) or started with it set, as under Kubernetes'
    ``allowPrivilegeEscalation: false``.)"""
    return _Confinement(_status_number(b"Seccomp"), _status_number(b"Seccomp_filters"),
                        _status_number(b"NoNewPrivs"), _mdwe())


def _mdwe() -> int | None:
    """Memory-deny-write-execute's flags, which no line of /proc/self/status shows (None:
    this kernel has none, and no process can set it)."""
    prctl = _prctl()
    mdwe = int(prctl(_PR_GET_MDWE, 0, 0, 0, 0)) if prctl is not None else -1
    return mdwe if mdwe >= 0 else None


def _confinement_rest(taken: _Confinement) -> Callable[[], Any] | None:
    return _mdwe if taken.mdwe is not None else None


def _lift_confinement(taken: _Confinement) -> None:
    raise OSError(errno.EPERM, "the kernel lets no process lift a seccomp filter, no_new_privs or "
                               "memory-deny-write-execute")


def _no_fork_hook() -> None:
    pass


@functools.cache
def fork_hook_lists() -> tuple[list[Any], ...]:
    """The interpreter's lists of ``os.register_at_fork`` hooks (before, after in the
    parent, after in the child), which Python does not expose: found once, as what
    refers to a hook of the engine's own (a walk of the heap, ~30 ms with torch loaded).
    None found (another Python): nothing to count."""
    os.register_at_fork(before=_no_fork_hook, after_in_parent=_no_fork_hook, after_in_child=_no_fork_hook)
    lists = tuple(r for r in gc.get_referrers(_no_fork_hook) if type(r) is list and r and r[-1] is _no_fork_hook)
    return lists if len(lists) == 3 else ()


def _more_fork_hooks(now: tuple[int, ...], taken: tuple[int, ...]) -> bool:
    return any(a > b for a, b in zip(now, taken))


def _fork_hooks() -> tuple[int, ...]:
    """How many hooks run at every ``os.fork``: one a function registers runs in every
    later function's fork (an ``after_in_child`` that ended the child made every later
    forked child exit 7 at once), and Python has no way to remove one. Those a library
    registers as a function first imports it go too (torch's, the standard library's,
    the functions' modules' are the engine's, from before it took its settings)."""
    return tuple(map(len, fork_hook_lists()))


def _put_fork_hooks(taken: tuple[int, ...]) -> None:
    for hooks, count in zip(fork_hook_lists(), taken):
        del hooks[count:]  # the latest: registered by the batch


# The import system's finders: a finder a function put ahead of Python's own on
# ``sys.meta_path`` (or a hook ahead of its own on ``sys.path_hooks``) answered every
# later import of every function: one serving a module of its own in place of one not
# yet imported gave another function, importing it at its first call, the impostor
# (its answers silently doubled, with a 200). Only that direction is harmful: a finder
# appended behind Python's own finds only what nothing else would (six's, a library's
# lazily installed one), and is let be; one put ahead is moved behind the finders taken.
_FINDERS_APART = object()  # between the two lists in one tuple


def _finders() -> tuple[Any, ...]:
    return (*sys.meta_path, _FINDERS_APART, *sys.path_hooks)


def _split(finders: tuple[Any, ...]) -> tuple[list[Any], list[Any]]:
    at = next(i for i, f in enumerate(finders) if f is _FINDERS_APART)
    return list(finders[:at]), list(finders[at + 1:])


def _behind(now: list[Any], taken: list[Any]) -> list[Any]:
    """The finders taken, in their order, then those added (by identity)."""
    return taken + [f for f in now if all(f is not t for t in taken)]


def _finders_repaired(now: tuple[Any, ...], taken: tuple[Any, ...]) -> tuple[Any, ...]:
    (meta, hooks), (meta_taken, hooks_taken) = _split(now), _split(taken)
    return (*_behind(meta, meta_taken), _FINDERS_APART, *_behind(hooks, hooks_taken))


def _finders_changed(now: tuple[Any, ...], taken: tuple[Any, ...]) -> bool:
    repaired = _finders_repaired(now, taken)
    return len(repaired) != len(now) or any(a is not b for a, b in zip(repaired, now))


def _put_finders(taken: tuple[Any, ...]) -> None:
    now = _finders()
    meta, hooks = _split(_finders_repaired(now, taken))
    if any(a is not b for a, b in zip(_split(now)[1], hooks)) or len(hooks) != len(_split(now)[1]):
        sys.path_importer_cache.clear()  # finders the hook made for path entries: made again by Python's own
    sys.meta_path[:] = meta
    sys.path_hooks[:] = hooks


class _SeedValue(int):
    """A seed read (told apart in the log, ``_shown``)."""


class _Seed:
    """torch's random seed: ``torch.manual_seed(0)`` in a function set the generator every
    later function draws from to a known state, after each of its calls: the next draws
    of another client's function (noise, a Monte Carlo estimate, dropout) were the same
    at every such call, known in advance. A seed set is put back as a seed drawn afresh
    (``_reseed``, from the OS's entropy): the draws after it are no one's to know.
    (The seed it starts with is drawn from the OS's entropy as the engine starts: ``engine.process``.)

    A state set with no seed (``torch.set_rng_state`` of one a function kept from an
    earlier call) left ``initial_seed`` as it was: the same draws after each of its calls,
    unseen. ``state`` is the setting for that (library_state's ``Generator``, as Python's
    and numpy's are): a state a batch moved (set, or draws) is re-seeded the same way.
    After this setting (the seed first: its own line says what was set), and told of each
    seed drawn here, so that one change is put back, and named, once."""

    def __init__(self) -> None:
        self.expected: int | None = None  # the seed the generator should have: the start's, or the last drawn here
        self.state = Generator("the state of torch's random generator (torch.set_rng_state, or draws)",
                               _generator_state, lambda: self.put(None))

    def get(self) -> int:
        seed = _SeedValue(torch.initial_seed())
        if self.expected is None:  # taken (the state with it: what the functions' modules drew as loaded stays)
            self.expected, self.state.expected = seed, _generator_state()
        return seed

    def changed(self, now: int, taken: int) -> bool:
        return now != self.expected

    def put(self, taken: int | None) -> None:
        self.expected = _reseed()
        self.state.expected = _generator_state()


def _reseed() -> int:
    """``torch.seed()`` for the generators an engine draws from: the CPU's, and CUDA's
    once CUDA is in use (~5 us; ``torch.seed()`` itself took ~110 us, queueing seeds for
    MPS, XPU and MTIA too, at every batch of a function that draws)."""
    seed = torch.default_generator.seed()
    if torch.cuda.is_initialized():
        torch.cuda.manual_seed_all(seed)
    return seed


# Where the CPU generator's state (CPUGeneratorImplState, 5056 bytes) keeps the normal
# samples it drew in pairs and holds for the next normal draw (normal_x/y/rho and their
# flag, then a float sample and its flag): the last 40 bytes. A state set with the same
# Mersenne Twister words and a sample of its own there (1e9, valid) was unseen by the
# first 48 bytes, and another client's next ``torch.randn(())`` answered 1e9. In
# another layout, the whole state is read.
_CACHED_NORMALS = slice(-40, None) if torch.default_generator.get_state().numel() == 5056 else slice(48, None)


def _generator_state() -> tuple[bytes, ...]:
    """What any seed, state set or draw changes of torch's default generators: the CPU's
    first 48 bytes (its seed, position, and first words of the Mersenne Twister's state,
    which a draw past the last word makes anew) and its cached normal samples, ~2 us (cut
    in numpy: torch's slice of it alone took 3 us more); each CUDA device's seed and
    offset, once CUDA is in use."""
    data = torch.default_generator.get_state().numpy().data
    cpu = data[:48].tobytes() + data[_CACHED_NORMALS].tobytes()
    if not torch.cuda.is_initialized():
        return (cpu,)
    return (cpu, *(g.get_state().numpy().tobytes() for g in torch.cuda.default_generators))


_SEED = _Seed()


def _generator_setting(generator: Generator) -> _Setting:
    """A global random generator's setting: its state's fingerprint, re-seeded when moved."""
    return _Setting(generator.what, generator.fingerprint, generator.put, generator.changed,
                    shown=(lambda now, taken: "one of its own", "a seed drawn afresh"))


# Settings of the whole process, put back only by an engine that owns its process. In the
# in-process layout the host shares them and may change them itself, as it has every
# right to: pytest-timeout arms a SIGALRM timer, pytest's capture swaps sys.stdout.
_OWN_PROCESS_SETTINGS: tuple[_Setting, ...] = (
    _Setting("the import system's finders (ahead of Python's own on sys.meta_path, sys.path_hooks)", _finders,
             _put_finders, _finders_changed, quick=lambda taken: _identities(_finders)),
    # (the engine's alone: in-process, the host seeds torch for its own draws)
    _Setting("torch's random seed (torch.manual_seed)", _SEED.get, _SEED.put, _SEED.changed),
    _generator_setting(_SEED.state),
    _Setting("the trace function of new threads", threading.gettrace, threading.settrace, _hook_changed),
    _Setting("the profile function of new threads", threading.getprofile, threading.setprofile, _hook_changed),
    _Setting("signal handlers", _handlers, _put_handlers,
             lambda now, taken: any(a is not b and b is not None for a, b in zip(now, taken)),
             quick=lambda taken: _identities(_handlers) if None not in taken else None),
    _Setting("the signal mask", _mask, _put_mask, status=((b"SigBlk", b"SigBlk"),)),
    _Setting("signals ignored outside Python (SigIgn)", _ignored, _put_ignored, status=((b"SigIgn", b"SigIgn"),)),
    _Setting("signals caught outside Python (SigCgt: a handler of C's, ctypes' sigaction)", _caught, _put_caught,
             status=((b"SigCgt", b"SigCgt"),), shown=(_caught_shown, "the handlers Python has (or the default)")),
    _Setting("an interval timer (signal.alarm, setitimer)", _timers, _disarm, _armed),
    *((_Setting("the scheduling policy (sched_setscheduler)", _scheduling, _put_scheduling),
       # Pinned to a CPU (``os.sched_setaffinity``): every later request ran on that one,
       # however busy, and torch's threads started later were pinned with it.
       _Setting("the CPU affinity (sched_setaffinity)", functools.partial(os.sched_getaffinity, 0),
                functools.partial(os.sched_setaffinity, 0), status=((b"Cpus_allowed", b"Cpus_allowed"),)))
      if hasattr(os, "sched_getscheduler") and hasattr(os, "sched_getaffinity") else ()),
    _Setting("the niceness", _niceness, _set_niceness),
    _Setting("the out-of-memory killer's score adjustment (/proc/self/oom_score_adj, lowered)", _oom_score_adj,
             _put_oom_score_adj, operator.lt),
    _Setting("the niceness of its scheduling autogroup (/proc/self/autogroup)", _autogroup_nice, _put_autogroup_nice),
    # What heap.freeze_heap froze: the in-process layout's host may freeze and unfreeze its own.
    _Setting("the garbage collector's frozen objects (gc.unfreeze)", thawed, lambda taken: refreeze()),
    _Setting("the stack size of new threads", _stack_size, threading.stack_size),
    _Setting("the default socket timeout", socket.getdefaulttimeout, socket.setdefaulttimeout),
    _Setting("the umask", _umask, os.umask, status=((b"Umask", b"Umask"),)),
    _Setting("the timer slack (prctl PR_SET_TIMERSLACK)", _timer_slack, _put_timer_slack),
    _Setting("the child subreaper flag (prctl PR_SET_CHILD_SUBREAPER)", _subreaper, _put_subreaper),
    _Setting("the execution domain (personality: UNAME26, READ_IMPLIES_EXEC)", _personality, _put_personality),
    # (more locked than taken: a function may unlock what it likes; compared as its status line)
    _Setting("locked memory (mlock, mlockall: MCL_FUTURE locks every later allocation)", _locked, _unlock,
             operator.gt, status=((b"VmLck", b"VmLck"),), shown=(_locked_shown, "none of the function's (munlockall)")),
    _Setting("the system-call filter (seccomp), no_new_privs or memory-deny-write-execute (prctl)", _confinement,
             _lift_confinement, status=((b"NoNewPrivs", b"Seccomp_filters"),), quick=_confinement_rest),
    _Setting("the user, groups or capabilities (os.setuid, setgid, setgroups, capset)", _credentials,
             _put_credentials, status=((b"Uid", b"Gid"), (b"Groups", b"Groups"), (b"CapInh", b"CapAmb"))),
    # Hooks every later error of every function goes through: one that ends the process
    # (``os._exit``) ended the engine at the next exception raised in a ``__del__`` or a
    # thread, under whichever function's request that fell in, which took the blame.
    _Setting("the exception hooks (sys.excepthook, sys.unraisablehook, threading.excepthook)",
             _exception_hooks, _put_exception_hooks, _any_replaced, quick=lambda taken: _identities(_exception_hooks)),
    # faulthandler left enabled writes a later crash's traceback to the descriptor it was
    # given, by number: closed since, and that number is whatever file the crashing
    # function opened next (its own output, a socket). Which file it holds cannot be
    # read, only whether it is on: put back as the engine started (off, unless
    # PYTHONFAULTHANDLER; then on stderr).
    _Setting("faulthandler (enabled)", faulthandler.is_enabled,
             lambda taken: faulthandler.enable(sys.__stderr__) if taken else faulthandler.disable()),
    _Setting("torch.nn's global module hooks", _nn_hooks, _put_nn_hooks, _nn_hooks_changed, quick=_nn_hooks_quick),
    _Setting("the fork hooks (os.register_at_fork)", _fork_hooks, _put_fork_hooks,
             _more_fork_hooks),
    _Setting("sys.stdin, sys.stdout or sys.stderr", _streams, _put_streams, _any_replaced,
             quick=lambda taken: _identities(_streams)),
    # After them: the engine's own streams, put back in their places first.
    _Setting("sys.stdin, sys.stdout or sys.stderr (closed)", _closed_streams, _reopen_streams),
    _Setting("descriptors 0-2 (stdin, stdout, stderr), the engine's log pipe, or the engine's own", _stdio, _put_stdio),
    # torch keeps the current dual level in a module global, not per thread.
    _Setting("a forward-AD dual level (entered, not exited)", _dual_level, _exit_dual_levels, operator.gt),
    _Setting("environment variables", _environ, _put_environ, _environ_changed),
    # After the environment: a TZ it put back takes effect here.
    _Setting("the time zone (TZ, time.tzset)", _time_zone, _put_time_zone),
)


def _program_environment_setting(env: ProgramEnvironment) -> _Setting:
    return _Setting("the environment as programs get it (os.putenv, setenv)", env.get, env.put, env.changed,
                    shown=(env.shown, "the values the engine started with"))


@functools.cache
def _library_settings() -> tuple[_Setting, ...]:
    """The state of the standard library and numpy (``library_state``) and the import
    system's tables (``imports``), as the engine process takes its settings: made once
    (the finder that notes imports goes first on ``sys.meta_path``, before the finders
    are taken)."""
    imports = Imports()
    modules, cache = imports.modules, imports.path_cache
    context = DecimalContext()
    try:
        programs: tuple[_Setting, ...] = (_program_environment_setting(ProgramEnvironment(_steers)),)
    except (OSError, ValueError, AttributeError) as exc:  # no libc environ to read: os.environ's alone
        log.debug("libc's environment not watched: %s", exc)
        programs = ()
    return (
        *programs,
        _Setting("decimal's context (decimal.getcontext, setcontext)", context.get, context.put, context.changed,
                 shown=(context.shown, "the engine's own")),
        _Setting("the locale (locale.setlocale)", locale_now, put_locale),
        *(_generator_setting(g) for g in generators()),
        # The path's finders and entries first: whether a finder finds a module planted in
        # sys.modules is asked of them (a finder of its own cached for a directory would say no).
        _Setting("sys.path_importer_cache (finders the path hooks did not make)", cache.get, cache.put, cache.changed,
                 shown=(lambda now, taken: "add " + ", ".join(cache.found), "the path hooks' own")),
        _Setting("sys.path (entries ahead of those the engine started with)", path_entries, put_path, path_changed,
                 shown=(lambda now, taken: "put " + ", ".join(str(e) for e in now if e not in taken) + " ahead",
                        "the entries the engine started with first, those added behind them")),
        _Setting("sys.modules (entries no import made, where a finder finds the module)", modules.get, modules.put,
                 modules.changed, shown=(lambda now, taken: "add " + ", ".join(modules.found), "the modules imported")),
    )


# The tests of a change that equal values always pass (``now == taken``: unchanged), so
# that settings tested by them can be compared whole (``ProcessSettings._unchanged``).
# Not those that test identity: a hook equal to the one taken is not it.
_EQUAL_IS_UNCHANGED = frozenset({operator.ne, operator.gt, operator.lt, _environ_changed, _armed, _filters_changed,
                                 _gc_debug_changed, _digits_lowered, _more_fork_hooks, path_changed})


def _equal_is_unchanged(changed: Callable[[Any, Any], bool]) -> bool:
    """Whether ``changed`` is such a test: one of those above, or a method of a setting
    made elsewhere that says so (``equal_is_unchanged``: library_state's, imports')."""
    return changed in _EQUAL_IS_UNCHANGED or getattr(changed, "equal_is_unchanged", False)


class _Unreadable:
    def __repr__(self) -> str:
        return "a value that cannot be read"


# What a setting whose read raised is taken to be: a function's change made it so (the
# engine's loop died of it, after the batch), and it is put back; one that cannot be read
# at the start is left alone.
_UNREADABLE = _Unreadable()
_UNKNOWN = object()  # not read this pass, for want of a descriptor: left as it is


def _read(setting: _Setting) -> Any:
    try:
        return setting.get()
    except _NoDescriptor:
        return _UNKNOWN
    except Exception:
        return _UNREADABLE


# First: the lines that name what else a function changed go through these loggers.
_SERVICE_LOGGING = _Setting("the service's own loggers (their level, handlers, filters, streams, or disabled; "
                            "the record factory)", _service_logging,
                            _put_service_logging)
# Second, before any setting read from a file (/proc/self/status): an open-file limit
# lowered below the descriptors the engine holds (RLIMIT_NOFILE of 20) failed that read,
# which then said the seccomp state, the capabilities and the ignored signals had all
# changed; the engine left, naming the function for "a seccomp filter, which cannot be
# put back", at each of its calls.
_RESOURCE_LIMITS = _Setting("resource limits", _limits, _put_limits)
# Third, before the settings of paths (the working directory): a root or mount namespace
# moved makes them read as changed, and each would be put back, or fail to be, in the
# wrong file system.
_PLACES_SETTING = _Setting("the root directory or namespaces (chroot, unshare, setns)", _places, _put_places,
                           shown=(lambda now, taken: "another " + ", ".join(
                               name for name, a, b in zip(("root", *(n[3:] for n, _ in _NAMESPACES)), now, taken)
                               if a != b), "the engine's own"))


def _shown(value: Any, other: Any, taken: bool = False) -> Any:
    """For the log: a default-device context as its device; the environment by the
    names of its variables that differ from ``other``, never by their values."""
    if isinstance(value, _SeedValue) and taken:  # put back as a fresh one, not the one taken
        return "a seed drawn afresh"
    if isinstance(value, tuple) and any(v is _FINDERS_APART for v in value):  # the finders: those added, by name
        if taken:
            return "the finders the engine started with first, those added behind them"
        added = [f for f in value if f is not _FINDERS_APART and all(f is not t for t in other)]
        return "add " + ", ".join(getattr(f, "__qualname__", None) or type(f).__qualname__ for f in added)
    if isinstance(value, _Environment):
        if taken:
            return "the values the engine started with"
        names = sorted(k.decode(errors="replace") for k in (*other, *_steering_added(value, other))
                       if value.get(k) != other.get(k))  # those put back, those taken away
        return f"other values of {', '.join(names)}"
    return getattr(value, "device", value)


def _passed(get: Callable[[], Any], changed: Callable[[Any, Any], bool], taken: Any) -> Any:
    """A setting's value now where its test lets it be, else the value taken."""
    try:
        now = get()
        return taken if changed(now, taken) else now
    except Exception:
        return taken


class ProcessSettings:
    """The settings as they were when made; :meth:`restore` puts back what changed.
    ``own_process``: the engine owns its process (an engine process), and the settings of
    the whole process (signals, timers, limits...) are its to keep too."""

    def __init__(self, own_process: bool = False) -> None:
        self._settings = (_SERVICE_LOGGING, _RESOURCE_LIMITS, _PLACES_SETTING, *_SETTINGS, *_OWN_PROCESS_SETTINGS,
                          *_library_settings()) if own_process else _SETTINGS
        self._own_process = own_process
        if own_process:
            keep_status_open()
            _LOCK_PROBE.remake()
            if threading.get_native_id() == os.getpid():  # (the thread the batches run on)
                _keep_places()
        _STATUS.clear()
        KERNELS.take()
        self._taken = [_read(s) for s in self._settings]
        # What each pass reads: those read at the start (one unreadable then has nothing to put back)
        self._checks = [(s, s.get, s.changed, taken) for s, taken in zip(self._settings, self._taken)
                        if taken is not _UNREADABLE and taken is not _UNKNOWN]
        # For the pass that finds nothing changed (nearly every one): the settings whose
        # test equal values always pass, read into one list and compared with the one
        # taken in one step; the others (torch's kernels, hooks that may be None) each by
        # its own test. Settings that lines of /proc/self/status tell (the ids, the signal
        # mask, the umask...) are compared as those lines, read from the one text that
        # pass reads anyway, in place of a system call or two each; others by a cheaper
        # stand-in (``_Setting.quick``: ids for what is tested by identity), where there is one.
        by_status = self._by_status()
        self._value_gets, self._value_taken, self._own_tests = [], [], []
        self._compared: dict[int, int] = {}  # a setting's index -> its value's, where compared as read by ``get``
        for index, (setting, get, changed, taken) in enumerate(self._checks):
            # (with status lines, ``quick`` tells only what they do not: read without them, not at all)
            quick = setting.quick(taken) if setting.quick is not None and (
                setting in by_status or not setting.status) else None
            if quick is not None:
                self._value_gets.append(quick)
                self._value_taken.append(quick())
            elif setting in by_status:
                pass  # its status lines tell it whole
            elif _equal_is_unchanged(changed):
                self._compared[index] = len(self._value_gets)
                self._value_gets.append(get)
                self._value_taken.append(taken)
            else:
                self._own_tests.append((get, changed, taken))
        if by_status:
            numbers = _status_line_numbers(tuple(run for setting in by_status for run in setting.status))
            lines = _status_lines(sorted({n for run in numbers.values() for n in run}))
            self._value_gets.append(lines)
            self._value_taken.append(lines())
        self._thread = threading.get_ident() if by_status else None
        # The global random generators (torch's, Python's, numpy's: the engine's own), with
        # where each one's fingerprint is compared, for ``before``.
        self._generators = [(setting.put.__self__, self._compared.get(index))
                            for index, (setting, _, _, _) in enumerate(self._checks)
                            if isinstance(getattr(setting.put, "__self__", None), Generator)]
        self._last_function: str | None = None  # the function of the last batch ``before`` saw
        self._named: set[tuple[str, str]] = set()  # (function, setting) already logged
        # (function, setting) of the first change that could not be put back: the engine leaves.
        self.unrestorable: tuple[str, str] | None = None
        # Functions whose threads are alive (``strays.left``), set by the engine process: a
        # thread a function left waiting (a ``threading.Timer``) may change a setting later,
        # in the middle of another function's batch, which alone would be named for it.
        self.suspects: list[str] = []

    def _who(self, function: str) -> str:
        others = [name for name in self.suspects if name != function]
        named = function or "a function"
        return f"{named} (or a thread left running by {', '.join(others)})" if others else named

    def _by_status(self) -> dict[_Setting, Any]:
        """The settings (with their values taken) that the pass finding nothing changed
        compares as lines of /proc/self/status (``_Setting.status``): where the text taken
        has every line each needs, and only in an engine process's main thread, whose
        status it is (the mask, the affinity, the capabilities are a thread's own; the
        engine's batches run there)."""
        if not self._own_process or threading.get_native_id() != os.getpid():
            return {}
        try:
            found = _status_line_numbers(tuple(run for s, _, _, _ in self._checks for run in s.status))
        except Exception:  # no text to read: each setting read by its own getter
            return {}
        return {setting: taken for setting, _, changed, taken in self._checks
                if setting.status and _equal_is_unchanged(changed) and all(run in found for run in setting.status)}

    def _unchanged(self) -> bool:
        """Whether every setting is as taken, or as the last full pass let it be (nearly
        always), at a fraction of the cost of the pass that puts back what differs: no
        call and no test per setting where a comparison of values tells. Any doubt (a
        read that fails, one without a descriptor free, a comparison that raises, another
        thread than the one whose status lines were taken) is the full pass's to settle."""
        if self._thread is not None and threading.get_ident() != self._thread:  # status lines: that thread's
            return False
        try:
            if [get() for get in self._value_gets] != self._value_taken:
                return False
            for get, changed, taken in self._own_tests:
                if changed(get(), taken):
                    return False
        except Exception:
            return False
        return True

    def before(self, function: str) -> None:
        """Before a batch of ``function``: the global random generators re-seeded from the
        OS's entropy where the last batch was another function's. A function that reads
        a generator's state and draws nothing (``torch.get_rng_state()``,
        ``np.random.get_state()``, ``random.getstate()``) moves nothing ``restore`` sees,
        and knew the draws of the next function's batch in advance (a clone of the state
        drew them: another client's noise, to the last digit). Reading cannot be seen,
        so the state a function may have read is no other function's to draw from. Within
        one function's batches nothing is told to another function (its own code drew
        them anyway): a service of one hot function pays one comparison a batch, a switch
        the three re-seeds (docs/architecture.md)."""
        if function == self._last_function:
            return
        last, self._last_function = self._last_function, function
        for generator, compared in self._generators:
            try:
                generator.put(None)
            except Exception as exc:  # what the last function left of it refuses a seed: it leaves (as ``restore``'s)
                log.error("%s left %s so that it cannot be re-seeded here (%s)", self._who(last or ""),
                          generator.what, exc)
                self.unrestorable = self.unrestorable or (last or "", generator.what)
                continue
            if compared is not None:  # the quick pass compares with the state drawn afresh
                self._value_taken[compared] = generator.expected

    def restore_idle(self, left: list[str]) -> list[str]:
        """Before a batch, with threads (or processes) that the functions ``left`` started
        alive: the settings changed while no function ran, put back (``restore``), but
        the random generators' (a thread's own draws; ``before`` re-seeds them for another
        function anyway). Only such a thread changed them, asleep between requests: a
        kernel it registered over ``aten::sin`` answered the next function's ``sin``
        with its values, with a 200, and that function was struck for it; torch's default
        dtype set had the next function's batch run under it, named for it."""
        if not left:
            return []
        return [what for what, generator in self.restore("") if not generator]

    def restore(self, function: str) -> list[tuple[str, bool]]:
        """Put back what differs now (nothing, nearly always); what did, as (setting,
        whether a random generator's state)."""
        found: list[tuple[str, bool]] = []
        if self._own_process:
            # A faulthandler watchdog (``dump_traceback_later(t, exit=True)``) is a timer
            # too: it ended the engine t seconds later, under another function's request.
            # It cannot be read, only cancelled (18 ns when none is armed); the engine
            # arms none of its own.
            faulthandler.cancel_dump_traceback_later()
            # ``faulthandler.register(SIGTERM, chain=False)``: a handler of C's that writes a
            # traceback and returns, which Python's table of handlers does not show, and
            # SIGTERM no longer ended the engine (serve's stop waited 10 s for it, then
            # killed it). Cannot be read either, only taken away (``unregister`` puts back
            # the handler it replaced; ~0.2 us a signal, False where none was registered).
            for number in _STOP_SIGNALS:
                if faulthandler.unregister(number):
                    log.warning("%s registered faulthandler on %s (faulthandler.register), which kept the signal "
                                "from stopping the engine; taken away", self._who(function),
                                signal.Signals(number).name)
            _LOCK_PROBE.remake()  # (before the status is read: its VmLck tells whether the new page is locked)
        _STATUS.clear()  # read afresh, once, by the first setting that needs it
        if not _LOCK_PROBE.refused and self._unchanged():
            return found
        _STATUS.clear()
        # Something differs, or a read failed: each setting in its order, as it is read
        # and put back (_read inlined: a call less for each).
        for index, (setting, get, changed, taken) in enumerate(self._checks):
            try:
                now = get()
            except _NoDescriptor:
                continue
            except Exception:
                now = _UNREADABLE
            compared = self._compared.get(index)
            if now is not _UNREADABLE and not changed(now, taken):
                if compared is not None:
                    # A change let be (a library's "ignore" warning filter, an environment
                    # variable torch adds): the next passes compare with it, and find
                    # nothing changed without this pass. (Where equal values always pass
                    # the test, a value equal to this one passes it as this one did.)
                    self._value_taken[compared] = now
                continue
            found.append((setting.what, isinstance(getattr(setting.put, "__self__", None), Generator)))
            try:
                setting.put(taken)
            except Exception as exc:  # a privilege the engine lacks, a value torch refuses now
                log.error("%s changed %s (to %s), which cannot be put back here (%s)", self._who(function),
                          setting.what, _shown(now, taken), exc)
                self.unrestorable = self.unrestorable or (function, setting.what)
                continue
            if compared is not None:  # what it was put back to (the filters keep a library's "ignore"), if let be
                self._value_taken[compared] = _passed(get, changed, taken)
            if (function, setting.what) not in self._named:
                self._named.add((function, setting.what))
                now_shown, taken_shown = (setting.shown[0](now, taken), setting.shown[1]) if setting.shown is not None \
                    else (_shown(now, taken), _shown(taken, now, taken=True))
                # Past the log's RepeatFilter: a warm-up of a module with over 100 changers
                # had the rest counted, not named, and never named again (``_named``).
                log.warning("%s changed %s (to %s) and left it so; put back to %s for the other functions "
                            "(it is put back after each of its calls)", self._who(function), setting.what,
                            now_shown, taken_shown, extra={"said_once": True})
        return found
