"""User functions that change process-wide settings (torch's, Python's, numpy's) and
leave them changed, for tests/test_process_settings.py (loaded by name like a user
module)."""

from __future__ import annotations

import ctypes
import faulthandler
import gc
import math
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings

import numpy as np
import torch

from jacobian_service import Input, register

X = [Input("x", shape=("n",))]


@register(inputs=X, description="sin, after making float64 the default dtype.")
def sets_float64_default(x: torch.Tensor) -> torch.Tensor:
    torch.set_default_dtype(torch.float64)
    return x.sin()


@register(inputs=X, description="sin, after turning anomaly detection on (every backward pass slower).")
def turns_on_anomaly_detection(x: torch.Tensor) -> torch.Tensor:
    torch.set_anomaly_enabled(True)
    return x.sin()


@register(inputs=X, description="sin, after setting 7 threads and high float32 matmul precision (TF32), and turning "
                                "oneDNN and cuDNN off and cuDNN's deterministic mode on.")
def sets_threads_and_tf32(x: torch.Tensor) -> torch.Tensor:
    torch.set_num_threads(7)
    torch.set_float32_matmul_precision("high")
    torch.backends.mkldnn.enabled = False
    torch.backends.cudnn.enabled = False
    torch.backends.cudnn.deterministic = True
    return x.sin()


@register(inputs=X, description="sin, after setting float32 precision through torch 2.9+'s per-backend API (TF32 "
                                "everywhere, bfloat16 for oneDNN's matmuls): torch's legacy getter then raises.")
def sets_fp32_precision_per_backend(x: torch.Tensor) -> torch.Tensor:
    torch.backends.fp32_precision = "tf32"
    torch.backends.mkldnn.matmul.fp32_precision = "bf16"
    return x.sin()


@register(inputs=X, description="sin, after setting its thread's scheduling policy to SCHED_IDLE and pinning it to "
                                "one CPU, when its first input is 666.")
def idles_and_pins_itself(x: torch.Tensor) -> torch.Tensor:
    if float(x.detach()[0]) == 666.0:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    return x.sin()


@register(inputs=X, description="sin, after making its process no child subreaper, when its first input is 666.")
def stops_being_a_subreaper(x: torch.Tensor) -> torch.Tensor:
    if float(x.detach()[0]) == 666.0:
        import ctypes

        ctypes.CDLL(None).prctl(36, 0, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    return x.sin()


@register(inputs=X, description="sin, after configuring logging with logging.config.dictConfig (which disables every "
                                "logger made before it) and making float64 the default dtype, when its first input is 666.")
def configures_logging(x: torch.Tensor) -> torch.Tensor:
    if float(x.detach()[0]) == 666.0:
        import logging.config

        logging.config.dictConfig({"version": 1, "root": {"level": "WARNING"}})
        torch.set_default_dtype(torch.float64)
    return x.sin()


@register(inputs=X, description="sin, after making every exception raised in a __del__ (unraisable) end the process, "
                                "when its first input is 666.")
def exits_on_unraisable(x: torch.Tensor) -> torch.Tensor:
    if float(x.detach()[0]) == 666.0:
        sys.unraisablehook = lambda unraisable: os._exit(3)
    return x.sin()


class _RaisesInDel:
    def __del__(self) -> None:
        raise RuntimeError("a __del__ that raises (Python ignores it, and says so)")


@register(inputs=X, description="sin, dropping an object whose __del__ raises (an unraisable exception) on the way, "
                                "when its first input is 666.")
def raises_in_del(x: torch.Tensor) -> torch.Tensor:
    if float(x.detach()[0]) == 666.0:
        _RaisesInDel()
    return x.sin()


@register(inputs=X, description="x * ones: its output takes the default dtype's promotion.")
def scaled_by_ones(x: torch.Tensor) -> torch.Tensor:
    return x * torch.ones(x.shape[0])


@register(inputs=X, description="sin, after turning every warning into an error.")
def sets_warnings_to_errors(x: torch.Tensor) -> torch.Tensor:
    warnings.simplefilter("error")
    return x.sin()


@register(inputs=X, description="sin, after disabling the garbage collector (and its automatic collections, "
                                "by a threshold of 0), keeping what it would collect (DEBUG_SAVEALL) and numpy's "
                                "warnings-only error handling.")
def disables_gc_and_raises_on_numpy_errors(x: torch.Tensor) -> torch.Tensor:
    gc.disable()
    gc.set_threshold(0)
    gc.set_debug(gc.DEBUG_SAVEALL)
    np.seterr(all="raise")
    return x.sin()


def _slow_collection(phase: str, info: dict) -> None:
    time.sleep(0.001)


@register(inputs=X, description="sin, after adding a callback every later garbage collection runs.")
def adds_a_gc_callback(x: torch.Tensor) -> torch.Tensor:
    gc.callbacks.append(_slow_collection)
    return x.sin()


@register(inputs=X, description="sin, after lowering the recursion limit and the int-string digit limit.")
def lowers_recursion_limit(x: torch.Tensor) -> torch.Tensor:
    sys.setrecursionlimit(sys.getrecursionlimit() - 1)
    sys.set_int_max_str_digits(640)  # str(10**700) now fails in every later function
    return x.sin()


@register(inputs=X, description="sin, with a warning on the way (as much user code has).")
def warns_and_works(x: torch.Tensor) -> torch.Tensor:
    warnings.warn("a warning, not an error", UserWarning, stacklevel=1)
    return x.sin()


@register(inputs=X, description="sin, after arming a one-second SIGALRM timer (signal.alarm's) with no handler.")
def arms_an_alarm(x: torch.Tensor) -> torch.Tensor:
    signal.setitimer(signal.ITIMER_REAL, 1.0)
    return x.sin()


@register(inputs=X, description="sin, after installing a profile function (every later call runs through it).")
def sets_a_profile_function(x: torch.Tensor) -> torch.Tensor:
    sys.setprofile(lambda frame, event, arg: None)
    return x.sin()


@register(inputs=X, description="sin, after ignoring SIGTERM, blocking SIGINT and setting a umask of 0o777.")
def ignores_sigterm_and_sets_umask(x: torch.Tensor) -> torch.Tensor:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    os.umask(0o777)
    return x.sin()


@register(inputs=X, description="sin, after setting a CPU-time limit 2-3 s above the engine's use (SIGXCPU then).")
def limits_cpu_time(x: torch.Tensor) -> torch.Tensor:
    # 2-3 s, not 0-1 s (int() of the use, plus 1): what the engine's warm-up of this
    # function still ran in its batch after the call (torch._dynamo's first import, ~1 s)
    # was killed by SIGXCPU when the use was just under a whole second.
    used = resource.getrusage(resource.RUSAGE_SELF)
    hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
    resource.setrlimit(resource.RLIMIT_CPU, (math.ceil(used.ru_utime + used.ru_stime) + 2, hard))
    return x.sin()


@register(inputs=X, description="sin, after raising its niceness by 5 (lowering it back takes CAP_SYS_NICE), "
                                "when its first input is 666 (not on the warm-up's input).")
def raises_its_niceness(x: torch.Tensor) -> torch.Tensor:
    if float(x.detach()[0]) == 666.0:
        os.nice(5)
    return x.sin()


def _armed(x: torch.Tensor) -> bool:
    return float(x.detach()[0]) == 666.0


@register(inputs=X, description="sin; on 666 first, stdout and stderr (descriptors 1, 2) sent to /dev/null.")
def redirects_stdout_and_stderr(x: torch.Tensor) -> torch.Tensor:
    if _armed(x):
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        os.dup2(null, 2)
        os.close(null)
    return x.sin()


@register(inputs=X, description="sin; on 666 first, after setting the thread switch interval (logged when put back).")
def sets_switch_interval(x: torch.Tensor) -> torch.Tensor:
    if _armed(x):
        sys.setswitchinterval(0.001)
    return x.sin()


_CLOSED_ONCE: list[bool] = []


@register(inputs=X, description="sin, after closing every descriptor above 2 on its first call in a process "
                                "(its warm-up's) when $SETTINGS_CLOSE_AT_WARM_UP is set: the engine's sockets go with them.")
def closes_descriptors_at_warm_up(x: torch.Tensor) -> torch.Tensor:
    if not _CLOSED_ONCE and os.environ.get("SETTINGS_CLOSE_AT_WARM_UP"):
        _CLOSED_ONCE.append(True)
        os.closerange(3, 65536)
    return x.sin()


class _DoublesSin(torch.overrides.TorchFunctionMode):
    """Every later ``sin`` doubled: a mode left entered gives other functions wrong answers."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        return out * 2 if func in (torch.sin, torch.Tensor.sin) else out


class _PassesThrough(torch.utils._python_dispatch.TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


@register(inputs=X, description="sin, after entering a torch function mode (doubling every later sin) and a "
                                "dispatch mode, neither exited.")
def leaves_torch_modes_entered(x: torch.Tensor) -> torch.Tensor:
    y = x.sin()
    _DoublesSin().__enter__()
    _PassesThrough().__enter__()
    return y


@register(inputs=X, description="sin, after entering a forward-AD dual level (a module global of torch's), not exited.")
def leaves_a_dual_level_entered(x: torch.Tensor) -> torch.Tensor:
    torch.autograd.forward_ad.enter_dual_level()
    return x.sin()


@register(inputs=X, description="sin, after arming a faulthandler watchdog that ends the process in one second.")
def arms_a_faulthandler_watchdog(x: torch.Tensor) -> torch.Tensor:
    faulthandler.dump_traceback_later(1.0, exit=True)
    return x.sin()


@register(inputs=X, description="sin, after pointing PATH nowhere and setting the time zone to UTC+9 (TZ, tzset), "
                                "when its first input is 666 (not on the warm-up's input: an in-process server's "
                                "warm-up would change the tests' own environment).")
def changes_path_and_time_zone(x: torch.Tensor) -> torch.Tensor:
    if _armed(x):
        os.environ["PATH"] = "/nonexistent"
        os.environ["TZ"] = "UTC-09"
        time.tzset()
    return x.sin()


@register(inputs=X, description="sin, when a shell is found on PATH (a function that runs programs); else fails.")
def finds_a_shell(x: torch.Tensor) -> torch.Tensor:
    if shutil.which("sh") is None:
        raise RuntimeError("no sh on PATH")
    return x.sin()


@register(inputs=X, description="x times 0, plus the engine's offset from UTC in seconds (time.timezone).")
def time_zone_offset(x: torch.Tensor) -> torch.Tensor:
    return x * 0 + float(time.timezone)


@register(inputs=X, description="sin, after entering autocast (bfloat16 on the CPU) and never leaving it, when its "
                                "first input is 666.")
def leaves_autocast_on(x: torch.Tensor) -> torch.Tensor:
    if _armed(x):
        torch.autocast("cpu", dtype=torch.bfloat16).__enter__()
    return x.sin()


@register(inputs=X, description="sin, after making the thread flush denormals to zero, when its first input is 666.")
def flushes_denormals(x: torch.Tensor) -> torch.Tensor:
    if _armed(x):
        torch.set_flush_denormal(True)
    return x.sin()


@register(inputs=X, description="x times 1e-39: denormal float32 values (zero where denormals are flushed).")
def denormal(x: torch.Tensor) -> torch.Tensor:
    return x * 1e-39


@register(inputs=X, description="sin, after setting new threads' stack size to 64 KiB, when its first input is 666.")
def shrinks_thread_stacks(x: torch.Tensor) -> torch.Tensor:
    if _armed(x):
        threading.stack_size(64 << 10)
    return x.sin()


@register(inputs=X, description="x times 0, plus the stack size new threads get (threading.stack_size; 0: the default).")
def thread_stack_size(x: torch.Tensor) -> torch.Tensor:
    return x * 0 + float(threading.stack_size())


@register(inputs=X, description="sin, after setting a default socket timeout of 1 ms, when its first input is 666.")
def sets_a_socket_timeout(x: torch.Tensor) -> torch.Tensor:
    if _armed(x):
        socket.setdefaulttimeout(0.001)
    return x.sin()


@register(inputs=X, description="x times 0, plus the default socket timeout in seconds (-1: none).")
def socket_timeout(x: torch.Tensor) -> torch.Tensor:
    timeout = socket.getdefaulttimeout()
    return x * 0 + (-1.0 if timeout is None else timeout)


@register(inputs=X, description="sin, after switching attention's math and flash backends off, when its first "
                                "input is 666.")
def switches_attention_off(x: torch.Tensor) -> torch.Tensor:
    if _armed(x):
        torch.backends.cuda.enable_math_sdp(False)
        torch.backends.cuda.enable_flash_sdp(False)
    return x.sin()


@register(inputs=X, description="Self-attention of x as one token sequence (scaled_dot_product_attention), summed "
                                "over the features: as a model would use it.")
def attends(x: torch.Tensor) -> torch.Tensor:
    q = x.reshape(1, 1, -1, 1)
    return torch.nn.functional.scaled_dot_product_attention(q, q, q).reshape(-1)


@register(inputs=X, description="sin, after raising the core-file size limit to its hard limit, when its first input is 666.")
def raises_the_core_limit(x: torch.Tensor) -> torch.Tensor:
    if _armed(x):
        resource.setrlimit(resource.RLIMIT_CORE, (resource.getrlimit(resource.RLIMIT_CORE)[1],) * 2)
    return x.sin()


@register(inputs=X, description="x times 0, plus the soft core-file size limit (-1: unlimited).")
def core_limit(x: torch.Tensor) -> torch.Tensor:
    soft = resource.getrlimit(resource.RLIMIT_CORE)[0]
    return x * 0 + float(-1 if soft == resource.RLIM_INFINITY else soft)


@register(inputs=X, description="sin, after ignoring SIGCHLD through libc (Python does not see it), when its first input is 666.")
def ignores_sigchld_in_c(x: torch.Tensor) -> torch.Tensor:
    if _armed(x):
        ctypes.CDLL(None).signal(signal.SIGCHLD, 1)  # SIG_IGN
    return x.sin()


@register(inputs=X, description="x times 0, plus the exit status subprocess reports for `false` (1).")
def status_of_false(x: torch.Tensor) -> torch.Tensor:
    return x * 0 + float(subprocess.run(["false"]).returncode)


@register(inputs=X, description="sin, after registering a global nn.Module forward hook that doubles outputs and a "
                                "30 s timer slack, when its first input is 666.")
def hooks_every_module(x: torch.Tensor) -> torch.Tensor:
    if _armed(x):
        torch.nn.modules.module.register_module_forward_hook(lambda module, args, out: out * 2)
        ctypes.CDLL(None).prctl(29, ctypes.c_ulong(30_000_000_000), 0, 0, 0)  # PR_SET_TIMERSLACK
    return x.sin()


_LINEAR = torch.nn.Linear(2, 2, bias=False)
with torch.no_grad():
    _LINEAR.weight.copy_(torch.eye(2))


@register(inputs=[Input("x", shape=(2,))], description="An identity nn.Linear: its Jacobian is the identity.")
def linear_module(x: torch.Tensor) -> torch.Tensor:
    return _LINEAR(x)


@register(inputs=X, description="Returns a tensor on the meta device (shapes, no values).")
def returns_meta(x: torch.Tensor) -> torch.Tensor:
    return torch.empty(x.shape, device="meta")


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


# (AUDIT_ARCH_*, uname's system call number) by machine
_UNAME = {"x86_64": (0xC000003E, 63), "aarch64": (0xC00000B7, 160)}


def refuse_uname() -> None:
    """A seccomp filter (no_new_privs first, as an unprivileged process must) that fails
    ``uname`` with EPERM and lets every other system call through."""
    import platform

    arch, nr = _UNAME[platform.machine()]
    program = (_SockFilter * 6)(
        _SockFilter(0x20, 0, 0, 4),  # load the architecture
        _SockFilter(0x15, 0, 3, arch),  # another: allow
        _SockFilter(0x20, 0, 0, 0),  # load the system call's number
        _SockFilter(0x15, 0, 1, nr),  # not uname: allow
        _SockFilter(0x06, 0, 0, 0x00050000 | 1),  # SECCOMP_RET_ERRNO | EPERM
        _SockFilter(0x06, 0, 0, 0x7FFF0000))  # SECCOMP_RET_ALLOW
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(38, 1, 0, 0, 0) or libc.prctl(22, 2, ctypes.byref(_SockFprog(6, program)), 0, 0):  # NO_NEW_PRIVS, SECCOMP
        raise OSError(ctypes.get_errno(), "seccomp")


def _wait_for_a_request_behind() -> None:
    """Until a request waits on the engine's connection to its front end (bytes to read
    on a connected Unix socket), after saying it waits (SETTINGS_WAITING names a file)."""
    import fcntl
    import termios

    open(os.environ["SETTINGS_WAITING"], "w").close()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        for fd, listening in _unix_sockets():
            if not listening and int.from_bytes(fcntl.ioctl(fd, termios.FIONREAD, bytes(4)), sys.byteorder):
                return
        time.sleep(0.01)


@register(inputs=X, description="sin, after installing a seccomp filter that fails uname, when its first input is "
                                "666; on 667, once another request waits behind it.")
def filters_system_calls(x: torch.Tensor) -> torch.Tensor:
    if float(x.detach()[0]) == 667.0:
        _wait_for_a_request_behind()
        refuse_uname()
    elif _armed(x):
        refuse_uname()
    return x.sin()


@register(inputs=X, description="sin, x times 0 plus 1 when os.uname() works (a seccomp filter may fail it).")
def can_uname(x: torch.Tensor) -> torch.Tensor:
    try:
        os.uname()
    except OSError:
        return x.sin() * 0
    return x.sin() * 0 + 1


@register(inputs=X, description="sin, after gc.unfreeze() (the engine's frozen heap back in every full collection), "
                                "when its first input is 666.")
def unfreezes_the_heap(x: torch.Tensor) -> torch.Tensor:
    if _armed(x):
        gc.unfreeze()
    return x.sin()


@register(inputs=X, description="x times 0, plus 1 when the engine's heap is frozen (gc.get_freeze_count() > 0).")
def heap_frozen(x: torch.Tensor) -> torch.Tensor:
    return x * 0 + float(gc.get_freeze_count() > 0)


@register(inputs=X, description="sin, after registering a fork hook that ends every forked child at once (status 7), "
                                "when its first input is 666.")
def hooks_every_fork(x: torch.Tensor) -> torch.Tensor:
    if _armed(x):
        os.register_at_fork(after_in_child=lambda: os._exit(7))
    return x.sin()


@register(inputs=X, description="x times 0, plus the exit status of a child it forks, which exits 0 at once.")
def forks_a_child(x: torch.Tensor) -> torch.Tensor:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    return x * 0 + float(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))


_GO, _DONE = threading.Event(), threading.Event()


def _set_float64_when_told() -> None:
    _GO.wait()
    torch.set_default_dtype(torch.float64)
    _DONE.set()


@register(inputs=X, description="sin; on 666 first, leaves a thread waiting to make float64 the default dtype once "
                                "releases_the_waiting_thread tells it.")
def leaves_a_waiting_thread(x: torch.Tensor) -> torch.Tensor:
    if _armed(x):
        threading.Thread(target=_set_float64_when_told, daemon=True).start()
    return x.sin()


@register(inputs=X, description="sin; on 666 first, after telling the thread leaves_a_waiting_thread left to act, "
                                "and waiting for it (up to 10 s).")
def releases_the_waiting_thread(x: torch.Tensor) -> torch.Tensor:
    if _armed(x):
        _GO.set()
        _DONE.wait(10)
    return x.sin()


@register(inputs=X, description="sin, after making later extension imports load with RTLD_GLOBAL (sys.setdlopenflags) "
                                "and torch's once-only warnings warn at every call (torch.set_warn_always).")
def sets_dlopen_flags_and_warn_always(x: torch.Tensor) -> torch.Tensor:
    sys.setdlopenflags(os.RTLD_GLOBAL | os.RTLD_NOW)
    torch.set_warn_always(True)
    return x.sin()


@register(inputs=X, description="sin, after gc.set_debug(gc.DEBUG_SAVEALL) (every later collected cycle kept in "
                                "gc.garbage), when its first input is 666.")
def keeps_all_garbage(x: torch.Tensor) -> torch.Tensor:
    if _armed(x):
        gc.set_debug(gc.DEBUG_SAVEALL)
    return x.sin()


@register(inputs=X, description="x times 0, plus how many objects gc.garbage holds after collecting a cycle made here.")
def garbage_kept(x: torch.Tensor) -> torch.Tensor:
    cycle: list = []
    cycle.append(cycle)
    del cycle
    gc.collect()
    return x * 0 + len(gc.garbage)


@register(inputs=X, description="sin, after switching its effective user to nobody (os.seteuid; root's saved id "
                                "kept), when its first input is 666 and it runs as root.")
def switches_to_nobody(x: torch.Tensor) -> torch.Tensor:
    if _armed(x) and os.geteuid() == 0:
        os.seteuid(65534)
    return x.sin()


@register(inputs=X, description="sin; on 666 first, after mlockall(MCL_FUTURE): every mapping the engine makes "
                                "from then on locked (past RLIMIT_MEMLOCK, unprivileged, refused: a MemoryError).")
def locks_every_later_mapping(x: torch.Tensor) -> torch.Tensor:
    if _armed(x):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.mlockall(2) != 0:  # MCL_FUTURE
            raise OSError(ctypes.get_errno(), "mlockall")
    return x.sin()


@register(inputs=X, description="x times 0, plus the memory locked (VmLck, kB) with a new 1 MiB mapping in place.")
def locked_with_a_new_mapping(x: torch.Tensor) -> torch.Tensor:
    import mmap

    mapping = mmap.mmap(-1, 1 << 20)  # anonymous, never touched
    try:
        with open("/proc/self/status") as status:
            locked = next(int(line.split()[1]) for line in status if line.startswith("VmLck:"))
    finally:
        mapping.close()
    return x * 0 + locked


@register(inputs=X, description="sin; on 666 first, where the engine may (root), after entering namespaces of its "
                                "own (unshare: network, host name, mounts) and naming the host, the second input 1; "
                                "changing its root (chroot), 2.")
def enters_namespaces(x: torch.Tensor) -> torch.Tensor:
    if _armed(x):
        if float(x[1]) == 1.0:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.unshare(0x40000000 | 0x04000000 | 0x00020000) == 0:  # CLONE_NEWNET | CLONE_NEWUTS | CLONE_NEWNS
                socket.sethostname("enters-namespaces")
        elif os.geteuid() == 0:
            os.chroot(os.environ.get("TMPDIR", "/tmp"))
    return x.sin()


@register(inputs=X, description="sin; on 666 first, after changing its execution domain (personality: UNAME26, "
                                "every later uname names kernel 2.6; READ_IMPLIES_EXEC).")
def changes_its_personality(x: torch.Tensor) -> torch.Tensor:
    if _armed(x):
        ctypes.CDLL(None, use_errno=True).personality(0x0020000 | 0x0400000)
    return x.sin()


@register(inputs=X, description="x times 0, plus the effective user id it runs as.")
def effective_user(x: torch.Tensor) -> torch.Tensor:
    return x * 0 + os.geteuid()


def _unix_sockets() -> list[tuple[int, bool]]:
    """The process's Unix sockets: (descriptor, listening)."""
    found = []
    for fd in map(int, os.listdir("/proc/self/fd")):
        try:
            copy = os.dup(fd)  # probed through a duplicate, which alone it closes
        except OSError:  # gone: the listing's own
            continue
        try:
            probe = socket.socket(fileno=copy)
        except OSError:  # not a socket
            os.close(copy)
            continue
        with probe:
            if probe.family == socket.AF_UNIX:
                found.append((fd, bool(probe.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))))
    return found


@register(inputs=X, description="sin, after closing the engine's Unix sockets (its listening socket, its front "
                                "ends' connections), when its first input is 666.")
def closes_the_engines_sockets(x: torch.Tensor) -> torch.Tensor:
    if _armed(x):
        for fd, _ in _unix_sockets():
            os.close(fd)
    return x.sin()
