"""Hostile user functions for the engine-fault tests, loaded by name like a user module.

Each behaves (sin) unless its first input element is 666, so the engines' warm-up, which
calls every function, passes; then it takes its engine process down in one way, or
returns leaving work running behind it.
"""

from __future__ import annotations

import ctypes
import gc
import os
import signal
import subprocess
import sys
import threading
import time

import torch

from jacobian_service import Input, register

TRIGGER = 666.0


def _armed(x: torch.Tensor) -> bool:
    return float(x.detach().reshape(-1)[0]) == TRIGGER


@register(inputs=[Input("x", shape=("n",))], description="os._exit(3) on the trigger.")
def exits(x: torch.Tensor) -> torch.Tensor:
    if _armed(x):
        os._exit(3)
    return x.sin()


@register(inputs=[Input("x", shape=("n",))], description="A segmentation fault on the trigger.")
def segfaults(x: torch.Tensor) -> torch.Tensor:
    if _armed(x):
        ctypes.string_at(0)  # reads address 0: SIGSEGV
    return x.sin()


@register(inputs=[Input("x", shape=("n",))], description="Stops its own process (SIGSTOP) on the trigger.")
def stops_itself(x: torch.Tensor) -> torch.Tensor:
    if _armed(x):
        os.kill(os.getpid(), signal.SIGSTOP)
    return x.sin()


@register(inputs=[Input("x", shape=("n",))], description="A busy loop that never returns, on the trigger.")
def spins(x: torch.Tensor) -> torch.Tensor:
    if _armed(x):
        while True:
            pass
    return x.sin()


@register(inputs=[Input("x", shape=("n",))], description="Sleeps for an hour on the trigger.")
def sleeps(x: torch.Tensor) -> torch.Tensor:
    if _armed(x):
        time.sleep(3600)
    return x.sin()


@register(inputs=[Input("x", shape=("n",))], description="Allocates 64 MiB blocks until memory runs out, on the trigger.")
def hogs(x: torch.Tensor) -> torch.Tensor:
    if _armed(x):
        held = []
        while True:  # under ENGINE_MEMORY_LIMIT_BYTES an allocation fails; without, the OOM killer
            held.append(torch.ones(16 << 20))
    return x.sin()


_KEPT: list[torch.Tensor] = []


@register(inputs=[Input("x", shape=("n",))], description="Keeps 64 MiB more at each call, on the trigger (a leak).")
def leaks(x: torch.Tensor) -> torch.Tensor:
    if _armed(x):
        _KEPT.append(torch.ones(16 << 20))  # written, so resident
    return x.sin()


@register(inputs=[Input("x", shape=("n",))],
          description="Keeps 64 MiB more at each call in a memfd, written through its descriptor, on the trigger "
                      "(memory in no resident size).")
def leaks_to_memfd(x: torch.Tensor) -> torch.Tensor:
    if _armed(x):
        fd = os.memfd_create("kept")
        for _ in range(64):
            os.write(fd, b"\1" * (1 << 20))
        _KEPT.append(fd)
    return x.sin()


def _fork_and_exit(leave_the_group: bool) -> None:
    """What a function using a fork-based multiprocessing pool leaves behind when its
    engine dies: a child holding copies of every descriptor the engine had open (its
    connections to the front ends, its listening socket). The child writes its pid to
    $FAULT_FORK_PIDFILE for the test to find."""
    pidfile = os.environ.get("FAULT_FORK_PIDFILE")
    if os.fork() == 0:
        if leave_the_group:
            os.setsid()  # out of the engine's process group, beyond the supervisor's reach
        if pidfile:  # (whole or not at all: the test reads it as the engine's 500 comes)
            with open(pidfile + ".tmp", "w") as f:
                f.write(str(os.getpid()))
            os.replace(pidfile + ".tmp", pidfile)
        time.sleep(120)
        os._exit(0)
    # Until the child has left the group and written its pid, not a fixed 0.2 s: under load
    # the child had not run yet, the test read an empty or missing file, and a forks_away
    # child still in the group died with it (the subreaper's case untested).
    deadline = time.monotonic() + 30
    while pidfile and not os.path.exists(pidfile) and time.monotonic() < deadline:
        time.sleep(0.01)
    os._exit(3)


@register(inputs=[Input("x", shape=("n",))], description="Forks a child that lives on, then exits, on the trigger.")
def forks(x: torch.Tensor) -> torch.Tensor:
    if _armed(x):
        _fork_and_exit(leave_the_group=False)
    return x.sin()


@register(inputs=[Input("x", shape=("n",))], description="Forks a child that leaves the process group, then exits.")
def forks_away(x: torch.Tensor) -> torch.Tensor:
    if _armed(x):
        _fork_and_exit(leave_the_group=True)
    return x.sin()


@register(inputs=[Input("x", shape=("n",))], description="Returns, leaving a thread that spins for ever, on the trigger.")
def leaves_a_spinning_thread(x: torch.Tensor) -> torch.Tensor:
    if _armed(x):
        threading.Thread(target=_spin, name="left-spinning").start()  # not a daemon: it would hold up an exit too
    return x.sin()


@register(inputs=[Input("x", shape=("n",))], description="Returns, leaving a thread that waits for ever, on the trigger.")
def leaves_a_waiting_thread(x: torch.Tensor) -> torch.Tensor:
    if _armed(x):
        threading.Thread(target=threading.Event().wait, name="left-waiting", daemon=True).start()
    return x.sin()


@register(inputs=[Input("x", shape=("n",))], description="Returns, leaving a process that spins for ever, on the trigger.")
def leaves_a_spinning_process(x: torch.Tensor) -> torch.Tensor:
    if _armed(x):
        child = subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True)  # out of the group
        with open(os.environ.get("FAULT_FORK_PIDFILE", os.devnull), "w") as f:
            f.write(str(child.pid))
    return x.sin()


def _spin() -> None:
    while True:
        pass


@register(inputs=[Input("x", shape=("n",))],
          description="sin; on the trigger, 20,000 outputs (an output size that depends on the input's values).")
def grows(x: torch.Tensor) -> torch.Tensor:
    if _armed(x):
        return x.sum() * torch.ones(20_000)
    return x.sin()


@register(inputs=[Input("x", shape=("n",))],
          description="Forks on the trigger, and both processes return (a fork not followed by exec or _exit).")
def forks_and_returns(x: torch.Tensor) -> torch.Tensor:
    if _armed(x) and os.fork() == 0:
        with open(os.environ.get("FAULT_FORK_PIDFILE", os.devnull), "w") as f:
            f.write(str(os.getpid()))
    return x.sin()


_KEPT_FILES: list = []


@register(inputs=[Input("x", shape=("n",))], description="Keeps 50 open files more at each call, on the trigger (a leak).")
def leaks_descriptors(x: torch.Tensor) -> torch.Tensor:
    if _armed(x):
        _KEPT_FILES.extend(open(os.devnull) for _ in range(50))
    return x.sin()


@register(inputs=[Input("x", shape=("n",))], description="Opens (and closes) a file at each call.")
def opens_a_file(x: torch.Tensor) -> torch.Tensor:
    with open(os.devnull) as f:
        f.read()
    return x.sin()


_NEVER = threading.Event()


@register(inputs=[Input("x", shape=("n",))],
          description="Starts 20 threads that wait for ever at each call, on the trigger (a new pool per call).")
def leaks_threads(x: torch.Tensor) -> torch.Tensor:
    if _armed(x):
        for _ in range(20):
            threading.Thread(target=_NEVER.wait, daemon=True).start()
    return x.sin()


_KEPT_PROCESSES: list[subprocess.Popen] = []


@register(inputs=[Input("x", shape=("n",))],
          description="Starts 40 short processes at each call, on the trigger, and never waits for them (zombies).")
def leaks_processes(x: torch.Tensor) -> torch.Tensor:
    if _armed(x):
        _KEPT_PROCESSES.extend(subprocess.Popen(["true"]) for _ in range(40))
    return x.sin()


@register(inputs=[Input("x", shape=("n",))],
          description="Starts a sleeping process in a session of its own on the trigger (a helper daemon); "
                      "its pid goes to $FAULT_FORK_PIDFILE.")
def starts_a_detached_sleeper(x: torch.Tensor) -> torch.Tensor:
    if _armed(x):
        sleeper = subprocess.Popen(["sleep", "300"], start_new_session=True)
        with open(os.environ["FAULT_FORK_PIDFILE"], "w") as f:
            f.write(str(sleeper.pid))
    return x.sin()


@register(inputs=[Input("x", shape=("n",))],
          description="Starts a daemon the classic way on the trigger (fork, setsid, fork again, the middle one "
                      "exits): the daemon's parent is gone at once; its pid goes to $FAULT_FORK_PIDFILE.")
def daemonizes(x: torch.Tensor) -> torch.Tensor:
    if _armed(x):
        pidfile = os.environ["FAULT_FORK_PIDFILE"]
        middle = os.fork()
        if middle == 0:
            os.setsid()
            if os.fork() == 0:
                with open(pidfile + ".tmp", "w") as f:
                    f.write(str(os.getpid()))
                os.replace(pidfile + ".tmp", pidfile)
                time.sleep(300)
            os._exit(0)
        os.waitpid(middle, 0)
        deadline = time.monotonic() + 5
        while not os.path.exists(pidfile) and time.monotonic() < deadline:
            time.sleep(0.01)
    return x.sin()


@register(inputs=[Input("x", shape=("n",))],
          description="Leaves 600 daemons sleeping on the trigger (a shell starts each in a subshell that exits at "
                      "once): what a function that starts a daemon at every call leaves after 600 calls.")
def daemonizes_many(x: torch.Tensor) -> torch.Tensor:
    if _armed(x):
        subprocess.run(["sh", "-c", "for i in $(seq 600); do (sleep 300 &); done"], start_new_session=True, check=True)
    return x.sin()


class _FragileSin(torch.autograd.Function):
    """sin whose backward os._exit(5)s from its third call once armed: the third row
    chunk of a streamed Jacobian (each chunk is one vmapped backward)."""

    generate_vmap_rule = True
    calls = 0
    armed = False

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return x.sin()

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        _FragileSin.calls += 1
        if _FragileSin.armed and _FragileSin.calls >= 3:
            os._exit(5)
        return g * x.cos()


@register(inputs=[Input("x", shape=("n",))],
          description="sin; os._exit(5) in the third row chunk of its Jacobian, on the trigger.")
def crashes_mid_stream(x: torch.Tensor) -> torch.Tensor:
    _FragileSin.calls, _FragileSin.armed = 0, _armed(x)
    return _FragileSin.apply(x)


def _refuse_proc(event: str, args: tuple) -> None:
    if event == "os.listdir" and args and str(args[0]).startswith("/proc"):
        raise RuntimeError("no looking at /proc here")


@register(inputs=[Input("x", shape=("n",))],
          description="sin; adds an audit hook (which nothing can remove) refusing os.listdir of /proc, on the trigger.")
def adds_an_audit_hook(x: torch.Tensor) -> torch.Tensor:
    if _armed(x):
        sys.addaudithook(_refuse_proc)
    return x.sin()


@register(inputs=[Input("x", shape=("n",))],
          description="sin; leaves a timer thread that calls os._exit(7) a second later, on the trigger.")
def leaves_a_time_bomb(x: torch.Tensor) -> torch.Tensor:
    if _armed(x):
        threading.Timer(1.0, os._exit, (7,)).start()
    return x.sin()


class _ExitsWhenCollected:
    """A reference cycle whose __del__ ends the process: it runs when the cycle is
    collected, in whatever is running then."""

    def __init__(self) -> None:
        self.me = self

    def __del__(self) -> None:
        os._exit(9)


@register(inputs=[Input("x", shape=("n",))],
          description="sin; leaves a reference cycle whose __del__ calls os._exit(9), on the trigger.")
def leaves_a_gc_bomb(x: torch.Tensor) -> torch.Tensor:
    y = x.sin()
    if _armed(x):
        # Collected now, the young generation is empty: the cycle left last is collected
        # only when enough objects have been made since, which may be well after return.
        gc.collect()
        _ExitsWhenCollected()
    return y
