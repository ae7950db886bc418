"""Engines keep their hands off the other processes of the server (no torch).

Functions run in the engine process as the service's user, and the kernel lets a process
signal, renice, pin or trace any other process of its user: ``os.kill(os.getppid(),
signal.SIGKILL)`` in a function took ``serve`` down, and with it the front ends and every
client (``os.kill(-1, SIGKILL)``: every process of the user, a container's whole world).
The supervisor confines each engine and spare process it starts, between fork and exec
(``Popen``'s ``preexec_fn``: one thread then, and a confinement binds the thread that
makes it and all it starts later; in the engine itself, numpy's and torch's imports start
threads before any code of its own runs), so that its functions and whatever they start
keep to the engine's own processes:

- **Landlock** (Linux 6.12+, where the kernel runs the Landlock module: ABI 6's signal
  scope): a signal only reaches a process of the engine's own domain, the engine and its
  descendants; ``ptrace``, ``process_vm_writev``, ``/proc/PID/mem`` and ``/proc/PID/fd``
  of any other are refused as well (any Landlock domain does that; the engine therefore
  takes a front end's shared memory by descriptor, see ``channel``). The front ends, the
  spare, the other engines, ``serve`` and everything else of the user are out of reach,
  however a function finds their pids (``/proc``). The same scope keeps it from
  connecting to an abstract Unix socket bound outside the engine: the supervisor's
  (``supervision``). Nothing of the file system or the network is restricted.
- **A seccomp filter**, everywhere (x86-64 and arm64): the system calls that act on
  another process by its pid (signals, ``pidfd_open``, ``ptrace``, ``setpriority``,
  ``sched_setaffinity`` and the scheduler's, ``prlimit``, ``ioprio_set``,
  ``process_vm_*``, ``migrate_pages`` / ``move_pages``) fail with EPERM for ``serve``
  (the engine's parent) and its threads, its process group (the front ends' too), every
  process (``kill(-1)``) and, for nice and I/O priorities, every process of the user
  (``PRIO_USER``); ``clone`` with ``CLONE_PARENT`` too (a child of ``serve``'s, out of
  the engine's sight: ``clone3``, whose flags no filter can read, answers ENOSYS, and
  glibc falls back to ``clone``). Without Landlock, this is what protects ``serve``; a front end, the
  spare or another engine whose pid a function reads in ``/proc`` can still be signalled
  (``serve`` starts a front end again, the supervisor replaces a dead spare or engine).
  Limits and priorities (``prlimit``, ``setpriority``, ``ioprio_set``), which no
  Landlock scope covers, only the engine may be the target of (0, or its own pid,
  written into the filter in the engine process): a front end whose open-file limit a
  function lowered to 12 accepted no connection again. Another process's limits may
  still be read; one of the engine's other threads named by its id is refused too.
  Scheduling and affinity (``sched_set*``) name a thread, and the engine's own threads
  are ones the filter cannot tell from other processes (glibc pins a new thread, as
  OpenMP does under ``OMP_PROC_BIND``, by its id; refused, the thread was not made):
  on any thread but the engine's own pid and ``serve``'s (EPERM) the call returns 0 and
  changes nothing. Pin or schedule the engine as a whole (``taskset``, or
  ``os.sched_setaffinity(0, ...)`` before its threads start): its threads inherit it.
  A deny list: what it does not name stays allowed, the engine's own children above all
  (a ``multiprocessing`` pool's ``terminate``, ``Popen.kill``, the engine's own kills of
  stray processes).

An unprivileged process needs ``no_new_privs`` for either (root needs nothing): it is set
then, before the engine takes its settings (so no function is blamed for it); a
set-user-ID program a function runs (``sudo``) then runs without its privilege.

Cost: set once, before exec. The filter runs a few BPF instructions on every system call
of the engine: lost in noise (a ``read()`` of ``/dev/null``, best of 5 x 200,000: 1.1-1.7
us with or without it on the loaded 2-core VM); Landlock's scope costs only the signals.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct
from typing import Callable

__all__ = ["confiner", "in_force", "landlock_abi", "protected", "seccomp_filters"]

_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2
_SECCOMP_RET_ALLOW = 0x7FFF0000
_SECCOMP_RET_ERRNO = 0x00050000

_LANDLOCK_CREATE_RULESET_VERSION = 1
_LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0
_LANDLOCK_SCOPE_SIGNAL = 1 << 1
_SYS_LANDLOCK_CREATE_RULESET = 444  # the same number on every architecture (asm-generic)
_SYS_LANDLOCK_RESTRICT_SELF = 446

# What each system call's target is, by kind:
#   "pid"    args[0] is a pid: kill's -1 (everyone) and -pgid (a group) included
#   "tid"    args[0] is a thread of some process (tkill)
#   "arg1"   args[1] is the pid (ptrace)
#   "sched"  args[0] is a thread (sched_set*: scheduling and affinity): the engine itself (0,
#            or its own pid) may be it; for serve and its threads EPERM, as "tid"; any other
#            is answered as done and left as it is (see _filter: the engine's own threads)
#   "limit"  prlimit64(pid, resource, new, old): only the engine itself (0, or its own pid)
#            may be set; any process's limits may be read (new NULL)
#   "prio"   setpriority(which, who): a process, a group or a user; "own" for a process or a group
#   "ioprio" ioprio_set(which, who), the same with other numbers
#   "clone"  clone(flags, ...): CLONE_PARENT refused (EPERM)
#   "clone3" clone3(args, size): ENOSYS, as a kernel before 5.3 answers (its flags are in
#            memory a filter cannot read; glibc then makes its threads and children with clone)
_X86_64 = {62: "pid", 200: "tid", 234: "pid", 129: "pid", 297: "pid", 434: "pid", 101: "arg1", 141: "prio",
           251: "ioprio", 203: "sched", 144: "sched", 142: "sched", 314: "sched", 302: "limit", 310: "pid", 311: "pid",
           256: "pid", 279: "pid", 56: "clone", 435: "clone3"}
_AARCH64 = {129: "pid", 130: "tid", 131: "pid", 138: "pid", 240: "pid", 434: "pid", 117: "arg1", 140: "prio",
            30: "ioprio", 122: "sched", 119: "sched", 118: "sched", 274: "sched", 261: "limit", 270: "pid", 271: "pid",
            238: "pid", 239: "pid", 220: "clone", 435: "clone3"}
# The 32-bit system calls an x86-64 process can still make (int 0x80): else a way round.
_I386 = {37: "pid", 238: "tid", 270: "pid", 178: "pid", 335: "pid", 434: "pid", 26: "arg1", 97: "prio",
         289: "ioprio", 241: "sched", 156: "sched", 154: "sched", 351: "sched", 340: "limit", 347: "pid", 348: "pid",
         120: "clone", 435: "clone3"}
_AUDIT_ARCH_X86_64 = 0xC000003E
_AUDIT_ARCH = {"x86_64": (_AUDIT_ARCH_X86_64, _X86_64), "aarch64": (0xC00000B7, _AARCH64),
               "arm64": (0xC00000B7, _AARCH64)}
_AUDIT_ARCH_I386 = 0x40000003
_X32_SYSCALL_BIT = 0x40000000
_PRIO_PROCESS, _PRIO_PGRP, _PRIO_USER = 0, 1, 2
_IOPRIO_WHO_PROCESS, _IOPRIO_WHO_PGRP, _IOPRIO_WHO_USER = 1, 2, 3


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def landlock_abi() -> int:
    """The Landlock ABI this kernel offers (0: none, or Landlock not among its modules)."""
    try:
        abi = _libc().syscall(_SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0),
                              ctypes.c_uint32(_LANDLOCK_CREATE_RULESET_VERSION))
    except (OSError, AttributeError):
        return 0
    return max(0, abi)


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def protected() -> tuple[int, int, list[int]]:
    """What an engine is kept off, as this process (``serve``) is now: its pid, its
    process group and its threads. Data, so that another process (the fork server,
    ``fork_server``) can make the same filter for an engine it forks."""
    return os.getpid(), os.getpgrp(), _tasks(os.getpid())


def confiner(landlock: bool = True, target: tuple[int, int, list[int]] | None = None) -> Callable[[], None]:
    """What a new engine process runs between fork and exec (``preexec_fn``) to confine
    itself against this process (``serve``: its parent, its group, its threads now), or
    against ``target`` (``protected()`` of ``serve``, made there: the fork server confines
    the engines it forks for ``serve``).
    Everything is made here, before the fork: the child only makes system calls, and
    never raises (an engine the kernel will not confine still serves; ``in_force``
    tells it what it got). ``landlock`` False: the seccomp filter alone, as on a kernel
    without Landlock's signal scope."""
    parent, group, threads = target if target is not None else protected()
    libc = _libc()
    syscall, prctl = libc.syscall, libc.prctl
    scope = _RulesetAttr(0, 0, _LANDLOCK_SCOPE_SIGNAL | _LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET) \
        if landlock and landlock_abi() >= 6 else None
    scope_size = ctypes.c_size_t(ctypes.sizeof(_RulesetAttr))
    machine = platform.machine().lower()
    fprog = program = None
    own: list[int] = []
    if machine in _AUDIT_ARCH:
        native, table = _AUDIT_ARCH[machine]
        code, own = _filter(table, native, parent, group, threads)
        if len(code) // 8 > _MAX_INSTRUCTIONS:  # thousands of threads: the process itself only
            code, own = _filter(table, native, parent, group, [])
        program = ctypes.create_string_buffer(code, len(code))
        fprog = _SockFprog(len(code) // 8, ctypes.cast(program, ctypes.c_void_p))
    get_errno, denied = ctypes.get_errno, (errno.EPERM, errno.EACCES)

    def unprivileged(call: Callable[[], int]) -> None:
        """``call``, again with no_new_privs where the kernel wants it (no CAP_SYS_ADMIN)."""
        if call() != 0 and get_errno() in denied and prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0:
            call()

    def confine() -> None:
        try:
            if scope is not None:
                ruleset = syscall(_SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(scope), scope_size, ctypes.c_uint32(0))
                if ruleset >= 0:
                    unprivileged(lambda: syscall(_SYS_LANDLOCK_RESTRICT_SELF, ruleset, ctypes.c_uint32(0)))
                    os.close(ruleset)
            if fprog is not None:
                _patch_own(program, own)
                unprivileged(lambda: prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0))
        except BaseException:  # never: the engine starts as it would have, unconfined
            pass

    confine.keep = program  # type: ignore[attr-defined]  # the filter's buffer lives as long as the function
    return confine


def in_force() -> tuple[bool, bool]:
    """(Landlock, seccomp) as this process finds itself: a Landlock domain refuses it its
    parent's descriptors (``/proc/PID/fd/0``, which the same user may read otherwise);
    the filter is one more than its parent has (a container's own profile is in both)."""
    parent = os.getppid()
    landlock = False
    try:
        os.readlink(f"/proc/{parent}/fd/0")
    except PermissionError:
        landlock = landlock_abi() >= 6
    except OSError:
        pass
    mine, theirs = seccomp_filters("self"), seccomp_filters(str(parent))
    return landlock, mine is not None and theirs is not None and mine > theirs


def seccomp_filters(pid: str) -> int | None:
    """How many seccomp filters ``pid`` runs under (``Seccomp_filters``, Linux 5.9+; on
    older kernels 1 for any, from the mode)."""
    try:
        with open(f"/proc/{pid}/status") as fp:
            fields = dict(line.split(":", 1) for line in fp if ":" in line)
    except OSError:
        return None
    if "Seccomp_filters" in fields:
        return int(fields["Seccomp_filters"])
    return 1 if fields.get("Seccomp", "0").strip() == "2" else 0


# ------------------------------------------------------------------ the seccomp filter

_LD_W_ABS, _JEQ_K, _JGE_K, _JSET_K, _JA, _RET_K = 0x20, 0x15, 0x35, 0x45, 0x05, 0x06
_CLONE_PARENT = 0x00008000
_NR, _ARCH = 0, 4
_MAX_INSTRUCTIONS = 4096  # the kernel's BPF_MAXINSNS
_DENY = _SECCOMP_RET_ERRNO | errno.EPERM
_UNDONE = _SECCOMP_RET_ERRNO | 0  # the call returns 0, not run


def _arg(i: int) -> int:
    """Offset of the low 32 bits of args[i] (little-endian): the kernel reads a pid as an
    int, so the high half, whatever a caller puts there, never changes the target."""
    return 16 + 8 * i


def _u32(value: int) -> int:
    return value & 0xFFFFFFFF


class _Program:
    """A classic BPF program. A conditional jump reaches at most 255 instructions, so
    every test here only skips the one instruction after it (a return, or an
    unconditional jump, whose reach is 32 bits): the program stays valid however many
    pids it names."""

    def __init__(self) -> None:
        self.code: list[tuple[int, int, int, int, str | None]] = []  # (op, k, jt, jf, label of a jump)
        self.labels: dict[str, int] = {}
        self.own: list[int] = []  # instructions that compare with the engine's own pid

    def label(self, name: str) -> None:
        self.labels[name] = len(self.code)

    def load(self, offset: int) -> None:
        self.code.append((_LD_W_ABS, offset, 0, 0, None))

    def ret(self, value: int) -> None:
        self.code.append((_RET_K, value, 0, 0, None))

    def if_equal_return(self, value: int, result: int, op: int = _JEQ_K) -> None:
        self.code.append((op, _u32(value), 0, 1, None))
        self.ret(result)

    def unless_equal_return(self, value: int, result: int) -> None:
        self.code.append((_JEQ_K, _u32(value), 1, 0, None))
        self.ret(result)

    def if_own_return(self, result: int) -> None:
        """``result`` where the value loaded is the engine's own pid, which the program
        learns only in the engine process (``_patch_own``): its place is noted."""
        self.own.append(len(self.code))
        self.if_equal_return(0, result)

    def if_equal_go(self, value: int, label: str) -> None:
        self.code.append((_JEQ_K, _u32(value), 0, 1, None))
        self.code.append((_JA, 0, 0, 0, label))

    def assemble(self) -> bytes:
        out = bytearray()
        for i, (code, k, jt, jf, label) in enumerate(self.code):
            if label is not None:
                k = self.labels[label] - i - 1
            out += struct.pack("<HBBI", code, jt, jf, _u32(k))
        return bytes(out)


def _filter(table: dict[int, str], native: int, parent: int, group: int, threads: list[int]) -> tuple[bytes, list[int]]:
    """The filter: each listed call whose target is a protected one returns EPERM; and
    the places of the engine's own pid in it (``_patch_own``), unknown until it runs."""
    deny_pids = sorted({parent, *threads})
    # kill(-1): everyone; kill(-group): serve's group, the front ends; 0 (own group) stays.
    signal_targets = sorted({*deny_pids, _u32(-1), _u32(-group)})
    i386 = _I386 if native == _AUDIT_ARCH_X86_64 else {}
    p = _Program()
    p.load(_ARCH)
    p.if_equal_go(native, "native")
    if i386:
        p.if_equal_go(_AUDIT_ARCH_I386, "i386")
    p.ret(_SECCOMP_RET_ALLOW)
    for arch, calls in (("native", table), ("i386", i386)):
        if not calls:
            continue
        p.label(arch)
        p.load(_NR)
        if arch == "native" and native == _AUDIT_ARCH_X86_64:
            p.if_equal_return(_X32_SYSCALL_BIT, _DENY, op=_JGE_K)  # x32 calls: not this engine's, and a way round
        for nr, kind in calls.items():
            p.if_equal_go(nr, f"{arch}-{kind}")
        p.ret(_SECCOMP_RET_ALLOW)
        for kind, (arg, targets) in {"pid": (0, signal_targets), "tid": (0, deny_pids), "arg1": (1, deny_pids)}.items():
            p.label(f"{arch}-{kind}")
            p.load(_arg(arg))
            for value in targets:
                p.if_equal_return(value, _DENY)
            p.ret(_SECCOMP_RET_ALLOW)
        # Limits, priorities, scheduling and affinity: no Landlock scope covers them, and
        # the deny list names only serve. Set on a front end (found in /proc as serve's
        # child), an open-file limit of 12 left it accepting no connection, for good; a
        # CPU limit ended it; SCHED_IDLE starved it; the spare, promoted, inherited them.
        # Only the engine itself may be their target now.
        # The scheduler's calls name a thread, and the engine's own threads (their ids
        # are not known here) are targets a filter cannot tell from another process's:
        # glibc makes a pinned thread (pthread_attr_setaffinity_np: libgomp under
        # OMP_PROC_BIND, OMP_PLACES or GOMP_CPU_AFFINITY) with sched_setaffinity on the
        # new thread's id, and where that failed, so did the thread (libgomp ended the
        # engine at its first parallel region). So on any other thread such a call
        # "succeeds" and does nothing: serve's, as before, are refused.
        p.label(f"{arch}-sched")
        p.load(_arg(0))
        p.if_equal_return(0, _SECCOMP_RET_ALLOW)
        p.if_own_return(_SECCOMP_RET_ALLOW)
        for value in deny_pids:
            p.if_equal_return(value, _DENY)
        p.ret(_UNDONE)
        p.label(f"{arch}-limit")  # prlimit64(pid, resource, new, old): another's read, never set
        p.load(_arg(0))
        p.if_equal_return(0, _SECCOMP_RET_ALLOW)
        p.if_own_return(_SECCOMP_RET_ALLOW)
        p.load(_arg(2))
        p.unless_equal_return(0, _DENY)
        p.load(_arg(2) + 4)  # the pointer's high half
        p.unless_equal_return(0, _DENY)
        p.ret(_SECCOMP_RET_ALLOW)
        for kind, (process, pgrp, usr) in (("prio", (_PRIO_PROCESS, _PRIO_PGRP, _PRIO_USER)),
                                           ("ioprio", (_IOPRIO_WHO_PROCESS, _IOPRIO_WHO_PGRP, _IOPRIO_WHO_USER))):
            # setpriority(which, who, ...): every process of the user refused; a process or
            # a group only the engine's own (0, or its pid: the group it leads)
            p.label(f"{arch}-{kind}")
            p.load(_arg(0))
            p.if_equal_return(usr, _DENY)
            p.if_equal_go(pgrp, f"{arch}-{kind}-own")
            p.if_equal_go(process, f"{arch}-{kind}-own")
            p.ret(_SECCOMP_RET_ALLOW)
            p.label(f"{arch}-{kind}-own")
            p.load(_arg(1))
            p.if_equal_return(0, _SECCOMP_RET_ALLOW)
            p.if_own_return(_SECCOMP_RET_ALLOW)
            p.ret(_DENY)
        # A child made with CLONE_PARENT is the engine's parent's (serve's), no descendant
        # of the engine: its watch of what functions leave running never saw one spin a
        # core, its kill of its descendants as it stops with serve missed it, and one
        # killed outright left it to init, spinning for good (measured). clone3 takes its
        # flags from memory, out of a filter's reach: ENOSYS, and glibc uses clone.
        p.label(f"{arch}-clone")
        p.load(_arg(0))
        p.if_equal_return(_CLONE_PARENT, _DENY, op=_JSET_K)
        p.ret(_SECCOMP_RET_ALLOW)
        p.label(f"{arch}-clone3")
        p.ret(_SECCOMP_RET_ERRNO | errno.ENOSYS)
    return p.assemble(), p.own


def _patch_own(program: ctypes.Array, own: list[int]) -> None:
    """Write this process's pid (the engine's, run in it) where the filter compares with
    its own: a ``k`` each, the last 4 bytes of an instruction."""
    pid = os.getpid()
    for i in own:
        struct.pack_into("<I", program, 8 * i + 4, pid)


def _tasks(pid: int) -> list[int]:
    """``pid``'s threads now (a signal to any thread of a process can end the process)."""
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except (OSError, ValueError):
        return [pid]
