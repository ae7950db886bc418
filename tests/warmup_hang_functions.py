"""Functions that never return, on any input, the warm-up's included: a loop, a sleep,
a loop that swallows what interrupts it once, and a deadlock in native code, which no
signal handler reaches. Loaded only by the warm-up test (any other server with them
would wait WARMUP_TIMEOUT_S for each)."""

from __future__ import annotations

import ctypes
import time

import torch

from jacobian_service import Input, register


@register(inputs=[Input("x", shape=("n",))], description="A busy loop on every input.")
def spins_always(x: torch.Tensor) -> torch.Tensor:
    while True:
        pass


@register(inputs=[Input("x", shape=("n",))], description="Sleeps for an hour on every input.")
def sleeps_always(x: torch.Tensor) -> torch.Tensor:
    time.sleep(3600)
    return x.sin()


@register(inputs=[Input("x", shape=("n",))], description="A busy loop that swallows the first interruption.")
def spins_stubbornly(x: torch.Tensor) -> torch.Tensor:
    try:
        while True:
            pass
    except BaseException:
        pass
    while True:
        pass


@register(inputs=[Input("x", shape=("n",))], description="Locks a mutex it holds: a deadlock in C.")
def deadlocks_natively(x: torch.Tensor) -> torch.Tensor:
    libc = ctypes.CDLL(None)
    mutex = ctypes.create_string_buffer(64)  # a pthread_mutex_t (40 bytes on x86-64 glibc)
    libc.pthread_mutex_init(mutex, None)
    libc.pthread_mutex_lock(mutex)
    libc.pthread_mutex_lock(mutex)  # a default mutex locked again by its owner: it waits for ever
    return x.sin()
