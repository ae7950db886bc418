"""Functions for tests/test_clients_round31.py (loaded by name like a user module)."""

from __future__ import annotations

import time

import torch
from jacobian_service import Input, register

from ._tally import Calls

# counted_chain's calls, a stacked batch of its requests one (the test's server runs its
# engines on threads of the test's own process: the test reads what the engine ran). Not
# a Counter, nor a threading.Event set at each call: the engine's kept-state watch sees
# both change, takes the function for one that keeps state across calls, refuses its
# first stacked batch and never stacks it again (every batch size was 1, and the
# time-slice test had no batch to check). See tests._tally.
CALLS = Calls()
# How many tanh(A x) steps counted_chain takes, read at each call: size_steps sets it so
# that one Jacobian takes a chosen time on the machine at hand (the test's server and the
# test share this module: its engines run on the test process's threads).
STEPS = 1200
_A = torch.randn(256, 256, generator=torch.Generator().manual_seed(31)) / 16


def chain(x: torch.Tensor) -> torch.Tensor:
    for _ in range(STEPS):
        x = torch.tanh(_A @ x)
    return x


def size_steps(seconds: float, probe_steps: int = 40) -> int:
    """Set STEPS so that a Jacobian of ``chain`` takes about ``seconds`` here, measured on
    ``probe_steps`` (its cost is linear in the steps). A fixed 1,200 steps took 4-10 s a
    Jacobian on the loaded 2-core VM, every one of them CPU the suite paid; on a machine
    several times faster the tests that need a slow Jacobian would have found none.

    Measured in this thread's CPU time, not wall time: on the loaded VM a wall-clock probe
    sized a chain whose Jacobian took 30 ms once the load eased (the time-slice test then
    batched 14 of them, over its limit). Nor the process's CPU time: the test's server
    runs in this process, and its threads' work (a previous test's answers still being
    sent) made a probe look 10 times dearer (a 62 ms chain: the time-slice test skipped).
    Measured on one torch thread: on two, its CPU time (spinning for a partner the loaded
    VM had descheduled) swung 3-fold between runs. One thread's time is the chain's CPU
    cost: the engine's Jacobian takes about that (0.55-0.78 s measured for 0.75 on the VM;
    torch's threads gained the engine little on 2 loaded cores), less on many free cores."""
    global STEPS
    x = torch.linspace(-1, 1, 256)
    STEPS = probe_steps
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # (alone: no other thread's wait or spin in the measure)
    try:
        torch.func.jacrev(chain)(x)  # (the process's first jacrev costs ~2 CPU-s once: not the steps')
        best = float("inf")
        for _ in range(3):
            t0 = time.thread_time()
            torch.func.jacrev(chain)(x)
            best = min(best, time.thread_time() - t0)
    finally:
        torch.set_num_threads(threads)
    STEPS = max(probe_steps, round(probe_steps * seconds / max(best, 1e-6)))
    return STEPS


@register(inputs=[Input("x", shape=(256,))],
          description="tanh(A x) STEPS times over, its calls counted: a slow Jacobian whose runs a test can count.")
def counted_chain(x: torch.Tensor) -> torch.Tensor:
    CALLS.append(1)
    return chain(x)
